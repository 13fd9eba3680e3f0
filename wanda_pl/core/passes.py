"""The engine's passes that prune nothing: the dense model's statistics block by block (what an
allocation weighs before pruning) and the outputs of a model whose blocks come in one at a time."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .distributed import sum_stats
from .engine import device_of
from .hooks import BlockInput, collect_stats
from .onload import Placement
from .stats import LayerStats
from .types import TargetsFn


def dense_pass(
    blocks: Sequence[Tuple[str, nn.Module]],
    inputs: List[BlockInput],
    targets_fn: TargetsFn,
    on_block: Callable[[str, Dict[str, nn.Module], Dict[str, LayerStats]], None],
    *,
    store_device="cpu",
    progress: bool = True,
    desc: str = "dense statistics",
    placement: Optional[Placement] = None,
) -> None:
    """Run every block once on the dense model's own activations, with statistics hooks on its
    targets, and give each block's statistics to ``on_block``: what an allocation (OWL) weighs
    before anything is pruned. ``inputs`` are left as they are, for the pruning pass after. Statistics
    are summed over ranks, as in :func:`prune_sequential`."""
    current = [dataclasses.replace(inp) for inp in inputs]
    placement = placement or Placement()
    for name, block in tqdm(blocks, desc=desc, disable=not progress):
        targets = targets_fn(name, block)
        placement.enter(name, block)
        device = device_of(block, store_device)
        with torch.no_grad(), collect_stats(targets) as stats:
            outs = [inp.call(block, device).to(store_device) for inp in current]
        sum_stats(stats)
        on_block(name, targets, stats)  # reads the block's weights: before they are given back
        placement.leave(name, block, pruned=False)
        for inp, out in zip(current, outs):
            inp.hidden = out


@torch.no_grad()
def forward_sequential(
    blocks: Sequence[Tuple[str, nn.Module]], inputs: List[BlockInput], placement: Optional[Placement] = None,
    store_device="cpu", progress: bool = False, desc: str = "blocks",
) -> List[torch.Tensor]:
    """What the last block outputs for each input, running block 0 over every input, then block 1,
    ...: a model whose blocks come in one at a time (offload) is evaluated without ever being whole."""
    placement = placement or Placement()
    current = [dataclasses.replace(inp) for inp in inputs]
    for name, block in tqdm(blocks, desc=desc, disable=not progress):
        placement.enter(name, block)
        device = device_of(block, store_device)
        outs = [inp.call(block, device).to(store_device) for inp in current]
        placement.leave(name, block, pruned=False)
        for inp, out in zip(current, outs):
            inp.hidden = out
    return [inp.hidden for inp in current]
