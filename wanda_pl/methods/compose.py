"""Composed methods: a mask-only method followed by a weight update (``--pruning.update``).

``wanda`` + ``admm`` keeps Wanda's mask and replaces the kept weights by ADMM's reconstruction
(:mod:`.admm`). The composed method declares the options of both steps, so the report's
``method_options`` lists everything either step read. Methods that update their own weights
(SparseGPT and the OBS ablations) keep their own update.
"""
from __future__ import annotations

import dataclasses

from .admm import ADMMOptions, admm_update
from .base import Method

UPDATES = ("none", "admm")


def with_update(base: Method, update: str = "none") -> Method:
    """``base`` followed by ``update``; ``none`` is ``base`` itself (bit for bit the same masks)."""
    if update not in UPDATES:
        raise ValueError(f"pruning.update must be one of {UPDATES}, got {update!r}")
    if update == "none":
        return base
    if base.needs_hessian:
        raise ValueError(f"pruning.update {update!r} reconstructs the weights after a method that only chooses a "
                         f"mask (magnitude, wanda, ria); {base.name} updates its weights itself: use "
                         f"--pruning.update none, or a mask-only method")
    bases = (ADMMOptions,) if issubclass(ADMMOptions, base.options) else (base.options, ADMMOptions)
    options = dataclasses.make_dataclass(f"{base.options.__name__}With{update.upper()}", [], bases=bases, frozen=True)

    def masked_then_updated(weight, stats, spec, opts):
        mask, new = base.fn(weight, stats, spec, opts)
        if stats is None or stats.xtx is None:
            raise ValueError(f"pruning.update {update!r} needs the layer's input second moments (X^T X)")
        return mask, admm_update(weight if new is None else new, stats.xtx, mask, opts)

    return Method(base.name, masked_then_updated, options, needs_activations=True, needs_hessian=True,
                  default_granularity=base.default_granularity)
