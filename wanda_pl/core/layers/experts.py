"""Fused Mixture-of-Experts weights: each expert's slice of a fused parameter is one prunable matrix.

Most MoE families of transformers 5 (Mixtral, Qwen2/3-MoE, OLMoE, ...) keep their experts in one
module holding ``gate_up_proj`` (experts, 2 * inter, hidden) and ``down_proj`` (experts, hidden,
inter), called as ``experts(hidden (tokens, hidden), top_k_index, top_k_weights)``. Expert ``e``'s
``gate_up_proj[e]`` and ``down_proj[e]`` are (out, in) matrices like a Linear's weight (gate and up
read the same input, so their fused slice is one matrix). An :class:`ExpertSlice` stands for one of
them while pruning: its weight is a view into the fused parameter (editing it edits the model), and
a forward hook on it sees exactly the tokens the router sent to its expert: the hidden states for
``gate_up_proj``, the expert's own intermediate activations ``act(gate) * up`` for ``down_proj``.
Statistics are those of the routed tokens, unweighted by the routing weight (the paper's statistics
are of the layer's inputs; the routing weight scales the expert's output, not its input)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from ...errors import UserError
from .base import LayerKind, rows

FUSED = ("gate_up_proj", "down_proj")
SLICES = "_wanda_pl_expert_slices"  # cached on the experts module: one stand-in per slice, stable identity


def is_fused_experts(module: nn.Module) -> bool:
    """The layout above: both fused 3-D parameters, one activation, experts along dimension 0."""
    params = [getattr(module, p, None) for p in FUSED]
    return all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in params) and hasattr(module, "act_fn") \
        and params[0].shape[0] == params[1].shape[0] and params[0].shape[1] == 2 * params[1].shape[2]


def intermediate(experts: nn.Module, index: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``index``'s ``act(gate) * up`` on ``x`` (tokens, hidden): what its ``down_proj`` multiplies."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[index]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def call_args(args: tuple, kwargs: dict):
    """(hidden states, top-k expert indices, top-k routing weights) of one call of an experts module."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    return tuple(args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))


class _Handle:
    def __init__(self, handle) -> None:
        self.handle = handle

    def remove(self) -> None:
        self.handle.remove()


class ExpertSlice:
    """Expert ``index``'s matrix of the fused parameter ``param`` of ``experts``."""

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        self.experts, self.param, self.index = experts, param, index

    @property
    def source(self) -> nn.Parameter:
        return getattr(self.experts, self.param)

    @property
    def weight(self) -> torch.Tensor:
        return self.source[self.index]

    def routed_inputs(self, hidden: torch.Tensor, top_k_index: torch.Tensor) -> torch.Tensor:
        """What this slice multiplies on the tokens routed to its expert: (tokens routed, in)."""
        tokens = (top_k_index == self.index).any(dim=-1).nonzero().flatten()
        x = hidden.reshape(-1, hidden.shape[-1])[tokens]
        return x if self.param == "gate_up_proj" else intermediate(self.experts, self.index, x)

    def register_forward_hook(self, hook: Callable) -> _Handle:
        """``hook(self, (routed inputs,), None)`` after every call of the experts module."""
        def on_experts(module, args, kwargs, output):
            hidden, index, _ = call_args(args, kwargs)
            with torch.no_grad():
                hook(self, (self.routed_inputs(hidden, index),), None)

        return _Handle(self.experts.register_forward_hook(on_experts, with_kwargs=True))

    def __repr__(self) -> str:
        return f"ExpertSlice({self.param}[{self.index}] of {type(self.experts).__name__})"


def expert_slices(experts: nn.Module, prefix: str) -> Dict[str, ExpertSlice]:
    """``{prefix.gate_up_proj.e: slice, prefix.down_proj.e: slice}`` for every expert, in that order."""
    cached: List[ExpertSlice] = experts.__dict__.setdefault(SLICES, [
        ExpertSlice(experts, p, e) for e in range(experts.gate_up_proj.shape[0]) for p in FUSED])
    return {f"{prefix}.{s.param}.{s.index}" if prefix else f"{s.param}.{s.index}": s for s in cached}


RARE_ACTIONS = ("magnitude", "dense", "error")


@dataclass(frozen=True)
class RareExperts:
    """What an expert slice that calibration barely reached gets (``--pruning.rare_experts``): its
    statistics come from too few tokens for the method to mean anything. ``min_tokens`` unset: a
    method that solves with ``X^T X`` (SparseGPT, ADMM, the OBS ablations) needs as many tokens as
    the slice has inputs (fewer leave ``X^T X`` singular); any other method needs one token."""

    min_tokens: Optional[int] = None
    action: str = "magnitude"
    fallback: Any = None  # the magnitude method (core knows no method: the caller hands it in)

    def __post_init__(self) -> None:
        if self.action not in RARE_ACTIONS:
            raise ValueError(f"pruning.rare_experts must be one of {RARE_ACTIONS}, got {self.action!r}")
        if self.min_tokens is not None and (isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int)
                                            or self.min_tokens < 0):
            raise ValueError(f"pruning.min_expert_tokens must be an integer >= 0 or null, got {self.min_tokens!r}")

    def rare(self, name: str, module, stats, needs_hessian: bool) -> bool:
        """Whether ``module`` is a rare expert's slice; raises for ``action: error``."""
        if not isinstance(module, ExpertSlice) or stats is None:
            return False
        least = self.min_tokens if self.min_tokens is not None else (module.weight.shape[1] if needs_hessian else 1)
        if stats.tokens >= least:
            return False
        if self.action == "error":
            raise UserError(f"{name}: expert {module.index} received {stats.tokens} calibration tokens, fewer than "
                            f"{least} (pruning.min_expert_tokens); more calibration samples reach more experts, or "
                            f"set pruning.rare_experts magnitude|dense")
        return True


def has_experts(targets: Dict[str, object]) -> bool:
    return any(isinstance(m, ExpertSlice) for m in targets.values())


def expert_tokens(targets: Dict[str, object], tokens: Dict[str, int]) -> Dict[str, Dict[str, int]]:
    """``{experts module: {expert: calibration tokens routed to it}}`` (what its gate_up slice saw)."""
    out: Dict[str, Dict[str, int]] = {}
    for name, m in targets.items():
        if isinstance(m, ExpertSlice) and m.param == "gate_up_proj" and name in tokens:
            out.setdefault(name.rsplit(".", 2)[0], {})[str(m.index)] = tokens[name]
    return out


EXPERT = LayerKind(
    name="ExpertSlice",
    claims=lambda m: isinstance(m, ExpertSlice),
    matrix=lambda m: m.weight,
    flatten=lambda m, x: rows(x),
    to_param=lambda m, mask: mask.reshape(m.weight.shape),
)
