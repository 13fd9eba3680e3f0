"""Sharded weights (DTensor: FSDP2's ``fully_shard``, tensor parallelism) seen whole or locally.

Masks are full-shape; a sharded weight is a DTensor whose local shard is a piece of it. These
helpers are the one place that knows: counting zeros over all ranks, cutting a mask as its
weight is cut, gathering a whole state dict for saving. The gathering ones are collectives:
every rank must call them, in the same order."""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage: in-place edits reach it), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a DTensor (a collective), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t


def count_zeros(w: torch.Tensor) -> int:
    """Zeros of a weight over all ranks (a DTensor's local count would be this rank's only)."""
    return int(full((w.detach() == 0).sum()))


def layer_sparsity(targets: Mapping[str, nn.Module]) -> Dict[str, float]:
    """Zeros per layer (sharded weights counted over all ranks: every rank must call this)."""
    return {name: count_zeros(m.weight) / m.weight.numel() for name, m in targets.items()}


def overall_sparsity(targets: Mapping[str, nn.Module]) -> float:
    """Zeros over all prunable weights (weighted by size, not a mean of layer ratios)."""
    zeros = sum(count_zeros(m.weight) for m in targets.values())
    total = sum(m.weight.numel() for m in targets.values())
    return zeros / max(total, 1)


def weight_sparsity(model, targets: Mapping[str, nn.Module], zeros=None) -> Dict[str, float]:
    """The report's coverage numbers (:mod:`wanda_pl.core.coverage`): the share of the blocks' weights
    the targets are, and the zeros over all block weights and over every weight of the model.
    ``zeros(name, weight)`` counts one weight where it is not in memory (offload disk); every rank
    must call this (sharded weights are counted by a collective)."""
    from ..core.coverage import block_weights, coverage, model_weights, zero_share

    blocks, _ = model.prunable_blocks(None)
    count = zeros or (lambda name, w: count_zeros(w))
    return {"target_coverage": round(coverage(blocks, targets).share, 6),
            "sparsity_block_weights": zero_share(block_weights(blocks), count),
            "sparsity_model": zero_share(model_weights(model.model), count)}


def local_mask(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The part of a full-shape ``mask`` that lies on this rank's shard of ``weight``, on its device."""
    if not is_dtensor(weight):
        return mask.to(weight.device)
    from torch.distributed.tensor import distribute_tensor

    shard = weight.to_local()
    # Cut as the weight is (same mesh and placements, torch.chunk along sharded dims as FSDP2 does);
    # src_data_rank=None: every rank cuts its own copy (the masks are equal on all), no communication.
    piece = distribute_tensor(mask.detach(), weight.device_mesh, weight.placements, src_data_rank=None).to_local()
    if piece.shape != shard.shape:
        raise RuntimeError(f"a mask of shape {tuple(mask.shape)} cut as its weight {weight.placements} gives "
                           f"{tuple(piece.shape)}, the local shard is {tuple(shard.shape)}")
    return piece.to(shard.device)


def is_sharded(model: nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def full_state_dict(model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The whole state dict on CPU when ``model`` is sharded (a collective), else None (use the model)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
