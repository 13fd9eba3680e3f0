"""DSnoT (Zhang et al., ICLR'24, "Dynamic Sparse No Training"): refine any mask, no weight update.

Per output row ``i`` the expected change of the output from pruning is
``e_i = sum over pruned j of W_ij E[X_j]``. Each cycle swaps one pruned weight back in and one
kept weight out, so the count stays exact:

- grow the pruned weight whose ``W_ij E[X_j] / Var(X_j)^p`` is largest with the sign of ``e_i``
  (reviving it takes ``W_ij E[X_j]`` off ``e_i``), taking them in order;
- prune (unstructured) the kept weight of the opposite sign with the lowest Wanda score, or (N:M)
  the kept weight with the lowest Wanda score in the grown weight's group of M.

A row stops when ``|e_i|`` is at most the threshold, when a swap would flip the sign of ``e_i``
or not make ``|e_i|`` smaller (a guard the reference lacks: ``|e_i|`` never grows), or after
``dsnot_cycles`` cycles. Mean and variance are over every calibration token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.method import option
from ..core.precision import as_compute
from ..core.sparsity import SparsitySpec
from .base import Step


@dataclass(frozen=True)
class DSnoTOptions:
    """DSnoT's cycles, stopping threshold on ``|e|`` and the power of the variance in the growing score."""

    dsnot_cycles: int = option(50, "DSnoT's cycles.")
    dsnot_threshold: float = option(0.1, "DSnoT's stop on ``|e|``.")
    dsnot_var_power: float = option(1.0, "DSnoT's power of the variance in the growing score.")

    def __post_init__(self) -> None:
        later = getattr(super(), "__post_init__", None)  # composed with other options (compose.py)
        if later is not None:
            later()
        if not isinstance(self.dsnot_cycles, int) or self.dsnot_cycles < 0:
            raise ValueError(f"pruning.dsnot_cycles must be an integer >= 0, got {self.dsnot_cycles!r}")
        if not self.dsnot_threshold >= 0:
            raise ValueError(f"pruning.dsnot_threshold must be >= 0, got {self.dsnot_threshold!r}")
        if not self.dsnot_var_power >= 0:
            raise ValueError(f"pruning.dsnot_var_power must be >= 0, got {self.dsnot_var_power!r}")


def expected_error(weight: torch.Tensor, mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``e_i = sum over pruned j of W_ij E[X_j]`` per row: DSnoT's objective is ``|e_i|``."""
    return (weight * mean * mask).sum(1)


def _ordered(values: torch.Tensor, allowed: torch.Tensor, descending: bool):
    """Per row, the columns where ``allowed``, ordered by ``values``; and how many there are."""
    fill = float("-inf") if descending else float("inf")
    order = torch.sort(torch.where(allowed, values, torch.full_like(values, fill)), dim=1, descending=descending,
                       stable=True).indices
    return order, allowed.sum(1)


def dsnot_refine(weight: torch.Tensor, stats, spec: SparsitySpec, mask: torch.Tensor,
                 options: DSnoTOptions) -> torch.Tensor:
    """The refined mask (True = pruned) of ``weight`` (out x in) from ``mask``, same count per row
    (and per group of M for N:M)."""
    W = as_compute(weight)
    mean = stats.mean.to(W.device, W.dtype)
    var = (stats.sq_sum.to(W.device) / max(stats.tokens, 1) - mean * mean).clamp_min(1e-12)
    metric = W * mean  # what each weight adds to the output on average
    wanda = W.abs() * torch.sqrt(stats.scaler_row.to(W.device))
    mask = mask.clone().to(W.device)
    rows = torch.arange(W.shape[0], device=W.device)
    e = expected_error(W, mean, mask)
    sign0 = torch.sign(e)
    grow_score = metric / var.pow(options.dsnot_var_power)
    # Growing candidates, both ends: the most positive first (e > 0) and the most negative (e < 0).
    up, n_pruned = _ordered(grow_score, mask, descending=True)
    down, _ = _ordered(grow_score, mask, descending=False)
    if not spec.structured:  # pruning candidates: kept weights of each sign, lowest Wanda score first
        neg, n_neg = _ordered(wanda, ~mask & (metric < 0), descending=False)
        pos, n_pos = _ordered(wanda, ~mask & (metric >= 0), descending=False)
    prunable = torch.where(mask, torch.full_like(wanda, float("inf")), wanda)  # N:M: kept, not yet swapped
    ptr = torch.zeros(W.shape[0], 4, dtype=torch.long, device=W.device)  # up, down, neg, pos
    active = e.abs() > options.dsnot_threshold
    for _ in range(options.dsnot_cycles):
        if not bool(active.any()):
            break
        positive = e > 0
        g_col = torch.where(positive, 0, 1)
        grow = torch.where(positive, up[rows, ptr[:, 0].clamp(max=W.shape[1] - 1)],
                           down[rows, ptr[:, 1].clamp(max=W.shape[1] - 1)])
        valid = ptr[rows, g_col] < n_pruned
        if spec.structured:
            start = grow - grow % spec.m
            group = start.unsqueeze(1) + torch.arange(spec.m, device=W.device)
            pick = prunable.gather(1, group).argmin(1)
            cut = start + pick
            valid &= torch.isfinite(prunable[rows, cut])
        else:
            p_col = torch.where(positive, 2, 3)  # e > 0: prune a negative contribution, e < 0 a positive one
            cut = torch.where(positive, neg[rows, ptr[:, 2].clamp(max=W.shape[1] - 1)],
                              pos[rows, ptr[:, 3].clamp(max=W.shape[1] - 1)])
            valid &= ptr[rows, p_col] < torch.where(positive, n_neg, n_pos)
            ptr[rows, p_col] += 1
        ptr[rows, g_col] += 1
        after = e + metric[rows, cut] - metric[rows, grow]
        ok = active & valid & (torch.sign(after) == sign0) & (after.abs() < e.abs())
        mask[rows[ok], grow[ok]] = False
        mask[rows[ok], cut[ok]] = True
        prunable[rows[ok], cut[ok]] = float("inf")
        e = torch.where(ok, after, e)
        active = ok & (e.abs() > options.dsnot_threshold)
    return mask


def _step(weight, new, stats, spec, mask, options):
    return dsnot_refine(weight, stats, spec, mask, options), new


STEP = Step("dsnot", "refine", DSnoTOptions, _step)
