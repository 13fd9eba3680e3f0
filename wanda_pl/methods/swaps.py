"""Exact mask swaps (after SparseSwaps, 2025): refine any mask by one-for-one swaps within a row that
lower the layer's reconstruction error exactly.

With the kept weights unchanged, row ``w``'s error on the calibration inputs is ``d^T H d``, ``d = w * m``
(the pruned part), ``H = X^T X``. Reviving pruned ``p`` and pruning kept ``k`` changes it by

    delta(p, k) = 2 (w_k g_k - w_p g_p) + w_k^2 H_kk + w_p^2 H_pp - 2 w_k w_p H_kp,   g = H d,

computed for every pair at once. Each round takes, in every row, the pair that lowers the error most
(N:M: both in one group of M, so every group keeps its N), until no pair lowers it or after
``swaps_max`` rounds. The count per row (and per group) never changes, and neither does any weight.
DSnoT's swaps follow a surrogate (the output's mean); these follow the objective itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.method import option
from ..core.precision import as_compute
from ..core.sparsity import SparsitySpec
from .base import Step

CHUNK = 1 << 24  # pair scores held at once (rows x in x in), ~64 MB in fp32


@dataclass(frozen=True)
class SwapOptions:
    """How many exact swaps a row may take."""

    swaps_max: int = option(16, "exact swaps per row at most (each lowers the layer error).")

    def __post_init__(self) -> None:
        later = getattr(super(), "__post_init__", None)  # composed with other options (compose.py)
        if later is not None:
            later()
        if not isinstance(self.swaps_max, int) or self.swaps_max < 0:
            raise ValueError(f"pruning.swaps_max must be an integer >= 0, got {self.swaps_max!r}")


def row_errors(weight: torch.Tensor, xtx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``d^T H d`` per row, ``d`` the pruned weights: what pruning costs each output on the calibration inputs."""
    d = weight * mask
    return ((d @ xtx) * d).sum(1)


def _best_pairs(W, H, mask, spec: SparsitySpec, blocks=None):
    """Per row: (lowest delta, pruned column p to revive, kept column k to prune)."""
    d = W * mask
    g = d @ H
    diag = H.diagonal()
    a = 2 * W * g + W * W * diag  # what pruning k adds (k kept)
    b = -2 * W * g + W * W * diag  # what reviving p adds (p pruned)
    rows, cols = W.shape
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=W.device)
    if spec.structured:
        m = spec.m
        Wg, Mg = W.view(rows, -1, m), mask.view(rows, -1, m)
        delta = b.view(rows, -1, m, 1) + a.view(rows, -1, 1, m) - 2 * Wg.unsqueeze(-1) * Wg.unsqueeze(-2) * blocks
        delta = torch.where(Mg.unsqueeze(-1) & ~Mg.unsqueeze(-2), delta, inf)  # (row, group, p, k)
        best, flat = delta.flatten(1).min(1)
        group, rest = flat // (m * m), flat % (m * m)
        return best, group * m + rest // m, group * m + rest % m
    best, p_out, k_out = [], [], []
    step = max(1, CHUNK // (cols * cols))
    for r in range(0, rows, step):
        w, mk = W[r:r + step], mask[r:r + step]
        delta = b[r:r + step].unsqueeze(2) + a[r:r + step].unsqueeze(1) - 2 * w.unsqueeze(2) * w.unsqueeze(1) * H
        delta = torch.where(mk.unsqueeze(2) & ~mk.unsqueeze(1), delta, inf)  # (row, p, k)
        v, flat = delta.flatten(1).min(1)
        best.append(v), p_out.append(flat // cols), k_out.append(flat % cols)
    return torch.cat(best), torch.cat(p_out), torch.cat(k_out)


def swap_refine(weight: torch.Tensor, xtx: torch.Tensor, spec: SparsitySpec, mask: torch.Tensor,
                swaps_max: int) -> torch.Tensor:
    """The refined mask (True = pruned): the same count per row (and per group of M), a lower or
    equal ``row_errors`` in every row."""
    W = as_compute(weight)
    H = xtx.to(W.device, W.dtype)
    mask = mask.clone().to(W.device)
    rows = torch.arange(W.shape[0], device=W.device)
    active = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
    blocks = None
    if spec.structured:  # the groups' diagonal blocks of H: the only pairs N:M allows
        blocks = torch.stack([H[i:i + spec.m, i:i + spec.m] for i in range(0, W.shape[1], spec.m)])
    scale = H.diagonal().mean().clamp_min(1e-30) * (W * W).mean(1).clamp_min(1e-30)  # an error's size, per row
    for _ in range(swaps_max):
        if not bool(active.any()):
            break
        best, p, k = _best_pairs(W[active], H, mask[active], spec, blocks)
        ok = best < -1e-6 * scale[active]  # a real decrease, not float noise: no endless swapping
        idx = rows[active][ok]
        mask[idx, p[ok]] = False
        mask[idx, k[ok]] = True
        active[rows[active][~ok]] = False
    return mask


def _step(weight, new, stats, spec, mask, options):
    return swap_refine(weight, stats.xtx, spec, mask, options.swaps_max), new


STEP = Step("swaps", "refine", SwapOptions, _step, needs_hessian=True)
