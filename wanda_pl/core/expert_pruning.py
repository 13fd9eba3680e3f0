"""Whole-expert pruning of Mixture-of-Experts blocks by REAP's saliency (Lasby et al. 2025,
"REAP: Router-weighted Expert Activation Pruning"): expert ``j``'s saliency is the mean, over the
tokens routed to it, of its routing weight times the norm of its output, ``mean g_j(x) ||f_j(x)||``.
The experts with the lowest saliency are removed from every block: the fused parameters, the
router's rows (and DeepSeek's score-correction bias) and the expert count the modules and the config
hold, so ``from_pretrained`` loads the smaller model. Blocks go in order, each measured on the
outputs of the already reduced blocks before it (as the pruning engine propagates), on a copy of
the calibration inputs; weight pruning then runs on the reduced model."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UserError
from .distributed import summed
from .hooks import BlockInput
from .layers.experts import SLICES, call_args, intermediate, is_fused_experts
from .onload import Placement

COUNT_NAMES = ("num_experts", "num_local_experts", "n_routed_experts")  # modules' and configs' expert counts


def moe_blocks(block: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, experts, router) of every MoE inside ``block``: the router is the experts' sibling whose
    weight has one row per expert."""
    out = []
    for name, module in block.named_modules():
        if not is_fused_experts(module):
            continue
        parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
        n = module.gate_up_proj.shape[0]
        routers = [m for k, m in parent.named_children() if m is not module and isinstance(getattr(m, "weight", None),
                   torch.Tensor) and m.weight.dim() == 2 and m.weight.shape[0] == n]
        if len(routers) != 1:
            raise UserError(f"{name}: {len(routers)} modules beside the experts look like its router; expert pruning "
                            f"needs exactly one (weight of one row per expert)")
        out.append((name, module, routers[0]))
    return out


def to_remove(experts: int, ratio: float, top_k: int) -> int:
    """How many of ``experts`` a ratio removes; refuses leaving fewer than ``top_k``."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning.experts_ratio must be in [0, 1), got {ratio!r}")
    n = math.floor(ratio * experts)
    if experts - n < top_k:
        raise ValueError(f"pruning.experts_ratio {ratio:g} removes {n} of {experts} experts, leaving fewer than the "
                         f"{top_k} each token is routed to; at most {(experts - top_k) / experts:g}")
    return n


@torch.no_grad()
def saliency(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor):
    """(sum over routed tokens of g_j ||f_j||, routed tokens) per expert, for one call of ``experts``."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    n = experts.gate_up_proj.shape[0]
    sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    for j in range(n):
        token, slot = (index == j).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        out = nn.functional.linear(intermediate(experts, j, hidden[token]), experts.down_proj[j])
        sums[j] = (weights[token, slot].double() * out.double().norm(dim=-1)).sum()
        counts[j] = token.numel()
    return sums, counts


@torch.no_grad()
def keep_experts(experts: nn.Module, router: nn.Module, keep: torch.Tensor) -> None:
    """Shrink ``experts`` and ``router`` to the experts ``keep`` (sorted indices), in place."""
    for name in ("gate_up_proj", "down_proj"):
        old = getattr(experts, name)
        setattr(experts, name, nn.Parameter(old.data[keep.to(old.device)].clone(), requires_grad=old.requires_grad))
    router.weight = nn.Parameter(router.weight.data[keep.to(router.weight.device)].clone(),
                                 requires_grad=router.weight.requires_grad)
    bias = getattr(router, "e_score_correction_bias", None)
    if isinstance(bias, torch.Tensor) and bias.shape[0] != len(keep):
        router.e_score_correction_bias = bias[keep.to(bias.device)].clone()
    experts.__dict__.pop(SLICES, None)  # its stand-ins were for the old indices
    for module in (experts, router):
        for attr in COUNT_NAMES:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, len(keep))


def prune_experts(blocks: Sequence[Tuple[str, nn.Module]], inputs: List[BlockInput], ratio: float, config,
                  store_device="cpu", placement: Optional[Placement] = None, progress: bool = True
                  ) -> Dict[str, Dict[str, list]]:
    """Remove ``ratio`` of the experts of every MoE in ``blocks`` by REAP saliency, and say so in the
    model's ``config``; ``inputs`` are not changed. Returns, per MoE, the experts removed and every
    expert's saliency and routed tokens."""
    top_k = config.num_experts_per_tok
    sizes = set()  # (experts before, after) of every MoE: one pair, as the config states one count
    current = [dataclasses.replace(inp) for inp in inputs]
    placement = placement or Placement()
    report: Dict[str, Dict[str, list]] = {}
    for name, block in tqdm(blocks, desc="experts: saliency", disable=not progress):
        placement.enter(name, block)
        device = next(block.parameters()).device
        moes = moe_blocks(block)
        found = {m: [torch.zeros(e.gate_up_proj.shape[0], dtype=torch.float64),
                     torch.zeros(e.gate_up_proj.shape[0], dtype=torch.long)] for m, e, _ in moes}

        def hook(moe_name):
            def on_call(module, args, kwargs, output):
                s, c = saliency(module, *call_args(args, kwargs))
                found[moe_name][0] += s
                found[moe_name][1] += c
            return on_call

        handles = [e.register_forward_hook(hook(m), with_kwargs=True) for m, e, _ in moes]
        try:
            with torch.no_grad():
                for inp in current:
                    inp.call(block, device)
        finally:
            for h in handles:
                h.remove()
        for moe_name, experts, router in moes:
            sums, counts = (summed(t) for t in found[moe_name])  # data-parallel: every rank's tokens
            score = sums / counts.clamp_min(1)  # never routed: 0, removed first
            n = to_remove(len(score), ratio, top_k)
            removed = sorted(torch.sort(score, stable=True).indices[:n].tolist())
            keep = torch.tensor([j for j in range(len(score)) if j not in removed])
            keep_experts(experts, router, keep)
            sizes.add((len(score), len(keep)))
            report[f"{name}.{moe_name}"] = {"removed": removed, "saliency": [round(float(x), 6) for x in score],
                                            "tokens": [int(x) for x in counts]}
        with torch.no_grad():
            outs = [inp.call(block, device).to(store_device) for inp in current]
        placement.leave(name, block, pruned=True)
        for inp, out in zip(current, outs):
            inp.hidden = out
    if len(sizes) > 1:
        raise UserError(f"expert pruning left blocks with different expert counts {sorted(sizes)}; the config "
                        f"states one count for every block")
    for old, new in sizes:
        set_config_count(config, old, new)
    return report


def set_config_count(config, old: int, new: int) -> None:
    """The config's expert count (whichever name the family uses) from ``old`` to ``new``."""
    for attr in COUNT_NAMES:
        if getattr(config, attr, None) == old:
            setattr(config, attr, new)
