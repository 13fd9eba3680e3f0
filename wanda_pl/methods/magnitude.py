"""Magnitude pruning: score ``|W|``, one threshold per layer by default (the paper's baseline)."""
from __future__ import annotations

from ..core.sparsity import select_mask
from . import Method, register


def magnitude(weight, stats, spec, options):
    gran = options.granularity or "layer"
    return select_mask(weight.abs(), spec, gran, options.use_variant), None


register(Method("magnitude", magnitude, needs_activations=False, default_granularity="layer"))
