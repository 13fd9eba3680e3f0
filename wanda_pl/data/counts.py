"""What both datamodules share: this rank's items (:func:`wanda_pl.core.distributed.share`) and the
checks of their counts."""
from __future__ import annotations

from typing import List, Tuple

from ..core.distributed import share


def rank_world(trainer) -> Tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a trainer."""
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def my_share(n: int, trainer) -> List[int]:
    """This process's item indices (all of them without a trainer or with one process)."""
    return list(share(n, *rank_world(trainer)))


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
