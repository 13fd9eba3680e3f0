"""Calibration statistics: small fp32 accumulators fed by forward hooks.

For a layer ``y = W x`` with W of shape (out, in), the input activations of a batch are
flattened to X of shape (tokens, in) by :func:`wanda_pl.core.layers.flatten_inputs` (one rule
per layer kind: Linear / HF Conv1D: all leading dims are tokens; Conv2d: unfolded patches). The accumulators keep, over calibration samples:

- ``sq_sum[j] = sum_t X[t, j]^2`` -> Wanda's ``scaler_row = sq_sum / nsamples``,
- optionally ``xtx = X^T X``     -> SparseGPT's Hessian ``H = 2 * xtx / nsamples``,
- ``col_sum[j] = sum_t X[t, j]`` and ``tokens`` -> the input mean, for bias correction,

where ``nsamples`` counts calibration sequences (images), as the reference does.
:meth:`LayerStats.centered` gives the same statistics about the mean instead of about zero.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .precision import compute_dtype


@dataclass
class LayerStats:
    """Running input statistics of one prunable layer."""

    in_features: int
    with_hessian: bool = False
    nsamples: int = 0
    sq_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    xtx: Optional[torch.Tensor] = None
    col_sum: torch.Tensor = field(default=None)  # type: ignore[assignment]
    tokens: int = 0

    def __post_init__(self) -> None:
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(self.in_features, dtype=torch.float32)
        if self.col_sum is None:
            self.col_sum = torch.zeros(self.in_features, dtype=torch.float32)

    def update(self, x: torch.Tensor, nsamples: int) -> None:
        """Add a (tokens, in) block of activations (fp32, or fp64 from an fp64 model) coming from ``nsamples`` sequences/images."""
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                "non-finite calibration activations (NaN/Inf) reached a prunable layer; "
                "check the model dtype (fp16 overflows on some models: use float32 or bfloat16) and the input data"
            )
        dtype = compute_dtype(x.dtype)  # fp64 activations (an fp64 model) keep fp64 sums
        if self.sq_sum.device != x.device or self.sq_sum.dtype != dtype:
            self.sq_sum = self.sq_sum.to(x.device, dtype)
            self.col_sum = self.col_sum.to(x.device, dtype)
        x = x.to(dtype)
        self.sq_sum += (x * x).sum(dim=0)
        self.col_sum += x.sum(dim=0)
        self.tokens += x.shape[0]
        if self.with_hessian:
            if self.xtx is None:
                self.xtx = torch.zeros(self.in_features, self.in_features, dtype=dtype, device=x.device)
            self.xtx.addmm_(x.t(), x)
        self.nsamples += nsamples

    @property
    def scaler_row(self) -> torch.Tensor:
        """Mean over samples of the squared input norm per input column (the reference's ``scaler_row``)."""
        return self.sq_sum / max(self.nsamples, 1)

    @property
    def mean(self) -> torch.Tensor:
        """The mean input per column over every calibration token (pixel, patch)."""
        if self.tokens == 0:
            raise ValueError("no calibration activations were recorded for this layer")
        return self.col_sum / self.tokens

    def centered(self) -> "LayerStats":
        """These statistics about the input mean: ``sum_t (X[t, j] - mean_j)^2`` and the covariance
        sum ``(X - mean)^T (X - mean)``, same ``nsamples``. With bias correction the mean part of a
        pruned weight's contribution is restored exactly, so what a method should weigh is the
        fluctuation around the mean, not the raw second moment."""
        mean = self.mean
        sq = (self.sq_sum - self.tokens * mean * mean).clamp_min(0)  # fp32 cancellation can dip below 0
        xtx = None if self.xtx is None else self.xtx - self.tokens * torch.outer(mean, mean)
        return LayerStats(self.in_features, self.with_hessian, self.nsamples, sq, xtx, self.col_sum, self.tokens)

    @property
    def hessian(self) -> torch.Tensor:
        """``H = (2 / nsamples) X^T X``, SparseGPT's layer Hessian, fp32."""
        if self.xtx is None:
            raise ValueError("this method needs the Hessian but it was not collected (with_hessian=False)")
        return self.xtx * (2.0 / max(self.nsamples, 1))
