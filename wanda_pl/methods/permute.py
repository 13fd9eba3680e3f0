"""RIA's channel permutation for N:M sparsity (Zhang et al., ICLR'24, "Plug-and-Play").

N:M prunes N of every M *consecutive* input columns, so when a layer's important inputs sit next to
each other, important weights must go. Choosing the mask on ``score[:, perm]`` instead, where ``perm``
spreads the important channels over the ``in / M`` groups, keeps more of the total score. The
weights are not moved: the mask is mapped back to the original columns, so the model computes the
same thing; it is N:M in the order ``perm`` (a deployment would permute the layer's input channels,
i.e. the previous layer's output rows, by ``perm``).

Shapes: ``score`` is (out x in), ``perm`` a LongTensor of ``in`` indices: group ``g`` holds the
channels ``perm[g * M:(g + 1) * M]``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment

from ..core.precision import as_compute
from ..core.sparsity import SparsitySpec, select_mask

_CHUNK = 1 << 25  # elements of one (out x groups x channels) slice of the assignment's cost


def kept_score(score: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> float:
    """The total score that N:M keeps (the M - N largest of every row in every group) in the order ``perm``."""
    groups = score[:, perm].reshape(score.shape[0], -1, m).double()
    return float(groups.topk(m - n, dim=-1).values.sum())


def _deal(score: torch.Tensor, m: int) -> torch.Tensor:
    """(groups x m) channels: sorted by column score, dealt out snake-wise (0..G-1, then G-1..0, ...),
    so every group gets one channel of each rank band and the first group is not always first."""
    g = score.shape[1] // m
    order = torch.sort(score.double().sum(0), descending=True, stable=True).indices
    bands = order.reshape(m, g).clone()
    bands[1::2] = bands[1::2].flip(-1)
    return bands.t().contiguous()


def _reassign(score: torch.Tensor, groups: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """Take every group's channel at ``slot`` out and give them back by a linear sum assignment that
    maximises the kept score (summed in fp32 for speed: the caller checks the gain exactly)."""
    rows = score.shape[0]
    g, m = groups.shape
    keep = m - n
    others = torch.cat([groups[:, :slot], groups[:, slot + 1:]], dim=1)  # (g x m-1)
    rest = score[:, others.flatten()].reshape(rows, g, m - 1).sort(dim=-1, descending=True).values
    # The M - N largest of (rest + one channel c) are rest's first keep-1 plus max(c, rest's keep-th):
    # the cost of "group h receives c" needs only those two numbers per row, not a sort per pair.
    base = rest[..., :keep - 1].sum(dim=(0, 2))  # (g,)
    kth = rest[..., keep - 1]  # (rows x g)
    cand = score[:, groups[:, slot]]  # (rows x g): column c is the channel now at slot of group c
    gain = torch.empty(g, g, dtype=score.dtype, device=score.device)
    step = max(1, _CHUNK // max(1, rows * g))
    for h in range(0, g, step):  # gain[h, c]: what group h keeps holding channel c
        gain[h:h + step] = torch.maximum(kth[:, h:h + step, None], cand[:, None, :]).sum(0)
    gain += base[:, None]
    _, pick = linear_sum_assignment(gain.double().cpu().numpy(), maximize=True)  # rows come back as 0..g-1
    new = groups.clone()
    new[:, slot] = groups[torch.as_tensor(pick, device=groups.device), slot]
    return new


@torch.no_grad()
def nm_permutation(score: torch.Tensor, n: int, m: int, rounds: int = 3) -> torch.Tensor:
    """A permutation of the ``in`` columns under which N:M keeps at least as much score as the plain
    order: deal the channels snake-wise by column score, then for ``rounds`` rounds reassign each
    slot's channels across the groups (one linear sum assignment per slot) while that gains. If the
    result keeps no more than the identity, the identity. Deterministic (stable sorts, scipy's LSA)."""
    cols = score.shape[1]
    identity = torch.arange(cols, device=score.device)
    if cols % m:
        raise ValueError(f"N:M sparsity {n}:{m}: M={m} does not divide the input width {cols}")
    if cols == m:  # one group: nothing to spread
        return identity
    score = as_compute(score)
    groups = _deal(score, m)
    kept = kept_score(score, groups.flatten(), n, m)
    for _ in range(rounds):
        gained = False
        for slot in range(m):
            new = _reassign(score, groups, slot, n)
            # Strict gains only, measured exactly: fp32 rounding cannot make it cycle or lose score.
            if (now := kept_score(score, new.flatten(), n, m)) > kept:
                groups, kept, gained = new, now, True
        if not gained:
            break
    return groups.flatten() if kept > kept_score(score, identity, n, m) else identity


def permuted_nm_mask(score: torch.Tensor, spec: SparsitySpec,
                     granularity: str = "row") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(mask, perm)``: the N:M mask chosen on ``score[:, perm]``, in the original column order."""
    if not spec.structured:
        raise ValueError(f"the channel permutation is for N:M sparsity only, got {spec.type!r}")
    if not torch.isfinite(score).all():  # an assignment on NaN scores would fail obscurely
        raise ValueError("pruning scores contain NaN or Inf (non-finite weights or activations)")
    perm = nm_permutation(score, spec.n, spec.m)
    mask = torch.empty_like(score, dtype=torch.bool)
    mask[:, perm] = select_mask(score[:, perm], spec, granularity)
    return mask, perm
