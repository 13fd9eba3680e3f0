"""Pruning methods: a plain dict registry from name to :class:`Method`.

A method turns one layer's weight (out x in, fp32) and its calibration statistics into a
pruning mask (True = prune) and, for solvers like SparseGPT, updated weights. Adding a
method is one file that calls :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..core.sparsity import SparsitySpec
from ..core.stats import LayerStats


@dataclass(frozen=True)
class PruneOptions:
    """Per-run knobs a method may read; plain values so they fit a CLI."""

    granularity: Optional[str] = None  # None: the method's own default
    use_variant: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    bias_correction: bool = False  # read by the engine: centred statistics, mean shift restored


# (weight, stats, spec, options) -> (mask, new weight or None)
PruneFn = Callable[[torch.Tensor, Optional[LayerStats], SparsitySpec, PruneOptions], Tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class Method:
    name: str
    fn: PruneFn
    needs_activations: bool = True
    needs_hessian: bool = False
    default_granularity: str = "row"
    supports_variant: bool = False

    def __call__(self, weight, stats, spec, options=PruneOptions()):
        return self.fn(weight, stats, spec, options)


METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load()
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_names():
    _load()
    return sorted(METHODS)


def _load() -> None:
    from . import magnitude, wanda  # noqa: F401
    try:
        from . import sparsegpt  # noqa: F401
    except ImportError:  # pragma: no cover - while sparsegpt is being written
        pass
