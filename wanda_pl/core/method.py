"""What a pruning method is, as the engine sees it: one layer's weight and statistics in, a mask (and
for solvers new weights) out, with the options the method declares as a small frozen dataclass.

The protocol lives in core so that the engine depends on nothing above it; the methods themselves
(:mod:`wanda_pl.methods`) implement it. An option field says what it is for with :func:`option`:
the command line shows that text, so a method's options are documented where they are declared."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .sparsity import SparsitySpec
from .stats import LayerStats


def option(default: Any, doc: str) -> Any:
    """A method option: its default and the help text ``--pruning.<name>`` shows."""
    return field(default=default, metadata={"doc": doc})


def option_doc(f: dataclasses.Field) -> str:
    return f.metadata.get("doc", "")


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


# (weight (out x in), stats or None, spec, the method's options) -> (mask, new weight or None), or
# (mask, new weight or None, perm) where the mask is N:M only in the input-column order ``perm`` (RIA's
# channel permutation): a 2:4 kernel needs that order, so the engine keeps it (PruneResult.permutations).
PruneFn = Callable[[torch.Tensor, Optional[LayerStats], SparsitySpec, Any], Tuple[torch.Tensor, ...]]
# (the method's options, the run's sparsity, the refinement step or "none") -> raises what cannot be
CheckFn = Callable[[Any, SparsitySpec, str], None]


def unpack(out: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A method's return value as (mask, new weight or None, input-column permutation or None)."""
    mask, new, *perm = out
    return mask, new, perm[0] if perm else None


@dataclass(frozen=True)
class Method:
    name: str
    fn: PruneFn
    options: type = NoOptions  # the dataclass of this method's options
    needs_activations: bool = True
    needs_hessian: bool = False
    default_granularity: str = "row"
    check: Optional[CheckFn] = None  # what its options cannot take beside the run's other settings

    @property
    def option_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options))

    def make_options(self, **values: Any) -> Any:
        """This method's options from a pool of option values (the CLI gives every method's): the
        ones it declares are taken and validated, the others are not its business."""
        return self.options(**{k: v for k, v in values.items() if k in self.option_names})

    def describe_options(self, options: Any) -> Dict[str, Any]:
        return dataclasses.asdict(options)

    def __call__(self, weight, stats, spec, options=None):
        return self.fn(weight, stats, spec, self.options() if options is None else options)
