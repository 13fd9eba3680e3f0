"""What a pruning method is: one layer's weight and statistics in, a mask (and for solvers new
weights) out, plus the knobs the method declares as a small frozen dataclass of its own."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..core.sparsity import GRANULARITIES, SparsitySpec
from ..core.stats import LayerStats


def _check_granularity(granularity: Optional[str]) -> None:
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"pruning.granularity must be one of {GRANULARITIES} or unset, got {granularity!r}")


@dataclass(frozen=True)
class NoOptions:
    """A method without knobs."""


@dataclass(frozen=True)
class MaskOptions:
    """Which scores compete for the cut: ``row`` or ``layer`` (None: the method's default)."""

    granularity: Optional[str] = None

    def __post_init__(self) -> None:
        _check_granularity(self.granularity)


@dataclass(frozen=True)
class SolverOptions:
    """SparseGPT's column block size and damping (a fraction of the Hessian's mean diagonal)."""

    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"pruning.blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise ValueError(f"pruning.percdamp must be >= 0, got {self.percdamp}")


# (weight (out x in, fp32), stats or None, spec, the method's options) -> (mask, new weight or None), or
# (mask, new weight or None, perm) where the mask is N:M only in the input-column order ``perm`` (RIA's
# channel permutation): a 2:4 kernel needs that order, so the engine keeps it (PruneResult.permutations).
PruneFn = Callable[[torch.Tensor, Optional[LayerStats], SparsitySpec, Any], Tuple[torch.Tensor, ...]]


def unpack(out: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A method's return value as (mask, new weight or None, input-column permutation or None)."""
    mask, new, *perm = out
    return mask, new, perm[0] if perm else None


@dataclass(frozen=True)
class Method:
    name: str
    fn: PruneFn
    options: type = NoOptions  # the dataclass of this method's knobs
    needs_activations: bool = True
    needs_hessian: bool = False
    default_granularity: str = "row"

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def make_options(self, **values: Any) -> Any:
        """This method's options from a pool of knob values (the CLI gives every knob): the ones it
        declares are taken and validated, the others are not its business."""
        return self.options(**{k: v for k, v in values.items() if k in self.option_names})

    def describe_options(self, options: Any) -> Dict[str, Any]:
        return dataclasses.asdict(options)

    def __call__(self, weight, stats, spec, options=None):
        return self.fn(weight, stats, spec, self.options() if options is None else options)
