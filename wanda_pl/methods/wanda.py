"""Wanda (Sun et al., 2023, arXiv 2306.11695): prune by weights and activations.

Score ``S[i, j] = |W[i, j]| * sqrt(mean over samples of ||X_j||^2)`` for W (out x in);
compared per output row by default (each row loses its lowest ``int(in * s)``), or N:M
along input columns; ``use_variant`` picks a per-row cumulative-score threshold instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.sparsity import select_mask
from ..core.method import Method, option
from .base import MaskOptions


@dataclass(frozen=True)
class WandaOptions(MaskOptions):
    use_variant: bool = option(False, "the Wanda variant (per-row threshold on cumulative scores; unstructured only).")


def check(options: WandaOptions, spec, refine: str) -> None:
    if options.use_variant and spec.structured:
        raise ValueError(f"pruning.use_variant needs unstructured sparsity and a method that has it (wanda), "
                         f"got method='wanda', sparsity_type={spec.type!r}")


def wanda_score(weight: torch.Tensor, scaler_row: torch.Tensor) -> torch.Tensor:
    return weight.abs() * torch.sqrt(scaler_row.to(weight.device)).unsqueeze(0)


def wanda(weight, stats, spec, options: WandaOptions):
    if stats is None:
        raise ValueError("wanda needs calibration statistics")
    score = wanda_score(weight, stats.scaler_row)
    return select_mask(score, spec, options.granularity or "row", options.use_variant), None


METHOD = Method("wanda", wanda, WandaOptions, default_granularity="row", check=check)
