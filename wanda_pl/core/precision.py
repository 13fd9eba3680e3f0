"""The dtype statistics and solvers compute in: fp32 for every model below fp64 (a bf16 or fp16
model's statistics are never accumulated in half precision), fp64 for an fp64 model. An fp64 run
is a reference: its rounding differences between CPUs sit near 1e-16 instead of 1e-7, too small
to flip all but the nearest ties. Measured on SmolLM2-135M between torch's AVX2 and default
kernels: Wanda's masks identical (fp32: 59 of 210 layers differ), SparseGPT's 7e-4 of the weights
(fp32: 4.4e-2); a tiny model's identical for every method (the tests' bit-for-bit guard)."""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_compute(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its compute dtype (no copy when it already is)."""
    return t.to(compute_dtype(t.dtype))
