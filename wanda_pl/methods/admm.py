"""ADMM weight reconstruction (Boza, TMLR'24, "Fast and effective weight update for pruned LLMs").

For a layer with inputs X (tokens x in) and weight W (out x in), the weights that best reproduce
the dense outputs on a mask solve ``min ||X (W - W')^T||^2`` with W' zero on the mask. ADMM
splits it into a ridge least-squares step and a projection onto the mask:

    W <- (W0 G + rho (Z - U)) (G + rho I)^-1,   Z <- keep * (W + U),   U <- U + W - Z

in the scaled space where the inputs have unit norm: ``D = sqrt(diag X^T X)``, ``G = D^-1 X^T X
D^-1 + damp I`` (damping ``percdamp`` x its mean diagonal), weights ``W D``. One inverse per
layer and two matmuls per iteration. The result is Z (exactly zero on the mask), unscaled.

Two uses: ``--pruning.update admm`` after any mask-only method (the mask stays as chosen), and
the method ``admm`` whose mask is chosen gradually from ``|W + U|`` (in the scaled space that is
Wanda's score of the current weights) on a cubic schedule over the first ``admm_gradual``
iterations (at most all of them), reaching the target sparsity there and keeping it fixed after.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.precision import as_compute, compute_dtype
from ..core.sparsity import SparsitySpec, lowest, nm_mask, select_mask
from ..core.method import Method, option
from .base import MaskOptions, Step


@dataclass(frozen=True)
class ADMMOptions(MaskOptions):
    """ADMM's iterations, penalty, damping, and (the ``admm`` method) the gradual mask's length."""

    admm_iterations: int = option(20, "ADMM's iterations (>= 1).")
    admm_rho: float = option(1.0, "ADMM's penalty.")
    admm_percdamp: float = option(0.1, "ADMM's damping (of the scaled X^T X).")
    admm_gradual: int = option(15, "for the ``admm`` method, the iterations its gradual mask takes.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.admm_iterations, int) or self.admm_iterations < 1:
            raise ValueError(f"pruning.admm_iterations must be an integer >= 1, got {self.admm_iterations!r}")
        if not self.admm_rho > 0:
            raise ValueError(f"pruning.admm_rho must be > 0, got {self.admm_rho!r}")
        if not self.admm_percdamp >= 0:
            raise ValueError(f"pruning.admm_percdamp must be >= 0, got {self.admm_percdamp!r}")
        if not isinstance(self.admm_gradual, int) or self.admm_gradual < 1:
            raise ValueError(f"pruning.admm_gradual must be an integer >= 1, got {self.admm_gradual!r}")


def _scaled(weight: torch.Tensor, xtx: torch.Tensor, options: ADMMOptions):
    """(W D, (G + rho I)^-1, W D G, D) for the scaled problem."""
    xtx = xtx.to(device=weight.device, dtype=compute_dtype(weight.dtype))
    norm = torch.diagonal(xtx).clamp_min(0).sqrt() + 1e-8
    G = xtx / norm / norm.unsqueeze(1)
    G.diagonal().add_(options.admm_percdamp * float(torch.diagonal(G).mean()))
    W = as_compute(weight) * norm
    target = W @ G
    G.diagonal().add_(options.admm_rho)
    return W, torch.linalg.inv(G), target, norm


def _iterate(W, inverse, target, rho, keep_of, iterations):
    U = torch.zeros_like(W)
    keep = None
    for it in range(iterations):
        keep = keep_of(it, W + U, keep)
        Z = (W + U) * keep
        U += W - Z
        W = (target + rho * (Z - U)) @ inverse
    keep = keep_of(iterations, W + U, keep)
    return (W + U) * keep, keep


def admm_update(weight: torch.Tensor, xtx: torch.Tensor, mask: torch.Tensor, options: ADMMOptions) -> torch.Tensor:
    """The weights on ``mask`` (True = pruned) that best reproduce ``weight``'s outputs for inputs of
    second moment ``xtx`` (X^T X, any positive scale): fp32, exactly zero on the mask."""
    W, inverse, target, norm = _scaled(weight, xtx, options)
    keep = ~mask.to(W.device)
    Z, _ = _iterate(W, inverse, target, options.admm_rho, lambda it, cur, prev: keep, options.admm_iterations)
    return Z / norm


def _gradual_mask(score: torch.Tensor, spec: SparsitySpec, fraction: float, granularity: str) -> torch.Tensor:
    """The mask ``fraction`` (0..1] of the way to ``spec``: N:M prunes the lowest share of each
    group's N candidates over the layer; unstructured the ratio ``fraction * s`` as selected."""
    if spec.structured:
        candidates = nm_mask(score, spec.n, spec.m)
        k = int(round(candidates.sum().item() * fraction))
        return lowest(torch.where(candidates, score, torch.full_like(score, float("inf"))), k) & candidates
    return select_mask(score, SparsitySpec(spec.ratio * fraction), granularity)


def admm(weight, stats, spec, options: ADMMOptions):
    """The ``admm`` method: gradual mask and ADMM reconstruction together."""
    if stats is None:
        raise ValueError("admm needs calibration statistics")
    W, inverse, target, norm = _scaled(weight, stats.xtx, options)
    granularity = options.granularity or "row"
    steps = min(options.admm_gradual, options.admm_iterations)  # the target reached by the last iteration

    def keep_of(it: int, current: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        if it >= steps and previous is not None:
            return previous  # the target reached: the mask stays
        fraction = 1 - (1 - min(it + 1, steps) / steps) ** 3
        return ~_gradual_mask(current.abs(), spec, fraction, granularity)

    Z, keep = _iterate(W, inverse, target, options.admm_rho, keep_of, options.admm_iterations)
    return ~keep, Z / norm


METHOD = Method("admm", admm, ADMMOptions, needs_hessian=True, default_granularity="row")


def _step(weight, new, stats, spec, mask, options):
    return mask, admm_update(weight if new is None else new, stats.xtx, mask, options)


STEP = Step("admm", "update", ADMMOptions, _step, needs_hessian=True)
