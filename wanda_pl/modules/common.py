"""What both LightningModules share, written once: cross-rank sums and the optimizer."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``t`` reduced in place over every rank (``sum`` or ``max``); unchanged in one process."""
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def adamw(network: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the parameters that require a gradient; refuses an empty selection."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
