"""Masked LoRA: low-rank adapters whose update never touches a pruned weight.

A LoRA layer adds ``scaling * B A`` to a frozen weight ``W``. Merging that into a pruned ``W``
fills its zeros (a product ``B A`` has none), which is how a merged adapter silently destroys
sparsity (wanda#83: 40% -> 32.7%). Here the update is ``K * (B A) * scaling``, ``K`` the
keep-mask (1 where ``W`` is kept), in the forward while training as well as in the merge, so

* the merged weight ``W + K * (B A) * scaling`` has exactly the zeros of ``W``, and
* the merged model computes what the unmerged adapter computed.

peft's stock forward ``W x + B (A x) * scaling`` would train the unmasked update, so its
merged and unmerged models differ; the masked update does not factor through ``A x``, so
the forward here builds the (out x in) update of each adapted layer: one weight-sized
product per adapted layer per step (LoRA's usual layers, q_proj and v_proj, are small).

Masks follow the Pruning callback's convention: a bool tensor shaped like the weight,
True = pruned. Functions take the Hugging Face network (``CausalLM.model``) and names
relative to it, the same names as the masks.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.layers import is_prunable, weight_of
from .masks import MASKS_FILE, load_masks, save_masks

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"


class MaskedLoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a masked low-rank update.

    It *is* an ``nn.Linear`` holding the original ``weight``/``bias`` parameters under the same
    names, so target selection, masks, pruning and sparsity reports see the same layer. The
    update's pruned positions come from :meth:`set_mask` (None: an unmasked, plain LoRA)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        w = base.weight
        # Adapters train in fp32 over a bf16/fp16 base (peft's autocast_adapter_dtype); peft's default
        # initialisation: A kaiming-uniform, B zero (the update starts at 0).
        dtype = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not in the state dict: masks live in the Pruning callback (and its checkpoint state).
        self.register_buffer("lora_pruned", None, persistent=False)
        self.train(base.training)

    def set_mask(self, pruned: Optional[torch.Tensor]) -> None:
        if pruned is not None:
            if tuple(pruned.shape) != tuple(self.weight.shape):
                raise ValueError(f"mask shape {tuple(pruned.shape)} != weight shape {tuple(self.weight.shape)}")
            pruned = pruned.to(device=self.weight.device, dtype=torch.bool)
        self.lora_pruned = pruned

    def delta(self) -> torch.Tensor:
        """The masked update ``K * (B A) * scaling`` (out x in), in the weight's dtype."""
        d = (self.lora_B @ self.lora_A) * self.scaling
        d = d if self.lora_pruned is None else d.masked_fill(self.lora_pruned, 0)
        return d.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            # Dropout acts on the adapter's input only, as peft's LoRA.
            return F.linear(x, self.weight, self.bias) + F.linear(self.lora_dropout(x), self.delta())
        # Without dropout the same function in one product, computed exactly as merge() does.
        return F.linear(x, self.weight + self.delta(), self.bias)

    def extra_repr(self) -> str:
        masked = "none" if self.lora_pruned is None else f"{float(self.lora_pruned.float().mean()):.3f}"
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, pruned={masked}"


def lora_layers(model: nn.Module) -> Dict[str, MaskedLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def attach(
    model: nn.Module,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.05,
    exact: bool = False,
    freeze_base: bool = True,
) -> Dict[str, MaskedLoRALinear]:
    """Wrap the ``nn.Linear`` layers whose name matches a regex of ``targets`` (``re.search``; with
    ``exact``, names to match whole) in :class:`MaskedLoRALinear`; with ``freeze_base``, every other
    parameter stops requiring gradients. Returns the adapted layers by name."""
    if not targets:
        raise ValueError("LoRA needs at least one target layer name or regex")
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"the model already has LoRA layers ({next(iter(existing))}, ...)")

    def wanted(name: str) -> bool:
        return name in targets if exact else any(re.search(t, name) for t in targets)

    chosen: Dict[str, nn.Module] = {}
    bad: Dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or not wanted(name):
            continue
        if type(module) is nn.Linear:
            chosen[name] = module
        elif any(True for _ in module.children()):  # a container (``self_attn``): its linear layers
            chosen.update({n: m for n, m in module.named_modules(prefix=name) if type(m) is nn.Linear})
        elif is_prunable(module):
            bad[name] = type(module).__name__  # e.g. GPT-2's Conv1D: an error, not silently skipped
    if bad:
        raise ValueError(f"LoRA here adapts nn.Linear layers only; these targets are not: {bad}")
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(f"no nn.Linear layer matches LoRA targets {list(targets)}; linear layers are named like {linears}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    out = {}
    for name, module in chosen.items():
        out[name] = MaskedLoRALinear(module, r, alpha, dropout)
        _replace(model, name, out[name])
    return out


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """Give every LoRA layer named in ``masks`` its mask (True = pruned); returns how many got one."""
    n = 0
    for name, layer in lora_layers(model).items():
        if name in masks:
            layer.set_mask(masks[name])
            n += 1
    return n


@torch.no_grad()
def merge(model: nn.Module) -> Dict[str, nn.Linear]:
    """Replace every LoRA layer, in place, by a plain ``nn.Linear`` with weight ``W + K * (B A) * scaling``:
    pruned weights stay exactly zero. Returns the merged layers by name."""
    out = {}
    for name, layer in lora_layers(model).items():
        w = layer.weight
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=w.dtype)
        linear.weight = nn.Parameter(w + layer.delta(), requires_grad=w.requires_grad)
        if layer.bias is not None:
            linear.bias = layer.bias
        linear.train(layer.training)
        _replace(model, name, linear)
        out[name] = linear
    return out


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach().contiguous().cpu()
        out[f"{name}.lora_B"] = layer.lora_B.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, folder, masks: Mapping[str, torch.Tensor], extra: Optional[Dict[str, Any]] = None) -> Path:
    """``folder/adapter.safetensors`` (A and B of every adapted layer), ``adapter_config.json``
    (rank, alpha, dropout, layers, ``extra``: e.g. the base model) and ``masks.pt`` (every mask,
    True = pruned). :func:`load_adapter` rebuilds the unmerged, masked model from them."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / ADAPTER_FILE))
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {"format": "wanda_pl.masked_lora", "r": first.r, "alpha": first.alpha, "dropout": dropout,
              "layers": list(layers), "masked_layers": [n for n in layers if n in masks], **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    save_masks(masks, folder / MASKS_FILE)
    return folder


@torch.no_grad()
def load_adapter(model: nn.Module, folder, freeze_base: bool = True) -> Dict[str, MaskedLoRALinear]:
    """Attach a saved masked adapter to its base ``model`` (the pruned model it was trained on; the
    saved masks are applied to the base too, so the dense original with the same masks also works
    for pruning methods that do not update the kept weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    modules = dict(model.named_modules())
    masks = load_masks(folder, {n: m.weight for n, m in modules.items() if isinstance(getattr(m, "weight", None), torch.Tensor)})
    for name, mask in masks.items():
        modules[name].weight.masked_fill_(mask.to(modules[name].weight.device), 0)
    layers = attach(model, config["layers"], config["r"], config["alpha"], config["dropout"], exact=True, freeze_base=freeze_base)
    state = load_file(str(folder / ADAPTER_FILE))
    for name, layer in layers.items():
        layer.lora_A.copy_(state[f"{name}.lora_A"])
        layer.lora_B.copy_(state[f"{name}.lora_B"])
    set_masks(model, masks)
    return layers


def masked_nonzero(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> int:
    """How many pruned positions hold a non-zero weight (0 when every mask is kept)."""
    from .sharding import full

    n = 0
    for name, mask in masks.items():
        w = full(weight_of(model, name).detach())  # sharded: gathered (every rank calls this)
        n += int((w[mask.to(w.device)] != 0).sum())
    return n

