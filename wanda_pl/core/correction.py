"""Bias correction: give a pruned layer back the mean output it lost.

Pruning ``W`` to ``W'`` moves the layer's mean output by ``(W - W') E[x]`` for every output; on a
small conv net this drift, compounded through BatchNorm and residual adds, is most of the damage
(EfficientNet-Lite0 at 50%: see benchmarks/results/vision_prune.md). The shift is a constant per
output, so it is restored exactly at no inference cost: added to the layer's own bias, or, for a
bias-free convolution feeding a BatchNorm, subtracted from that BatchNorm's running mean. The model
keeps its architecture and state-dict keys, so a saved model loads into its stock class.

With the mean restored, what remains of a pruned weight's error is its fluctuation around the mean,
so the methods are given statistics about the mean (:meth:`LayerStats.centered`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .hooks import removing
from .precision import compute_dtype


def output_shift(old_weight: torch.Tensor, new_weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``E[W x] - E[W' x]`` per output for (out, in) weights and the mean input ``mean``."""
    dtype = compute_dtype(old_weight.dtype)
    return (old_weight.to(dtype) - new_weight.to(dtype)) @ mean.to(old_weight.device, dtype)


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def _is_sink_norm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm) and module.running_mean is not None


def check_possible(targets: Dict[str, nn.Module], scopes: Sequence[nn.Module]) -> None:
    """Fail before pruning when some layers have no bias and no BatchNorm exists that could take their shift."""
    missing = [name for name, m in targets.items() if not _has_bias(m)]
    if missing and not any(_is_sink_norm(m) for scope in scopes for m in scope.modules()):
        raise ValueError(
            f"bias_correction needs each pruned layer to have a bias or to feed a BatchNorm; {len(missing)} "
            f"layers have no bias and feed no BatchNorm (e.g. {', '.join(missing[:3])}). Turn "
            "pruning.bias_correction off for this model (LLaMA-style linears have no bias), or exclude those "
            "layers with ignore patterns."
        )


@contextmanager
def find_sinks(scope: nn.Module, targets: Dict[str, nn.Module]) -> Iterator[Dict[str, nn.Module]]:
    """While ``scope`` runs, find where each target's output shift can go: the target itself when it
    has a bias, else the BatchNorm (inside ``scope``) whose input is exactly the target's output.

    Yields ``{target name: sink module}``, filled by the forward passes run inside the context.
    """
    sinks: Dict[str, nn.Module] = {name: m for name, m in targets.items() if _has_bias(m)}
    last_output: Dict[str, torch.Tensor] = {}  # a reference keeps the tensor (and its identity) alive
    handles: List = []

    for name, module in targets.items():
        if name in sinks:
            continue

        def record(_mod, _inputs, output, _name=name):
            if _name not in sinks and isinstance(output, torch.Tensor):
                last_output[_name] = output

        handles.append(module.register_forward_hook(record))

    def match(norm, args):
        if not args:
            return
        for name, out in list(last_output.items()):
            if args[0] is out:
                sinks[name] = norm
                del last_output[name]

    for module in scope.modules():
        if _is_sink_norm(module):
            handles.append(module.register_forward_pre_hook(match))
    try:
        with removing(handles):
            yield sinks
    finally:
        last_output.clear()


def require_sinks(targets: Dict[str, nn.Module], sinks: Dict[str, nn.Module]) -> None:
    missing = [name for name in targets if name not in sinks]
    if missing:
        raise ValueError(
            f"bias_correction: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} has no bias and its "
            "output does not go straight into a BatchNorm, so there is nowhere to put its mean shift; exclude "
            "it with ignore patterns or turn pruning.bias_correction off"
        )


@torch.no_grad()
def apply_shift(module: nn.Module, sink: nn.Module, shift: torch.Tensor) -> None:
    """Add ``shift`` to ``module``'s output: to its bias, or before the BatchNorm ``sink``."""
    if sink is module:
        module.bias.add_(shift.to(module.bias.device, module.bias.dtype))
    else:
        # BN(y + c) in eval mode == BN(y) with running_mean - c
        sink.running_mean.sub_(shift.to(sink.running_mean.device, sink.running_mean.dtype))
