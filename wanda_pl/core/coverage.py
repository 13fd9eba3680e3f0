"""Coverage: which share of a model's weights the targets are, so no report states a sparsity the
model does not have.

A Mixture-of-Experts block keeps its experts as fused 3-D parameters, not ``nn.Linear`` modules: a
run that prunes only the attention's linears there prunes about a tenth of the block and would
still print "actual sparsity 0.5000". So every run measures its targets against the *block
weights* (every parameter of two or more dimensions inside the repeated blocks: linears, convs,
fused experts; norms and biases are 1-D and excluded) and a run whose default targets cover less
than half of them is refused before any work, naming the largest weights left out. Reports give
the sparsity over the targets, over all block weights and over every weight of the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn

from ..errors import UserError
from .layers import parameter_of
from .types import Blocks

LEAST = 0.5  # the share of block weights default targets must cover
SHOWN = 4  # the largest weights left out, named in the refusal


def block_weights(blocks: Blocks) -> Dict[str, nn.Parameter]:
    """Every parameter of two or more dimensions inside the blocks, by its name in the model."""
    out: Dict[str, nn.Parameter] = {}
    for name, block in blocks:
        for pname, p in block.named_parameters():
            if p.dim() >= 2:
                out[f"{name}.{pname}" if name else pname] = p
    return out


@dataclass(frozen=True)
class Coverage:
    block_weights: int  # elements of all block weights
    covered: int  # of those, in the targets' weights
    left_out: Tuple[Tuple[str, Tuple[int, ...], int], ...]  # (name, shape, elements), largest first
    fused_owners: Tuple[str, ...] = ()  # classes holding left-out weights of 3+ dimensions (MoE experts)

    @property
    def share(self) -> float:
        return self.covered / max(self.block_weights, 1)


def coverage(blocks: Blocks, targets: Mapping[str, nn.Module]) -> Coverage:
    """The targets' share of the block weights (an expert's slice covers its part of the fused parameter)."""
    weights = block_weights(blocks)
    inside = {id(p) for p in weights.values()}
    covered: Dict[int, int] = {}
    for m in targets.values():
        p = parameter_of(m)
        if id(p) in inside:
            covered[id(p)] = covered.get(id(p), 0) + m.weight.numel()
    left = sorted(((n, tuple(p.shape), p.numel()) for n, p in weights.items() if id(p) not in covered),
                  key=lambda t: -t[2])
    owners = dict.fromkeys(type(m).__name__ for _, block in blocks for m in block.modules()
                           if any(p.dim() >= 3 and id(p) not in covered for p in m.parameters(recurse=False)))
    return Coverage(sum(p.numel() for p in weights.values()), sum(covered.values()), tuple(left), tuple(owners))


def check_coverage(cov: Coverage, explicit_targets: bool) -> None:
    """Refuse default targets covering less than :data:`LEAST` of the block weights; explicit
    targets (``--model.targets``) mean it and run."""
    if explicit_targets or cov.share >= LEAST:
        return
    shown = ", ".join(f"{n} {list(s)} ({e / cov.block_weights:.0%})" for n, s, e in cov.left_out[:SHOWN])
    why = (f"{', '.join(cov.fused_owners)} keeps weights fused in a layout wanda_pl does not prune yet (it prunes "
           f"Mixture-of-Experts experts held as gate_up_proj (experts, 2 x inter, hidden) and down_proj (experts, "
           f"hidden, inter) with one act_fn: Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3); " if cov.fused_owners else "")
    raise UserError(
        f"the prunable layers cover {cov.share:.1%} of the weights in the model's blocks, so a report would "
        f"state a sparsity the model does not have: {why}largest left out: {shown}. Target them, or set "
        f"--model.targets to the layers you mean to prune (an explicit list runs and is reported with its "
        f"coverage)")


def zero_share(weights: Mapping[str, torch.Tensor], zeros: Callable[[str, torch.Tensor], int]) -> float:
    """Zeros over all elements of ``weights``, each counted by ``zeros(name, weight)``."""
    total = sum(w.numel() for w in weights.values())
    return sum(zeros(n, w) for n, w in weights.items()) / max(total, 1)


def model_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Every parameter of two or more dimensions of the whole model (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.dim() >= 2}
