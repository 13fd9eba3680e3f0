"""Composed methods: a mask-only method, then optional steps on its result.

``--pruning.refine dsnot`` swaps weights in and out of the mask (:mod:`.dsnot`, counts kept);
``--pruning.update admm`` replaces the kept weights by ADMM's reconstruction (:mod:`.admm`). The
composed method declares the options of every step it has, so the report's ``method_options``
lists everything that was read. Methods that update their own weights (SparseGPT and the OBS
ablations) take neither: a new mask or new weights would undo their update.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..core.method import Method, unpack
from .base import Step


def compose(base: Method, refine: Optional[Step] = None, update: Optional[Step] = None) -> Method:
    """``base``, then ``refine``, then ``update``; with neither, ``base`` itself (the same masks bit for bit)."""
    steps = [s for s in (refine, update) if s is not None]
    if not steps:
        return base
    if base.needs_hessian:
        raise ValueError(f"pruning.refine / pruning.update work on the mask of a method that only chooses one "
                         f"(magnitude, wanda, ria); {base.name} updates its weights itself: use "
                         f"--pruning.refine none --pruning.update none with it (got refine="
                         f"{getattr(refine, 'name', 'none')!r}, update={getattr(update, 'name', 'none')!r})")
    bases = [s.options for s in steps]
    if not any(issubclass(cls, base.options) for cls in bases):
        bases.insert(0, base.options)
    name = base.options.__name__ + "".join(f"With{s.name.upper()}" for s in steps)
    options = dataclasses.make_dataclass(name, [], bases=tuple(bases), frozen=True)

    def composed(weight, stats, spec, opts):
        mask, new, perm = unpack(base.fn(weight, stats, spec, opts))
        if stats is None:
            raise ValueError(f"pruning.refine / pruning.update ({'+'.join(s.name for s in steps)}) need calibration "
                             f"statistics")
        for step in steps:
            mask, new = step.apply(weight, new, stats, spec, mask, opts)
        return (mask, new) if perm is None else (mask, new, perm)  # the base method's shape of result

    return Method(base.name, composed, options, needs_activations=True,
                  needs_hessian=any(s.needs_hessian for s in steps), default_granularity=base.default_granularity,
                  check=base.check)
