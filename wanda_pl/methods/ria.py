"""RIA (Zhang et al., ICLR'24, "Plug-and-Play: relative importance and activations").

Score ``S[i, j] = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^a`` for W (out x in):
a weight's share of its input column's and of its output row's total magnitude, times the input
norm (``sqrt`` of Wanda's ``scaler_row``) to the power ``a`` (0.5 in the paper). Compared over the
whole layer by default, as the paper's code does (``granularity: row`` is Wanda's per-row rule).
The paper's channel permutation before N:M is not done here: N:M takes the plain score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.sparsity import select_mask
from .base import MaskOptions, Method


@dataclass(frozen=True)
class RIAOptions(MaskOptions):
    ria_alpha: float = 0.5  # the exponent ``a`` of the input norm

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.ria_alpha, (int, float)) and self.ria_alpha >= 0):
            raise ValueError(f"pruning.ria_alpha must be a number >= 0, got {self.ria_alpha!r}")


def ria_score(weight: torch.Tensor, scaler_row: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w = weight.abs()
    # An all-zero column or row (a dead input, an already pruned output) scores 0, not NaN.
    relative = w / w.sum(dim=0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) \
        + w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return relative * torch.sqrt(scaler_row.to(weight.device)).pow(alpha).unsqueeze(0)


def ria(weight, stats, spec, options: RIAOptions):
    if stats is None:
        raise ValueError("ria needs calibration statistics")
    return select_mask(ria_score(weight, stats.scaler_row, options.ria_alpha), spec, options.granularity or "layer"), None


METHOD = Method("ria", ria, RIAOptions, default_granularity="layer")
