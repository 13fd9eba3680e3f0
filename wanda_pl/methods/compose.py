"""Composed methods: a mask-only method, then optional steps on its result.

``--pruning.refine dsnot`` swaps weights in and out of the mask (:mod:`.dsnot`, counts kept);
``--pruning.update admm`` replaces the kept weights by ADMM's reconstruction (:mod:`.admm`). The
composed method declares the options of every step it has, so the report's ``method_options``
lists everything that was read. Methods that update their own weights (SparseGPT and the OBS
ablations) take neither: a new mask or new weights would undo their update.
"""
from __future__ import annotations

import dataclasses

from .admm import ADMMOptions, admm_update
from .base import Method, unpack
from .dsnot import DSnoTOptions, dsnot_refine

REFINES = ("none", "dsnot")
UPDATES = ("none", "admm")
STEP_OPTIONS = (DSnoTOptions, ADMMOptions)  # knobs of the steps, checked like the methods' own


def compose(base: Method, refine: str = "none", update: str = "none") -> Method:
    """``base``, then ``refine``, then ``update``; with neither, ``base`` itself (the same masks bit for bit)."""
    if refine not in REFINES:
        raise ValueError(f"pruning.refine must be one of {REFINES}, got {refine!r}")
    if update not in UPDATES:
        raise ValueError(f"pruning.update must be one of {UPDATES}, got {update!r}")
    steps = [(name, cls) for name, cls in ((refine, DSnoTOptions), (update, ADMMOptions)) if name != "none"]
    if not steps:
        return base
    if base.needs_hessian:
        raise ValueError(f"pruning.refine / pruning.update work on the mask of a method that only chooses one "
                         f"(magnitude, wanda, ria); {base.name} updates its weights itself: use "
                         f"--pruning.refine none --pruning.update none with it (got refine={refine!r}, "
                         f"update={update!r})")
    bases = [cls for _, cls in steps]
    if not any(issubclass(cls, base.options) for cls in bases):
        bases.insert(0, base.options)
    name = base.options.__name__ + "".join(f"With{n.upper()}" for n, _ in steps)
    options = dataclasses.make_dataclass(name, [], bases=tuple(bases), frozen=True)

    def composed(weight, stats, spec, opts):
        mask, new, perm = unpack(base.fn(weight, stats, spec, opts))
        if stats is None:
            raise ValueError(f"pruning.refine={refine!r} / pruning.update={update!r} need calibration statistics")
        if refine == "dsnot":
            mask = dsnot_refine(weight, stats, spec, mask, opts)
        if update == "admm":
            new = admm_update(weight if new is None else new, stats.xtx, mask, opts)
        return (mask, new) if perm is None else (mask, new, perm)  # the base method's shape of result

    return Method(base.name, composed, options, needs_activations=True, needs_hessian=update == "admm",
                  default_granularity=base.default_granularity)
