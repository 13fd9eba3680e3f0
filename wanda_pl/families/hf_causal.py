"""Hugging Face causal LMs: where the decoder blocks are.

The decoder blocks are the ``nn.ModuleList`` holding most of the parameters (Llama/Mistral/Qwen2
``model.layers``, GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, GPT-NeoX
``gpt_neox.layers`` ...): no hard-coded attribute path. Which layers inside them are prunable is
the layer kinds' business (:mod:`wanda_pl.core.layers`).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn


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
