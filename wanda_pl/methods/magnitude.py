"""Magnitude pruning: score ``|W|``, one threshold per layer by default (the paper's baseline)."""
from __future__ import annotations

from ..core.sparsity import select_mask
from ..core.method import Method
from .base import MaskOptions


def magnitude(weight, stats, spec, options: MaskOptions):
    return select_mask(weight.abs(), spec, options.granularity or "layer"), None


METHOD = Method("magnitude", magnitude, MaskOptions, needs_activations=False, default_granularity="layer")
