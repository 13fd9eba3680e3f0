"""Layer kinds: how a prunable layer's weight is an (out, in) matrix, how its inputs become
(tokens, in) rows, and how a matrix-shaped mask maps back onto its parameter.

Everything that prunes or calibrates goes through these few functions, so a new kind of layer
is one file here plus one entry in ``KINDS`` (the first kind that claims a module wins).
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .base import LayerKind
from .conv1d import CONV1D
from .conv2d import CONV2D
from .experts import EXPERT, expert_slices, is_fused_experts
from .linear import LINEAR

KINDS = (CONV1D, CONV2D, LINEAR, EXPERT)


def kind_of(module: nn.Module) -> Optional[LayerKind]:
    return next((k for k in KINDS if k.claims(module)), None)


def _kind(module: nn.Module) -> LayerKind:
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a prunable layer kind ({', '.join(k.name for k in KINDS)})")
    return kind


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The (out, in) view of a prunable module's weight, sharing storage with it."""
    return _kind(module).matrix(module)


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def flatten_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input activations of ``module`` as (tokens, in_features) in fp32."""
    return _kind(module).flatten(module, x)


def param_mask(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A mask over ``weight_matrix(module)`` shaped like ``module.weight``."""
    return _kind(module).to_param(module, mask)


def is_prunable(module: nn.Module, convs: bool = False) -> bool:
    """A layer of a known kind; convolutions only when ``convs`` (and never grouped / depthwise)."""
    kind = kind_of(module)
    return kind is not None and kind.prunable(module) and (convs or not kind.conv)


def select_targets(
    root: nn.Module,
    prefix: str = "",
    targets: Optional[Sequence[str]] = None,
    ignore: Sequence[str] = (),
    convs: bool = False,
) -> Dict[str, nn.Module]:
    """Prunable modules under ``root`` keyed by full name (``prefix.name``).

    ``targets``: regexes a name must match (``re.search``; None = every prunable layer but routers'
    and gates' one-output projections); ``ignore``: regexes that exclude a name. Depthwise/grouped
    convolutions never qualify. Fused MoE experts give one target per expert and fused parameter
    (``...experts.gate_up_proj.3``, :mod:`.experts`)."""
    convs = convs or (targets is not None and any("conv" in t.lower() for t in targets))
    found: Dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        candidates = expert_slices(module, full) if is_fused_experts(module) else \
            {full: module} if is_prunable(module, convs) else {}
        for full, module in candidates.items():
            if targets is None and weight_matrix(module).shape[0] == 1:
                continue  # a gate's single output (Qwen2-MoE's shared_expert_gate): a router, not a layer
            if targets is not None and not any(re.search(t, full) for t in targets):
                continue
            if any(re.search(i, full) for i in ignore):
                continue
            found[full] = module
    return found


def fused_slice(network: nn.Module, name: str) -> Optional[Tuple[str, int]]:
    """(the fused parameter's name, the expert) when the target ``name`` is an expert's slice
    (``<experts>.<fused parameter>.<expert>``), else None."""
    try:
        network.get_submodule(name)
        return None
    except AttributeError:
        owner, param, index = name.rsplit(".", 2)
        return f"{owner}.{param}", int(index)


def weight_of(network: nn.Module, name: str) -> torch.Tensor:
    """The weight (a view, for an expert's slice) of the target ``name`` of ``network``."""
    fused = fused_slice(network, name)
    return network.get_submodule(name).weight if fused is None else network.get_parameter(fused[0])[fused[1]]


def parameter_of(target) -> nn.Parameter:
    """The parameter a target's weight lives in (an expert's slice: the whole fused parameter)."""
    return getattr(target, "source", None) if hasattr(target, "source") else target.weight
