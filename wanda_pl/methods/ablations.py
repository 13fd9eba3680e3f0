"""The Wanda paper's four OBS ablations (the reference's ``ablate_*`` methods), from SparseGPT's
solver: ``*_seq`` fixes the mask beforehand (magnitude or Wanda scores) and only runs the OBS
weight updates; ``*_iter`` rescores the *updated* weights at every block with that criterion."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.precision import compute_dtype
from ..core.sparsity import select_mask
from ..core.method import Method
from .base import MaskOptions, SolverOptions
from .sparsegpt import hessian, sparsegpt_prune
from .wanda import wanda_score


@dataclass(frozen=True)
class FixedMaskOptions(SolverOptions, MaskOptions):
    """The solver's knobs and how the fixed mask is chosen."""

    def __post_init__(self) -> None:
        SolverOptions.__post_init__(self)
        MaskOptions.__post_init__(self)


def ablate_mag_seq(weight, stats, spec, options: FixedMaskOptions):
    H = hessian(stats, "ablate_mag_seq")
    fixed = select_mask(weight.abs(), spec, options.granularity or "layer")
    return sparsegpt_prune(weight, H, spec, options.blocksize, options.percdamp, mask=fixed)


def ablate_wanda_seq(weight, stats, spec, options: FixedMaskOptions):
    H = hessian(stats, "ablate_wanda_seq")
    fixed = select_mask(wanda_score(weight, stats.scaler_row), spec, options.granularity or "row")
    return sparsegpt_prune(weight, H, spec, options.blocksize, options.percdamp, mask=fixed)


def ablate_mag_iter(weight, stats, spec, options: SolverOptions):
    H = hessian(stats, "ablate_mag_iter")
    return sparsegpt_prune(weight, H, spec, options.blocksize, options.percdamp, iter_score=lambda w, cols: w.abs())


def ablate_wanda_iter(weight, stats, spec, options: SolverOptions):
    H = hessian(stats, "ablate_wanda_iter")
    norm = torch.sqrt(stats.scaler_row.to(device=weight.device, dtype=compute_dtype(weight.dtype)))
    return sparsegpt_prune(
        weight, H, spec, options.blocksize, options.percdamp, iter_score=lambda w, cols: w.abs() * norm[cols].unsqueeze(0)
    )


METHODS = (
    Method("ablate_mag_seq", ablate_mag_seq, FixedMaskOptions, needs_hessian=True, default_granularity="layer"),
    Method("ablate_wanda_seq", ablate_wanda_seq, FixedMaskOptions, needs_hessian=True, default_granularity="row"),
    Method("ablate_mag_iter", ablate_mag_iter, SolverOptions, needs_hessian=True),
    Method("ablate_wanda_iter", ablate_wanda_iter, SolverOptions, needs_hessian=True),
)
