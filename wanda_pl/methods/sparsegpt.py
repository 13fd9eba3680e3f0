"""SparseGPT (Frantar & Alistarh, 2023, arXiv 2301.00774): prune and OBS-update one layer.

Rule: walk the input columns left to right; zero column i's pruned weights and spread the
error ``(w_i - q_i) / U_ii`` over the later columns along row i of ``U``, the upper Cholesky
factor of ``H^-1`` (the sequential OBS update), so that ``W X^T`` moves as little as possible.

Shapes: weight ``W`` (out x in), Hessian ``H = (2 / nsamples) X^T X`` (in x in) for the layer's
inputs ``X`` (tokens x in). Columns go in blocks of ``blocksize``; later blocks get their
updates lazily, one matmul per block.

Mask choice (unstructured): per block, the lowest ``W^2 / diag(U)^2`` scores of the block with
one threshold, selected by index so the counts are exact. The block budgets are the
differences of ``int(rows * c * ratio)`` at the block's column bounds ``c``, so they add up to
exactly ``int(numel * ratio)`` for any blocksize; when ``rows * blocksize * ratio`` is integral
and blocksize divides ``in`` every block prunes exactly ``int(block_numel * ratio)``, as in the
reference. N:M: at every column ``i`` with ``i % M == 0``, each row prunes its N lowest scores
of columns ``i .. i+M-1`` (the blocksize is rounded down to a multiple of M, so no group
straddles two blocks).

Dead input columns (``diag(H) == 0``, the input is always zero there) are zeroed in the weight,
as in the reference, and the returned mask always includes them: the mask is exactly the set of
positions this function forces to zero. Their weights score 0, so they take part of a block's
budget; when more dead weights exist than the budget, the layer ends up sparser than asked.

``mask=`` fixes the mask beforehand and only the OBS updates run; ``iter_score=`` rescores the
*updated* weights at every block (unstructured) or every group of M columns (N:M) with another
criterion: the Wanda paper's ablations (:mod:`wanda_pl.methods.ablations`) are built from these.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Tuple

import torch

from ..core.precision import compute_dtype
from ..core.sparsity import SparsitySpec, lowest, nm_mask
from ..core.method import Method
from .base import SolverOptions

log = logging.getLogger(__name__)

# (current weights of the columns being chosen from, their column slice in the layer) -> score
IterScore = Callable[[torch.Tensor, slice], torch.Tensor]

# percdamp, then 10x more on each failure: 1e-2 .. 1e3 of the mean diagonal by default.
DAMP_TRIES = 6
# With percdamp=0 a retry must still add something; this is the smallest relative damping tried.
MIN_RETRY_DAMP = 1e-4


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
    # TF32 matmuls lose ~3 decimal digits, enough to visibly perturb the OBS updates; the reference
    # turns TF32 off for the same reason. Restore the caller's setting afterwards.
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01) -> Tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` (so ``U^T U = (H + damp I)^-1``), and ``damp``.

    ``damp = percdamp * mean(diag H)``. A Hessian that is still not positive definite (rank-deficient
    calibration data, fp32 round-off) is retried with 10x the relative damping, with a warning."""
    diag_mean = float(torch.diagonal(H).mean())
    rel = float(percdamp)
    damp = tried = 0.0
    for attempt in range(DAMP_TRIES):
        damp, tried = rel * diag_mean, rel
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            # Factoring H^-1 again (rather than inverting L) gives the upper factor whose row i is
            # the OBS update direction of column i once columns < i have been eliminated.
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    log.warning("SparseGPT: using damping %.4g (%.3g x mean diag(H)) instead of percdamp=%g", damp, rel, percdamp)
                return U, damp
        new_rel = max(rel * 10.0, MIN_RETRY_DAMP)
        if attempt + 1 < DAMP_TRIES:
            log.warning(
                "SparseGPT: Hessian is not positive definite with damping %.4g (%.3g x mean diag(H)); "
                "retrying with %.3g x mean diag(H)", damp, rel, new_rel)
        rel = new_rel
    raise RuntimeError(
        f"SparseGPT: the Hessian is not positive definite even with damping {damp:.4g} ({tried:.3g} x mean diag(H) "
        f"{diag_mean:.4g}); the calibration statistics of this layer are unusable (check for degenerate inputs)"
    )


def _check_score(score: torch.Tensor, shape) -> torch.Tensor:
    if tuple(score.shape) != tuple(shape):
        raise ValueError(f"iter_score returned shape {tuple(score.shape)}, expected {tuple(shape)}")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("iter_score returned NaN or Inf scores")
    return score


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = 128,
    percdamp: float = 0.01,
    mask: Optional[torch.Tensor] = None,
    iter_score: Optional[IterScore] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` (out x in) with SparseGPT given the Hessian ``H`` (in x in).

    Returns ``(mask, W_new)``: ``mask`` (bool, True = pruned) is the chosen mask (or the given
    ``mask``) OR the dead input columns; ``W_new`` is a new fp32 tensor, zero exactly on ``mask``
    (up to weights that were zero already) with the remaining weights OBS-updated. ``W`` and ``H``
    are not modified."""
    if W.dim() != 2:
        raise ValueError(f"SparseGPT needs a 2-D weight (out x in), got shape {tuple(W.shape)}")
    rows, cols = W.shape
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's input width {cols}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if mask is not None and iter_score is not None:
        raise ValueError("give either a fixed mask or an iter_score, not both")
    if mask is not None:
        if tuple(mask.shape) != (rows, cols) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape {(rows, cols)}, got {mask.dtype} {tuple(mask.shape)}")
    else:
        spec.check_width(cols)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("SparseGPT: the weight contains NaN or Inf")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("SparseGPT: the Hessian contains NaN or Inf (non-finite calibration activations?)")

    device = W.device
    with _no_tf32(device):
        dtype = compute_dtype(W.dtype)
        W = W.detach().to(dtype=dtype, copy=True)
        H = H.detach().to(device=device, dtype=dtype, copy=True)
        # An input that is always zero leaves H singular; its weights never affect the output, so
        # they are dropped and the column is made an isolated unit pivot.
        dead = torch.diagonal(H) == 0
        H.diagonal()[dead] = 1.0
        W[:, dead] = 0.0
        Hinv, _ = inverse_hessian_factor(H, percdamp)
        del H

        nm = spec.structured and mask is None
        bs = max(spec.m, blocksize - blocksize % spec.m) if nm else blocksize
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)

            if mask is not None:
                mask1 = mask[:, i1:i2].to(device)
            elif nm:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            else:
                k = int(rows * i2 * spec.ratio) - int(rows * i1 * spec.ratio)
                if iter_score is not None:
                    score = _check_score(iter_score(W1, slice(i1, i2)), W1.shape)
                else:
                    # OBS saliency w^2 / [H^-1]_ii, with [H^-1]_ii taken after eliminating earlier columns.
                    score = W1.pow(2) / d.pow(2).unsqueeze(0)
                mask1 = lowest(score, k)

            for i in range(i2 - i1):
                if nm and i % spec.m == 0:
                    g = slice(i, i + spec.m)
                    if iter_score is not None:
                        score = _check_score(iter_score(W1[:, g], slice(i1 + i, i1 + i + spec.m)), W1[:, g].shape)
                    else:
                        score = W1[:, g].pow(2) / d[g].pow(2).unsqueeze(0)
                    mask1[:, g] = nm_mask(score, spec.n, spec.m)
                w = W1[:, i]
                q = torch.where(mask1[:, i], torch.zeros_like(w), w)
                Q1[:, i] = q
                err = (w - q) / d[i]
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err

            W[:, i1:i2] = Q1
            pruned[:, i1:i2] = mask1
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        # Exact zeros already, since U is block-diagonal around a dead column; made explicit here.
        W[:, dead] = 0.0
        pruned[:, dead] = True

    if not bool(torch.isfinite(W).all()):
        raise FloatingPointError(
            f"SparseGPT produced non-finite weights (percdamp={percdamp}); the Hessian is too ill-conditioned: "
            "raise percdamp or use more calibration samples"
        )
    return pruned, W


def hessian(stats, name: str) -> torch.Tensor:
    if stats is None:
        raise ValueError(f"{name} needs calibration statistics with the Hessian")
    return stats.hessian


def sparsegpt(weight, stats, spec, options: SolverOptions):
    return sparsegpt_prune(weight, hessian(stats, "sparsegpt"), spec, options.blocksize, options.percdamp)


METHOD = Method("sparsegpt", sparsegpt, SolverOptions, needs_hessian=True)
