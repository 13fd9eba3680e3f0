"""Across processes: the one place that asks whether ``torch.distributed`` is running.

Data-parallel calibration: each rank runs its share of the calibration samples through a block,
:func:`sum_stats` adds the ranks' statistics so every rank holds those of all samples before any
mask is chosen, and :func:`check_same` proves every rank then chose the same masks (a mismatch
would leave the ranks pruning different models without a word)."""
from __future__ import annotations

import hashlib
from typing import Dict, List

import torch
import torch.distributed as dist

from .stats import LayerStats


def world() -> int:
    """How many processes take part (1 when ``torch.distributed`` is not running)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (CPU) takes CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed in place over every rank; unchanged in one process."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (on the backend's device), back where it was; ``t`` in one process."""
    if world() == 1:
        return t
    device = _device()
    return all_reduce_sum(t.to(device)).to(t.device)


def sum_stats(stats: Dict[str, LayerStats]) -> None:
    """Every layer's statistics summed over the ranks, in place (same order of layers on every rank)."""
    if world() == 1:
        return
    done = set()
    for name in sorted(stats):
        st = stats[name]
        if id(st) in done:  # layers reading one input share one LayerStats: summed once
            continue
        done.add(id(st))
        counts = summed(torch.tensor([st.nsamples, st.tokens], dtype=torch.int64))
        st.nsamples, st.tokens = int(counts[0]), int(counts[1])
        st.sq_sum, st.col_sum = summed(st.sq_sum), summed(st.col_sum)
        if st.with_hessian:
            has = summed(torch.tensor([st.xtx is not None], dtype=torch.int64))
            if int(has) != world():
                raise RuntimeError(f"{name}: some ranks recorded no calibration activations (fewer samples than ranks?)")
            st.xtx = summed(st.xtx)


def digest(masks: Dict[str, torch.Tensor]) -> int:
    """A 63-bit checksum of masks (names, shapes and every bit)."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(name.encode())
        h.update(str(tuple(m.shape)).encode())
        h.update(m.numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def check_same(what: str, masks: Dict[str, torch.Tensor]) -> None:
    """Raise on every rank unless every rank holds exactly these masks for ``what`` (a block)."""
    if world() == 1:
        return
    mine = digest(masks)
    gathered = [torch.zeros(1, dtype=torch.int64, device=_device()) for _ in range(world())]
    dist.all_gather(gathered, torch.tensor([mine], dtype=torch.int64, device=_device()))
    values = [int(g) for g in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"{what}: the ranks chose different masks (checksums {values}); their summed "
                           f"statistics should have made them equal: a nondeterministic method or a rank "
                           f"running other settings")


def share(n: int, rank: int, ranks: int) -> range:
    """The items rank ``rank`` of ``ranks`` takes (calibration samples, evaluation windows, images):
    ``rank, rank + ranks, ...``; every item on exactly one rank, none repeated (a DistributedSampler
    pads with duplicates, which would bias a perplexity). The one place the shares are decided."""
    return range(rank, n, ranks)


def shares(n: int, ranks: int) -> List[int]:
    """How many items each rank takes."""
    return [len(share(n, r, ranks)) for r in range(ranks)]


def check_calibration_shares(n: int, ranks: int) -> None:
    """Data-parallel calibration sums statistics over ranks: every rank needs a sample."""
    if ranks > n:
        raise ValueError(f"data-parallel calibration needs at least one sample per rank: {n} calibration "
                         f"samples for {ranks} ranks (data.nsamples >= trainer.devices x num_nodes)")
