"""What both datamodules share: each rank's share of the items, and the checks of their counts."""
from __future__ import annotations

from typing import List, Tuple


def shard(n: int, rank: int, world: int) -> range:
    """Items ``rank, rank + world, ...``: every item on exactly one rank, none repeated (a
    DistributedSampler pads with duplicates, which would bias a perplexity)."""
    return range(rank, n, world)


def rank_world(trainer) -> Tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def my_share(n: int, trainer) -> List[int]:
    """This process's item indices (all of them without a trainer or with one process)."""
    return list(shard(n, *rank_world(trainer)))


def check_at_least(**values) -> None:
    """``name=(value, least)``: each value must be >= its least; ``None`` is allowed where the
    least is given as ``(least, None)`` (an optional count)."""
    for name, (value, least) in values.items():
        optional = isinstance(least, tuple)
        least = least[0] if optional else least
        if value is None and optional:
            continue
        if value is None or value < least:
            raise ValueError(f"data.{name} must be >= {least}{' or null' if optional else ''}, got {value}")
