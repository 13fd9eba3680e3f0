"""Options several methods share (which scores compete for the cut, SparseGPT's solver settings) and
what a step after a method is. (What a method is, the protocol the engine calls, lives in :mod:`wanda_pl.core.method`.)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from ..core.method import option
from ..core.sparsity import GRANULARITIES, SparsitySpec


def _check_granularity(granularity: Optional[str]) -> None:
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"pruning.granularity must be one of {GRANULARITIES} or unset, got {granularity!r}")


@dataclass(frozen=True)
class MaskOptions:
    """Which scores compete for the cut."""

    granularity: Optional[str] = option(None, "comparison group, ``row`` or ``layer`` (unset: the method's default).")

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)


@dataclass(frozen=True)
class SolverOptions:
    """SparseGPT's column block size and damping."""

    blocksize: int = option(128, "SparseGPT's column block size.")
    percdamp: float = option(0.01, "SparseGPT's damping, a fraction of the Hessian's mean diagonal.")

    def __post_init__(self) -> None:
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"pruning.blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise ValueError(f"pruning.percdamp must be >= 0, got {self.percdamp}")


# (original weight, the weight so far or None, stats, spec, mask, options) -> (mask, new weight or None)
StepFn = Callable[[torch.Tensor, Optional[torch.Tensor], Any, SparsitySpec, torch.Tensor, Any],
                  Tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class Step:
    """A step after a mask-only method's mask (:mod:`.compose`): a ``refine`` changes the mask (the
    count kept), an ``update`` replaces the kept weights."""

    name: str
    kind: str  # "refine" or "update"
    options: type
    apply: StepFn
    needs_hessian: bool = False
