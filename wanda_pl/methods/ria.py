"""RIA (Zhang et al., ICLR'24, "Plug-and-Play: relative importance and activations").

Score ``S[i, j] = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^a`` for W (out x in):
a weight's share of its input column's and of its output row's total magnitude, times the input
norm (``sqrt`` of Wanda's ``scaler_row``) to the power ``a`` (0.5 in the paper). Compared over the
whole layer by default, as the paper's code does (``granularity: row`` is Wanda's per-row rule).
With ``ria_permute`` and N:M sparsity, the paper's channel permutation (:mod:`.permute`): the N:M
mask is chosen on the score with the input channels reordered so that every group of M holds a mix
of important and unimportant ones; the weights stay in place, only the mask changes. The
permutation comes back with the mask: the run writes every layer's to ``permutations.pt``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.sparsity import select_mask
from ..core.method import Method, option
from .base import MaskOptions
from .permute import permuted_nm_mask

PERMUTE_ONLY_NM = "pruning.ria_permute permutes input channels for N:M sparsity only (e.g. 2:4)"


@dataclass(frozen=True)
class RIAOptions(MaskOptions):
    ria_alpha: float = option(0.5, "RIA's exponent of the input norm (0.5 as its paper).")
    ria_permute: bool = option(False, "RIA's channel permutation (N:M only): the mask is chosen on channel-permuted "
                                      "scores; the orders are written to permutations.pt.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.ria_alpha, (int, float)) and self.ria_alpha >= 0):
            raise ValueError(f"pruning.ria_alpha must be a number >= 0, got {self.ria_alpha!r}")
        if not isinstance(self.ria_permute, bool):
            raise ValueError(f"pruning.ria_permute must be true or false, got {self.ria_permute!r}")


def check(options: RIAOptions, spec, refine: str) -> None:
    if options.ria_permute and (refine != "none" or not spec.structured):
        raise ValueError(f"{PERMUTE_ONLY_NM} and without pruning.refine (DSnoT swaps within the unpermuted "
                         f"groups), got sparsity_type={spec.type!r}, refine={refine!r}")


def ria_score(weight: torch.Tensor, scaler_row: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    w = weight.abs()
    # An all-zero column or row (a dead input, an already pruned output) scores 0, not NaN.
    relative = w / w.sum(dim=0, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny) \
        + w / w.sum(dim=1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    return relative * torch.sqrt(scaler_row.to(weight.device)).pow(alpha).unsqueeze(0)


def ria(weight, stats, spec, options: RIAOptions):
    if stats is None:
        raise ValueError("ria needs calibration statistics")
    score, granularity = ria_score(weight, stats.scaler_row, options.ria_alpha), options.granularity or "layer"
    if not options.ria_permute:
        return select_mask(score, spec, granularity), None
    if not spec.structured:  # a plan may give layers other specs than the callback's: checked per layer
        raise ValueError(f"{PERMUTE_ONLY_NM}, got sparsity_type={spec.type!r}")
    mask, perm = permuted_nm_mask(score, spec, granularity)
    return mask, None, perm


METHOD = Method("ria", ria, RIAOptions, default_granularity="layer", check=check)
