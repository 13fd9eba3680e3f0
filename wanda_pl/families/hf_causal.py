"""Where the blocks and the prunable layers of a model are.

Architecture knowledge lives here and only here. Causal LMs: the decoder blocks are the
``nn.ModuleList`` holding most of the parameters (Llama/Mistral/Qwen2 ``model.layers``,
GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, GPT-NeoX ``gpt_neox.layers`` ...):
no hard-coded attribute path. Prunable layers are chosen by type and by name patterns.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

LINEAR_TYPES = ("Linear", "Conv1D")  # class names: HF's Conv1D is a Linear with a transposed weight


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> Tuple[str, List[nn.Module]]:
    """The repeated blocks of a transformer: the ModuleList of same-class children with the most parameters."""
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(c) for c in module}) != 1:
                continue
            size = _n_params(module)
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"could not find the repeated blocks (an nn.ModuleList) in {type(model).__name__}")
    return best[1], list(best[2])


def is_prunable(module: nn.Module, convs: bool = False) -> bool:
    kind = type(module).__name__
    if kind in LINEAR_TYPES or isinstance(module, nn.Linear):
        return True
    return convs and isinstance(module, nn.Conv2d) and module.groups == 1


def select_targets(
    root: nn.Module,
    prefix: str = "",
    targets: Optional[Sequence[str]] = None,
    ignore: Sequence[str] = (),
    convs: bool = False,
) -> Dict[str, nn.Module]:
    """Prunable modules under ``root`` keyed by full name (``prefix.name``).

    ``targets``: regexes a name must match (``re.search``; None = every prunable layer);
    ``ignore``: regexes that exclude a name. Depthwise/grouped convolutions never qualify."""
    found: Dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not is_prunable(module, convs or _mentions_conv(targets)):
            continue
        if targets is not None and not any(re.search(t, full) for t in targets):
            continue
        if any(re.search(i, full) for i in ignore):
            continue
        found[full] = module
    return found


def _mentions_conv(targets: Optional[Sequence[str]]) -> bool:
    return False if targets is None else any("conv" in t.lower() for t in targets)
