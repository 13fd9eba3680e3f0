"""Finding a callback of ours on a Trainer: one lookup, one message."""
from __future__ import annotations

from typing import Optional, Type, TypeVar

T = TypeVar("T")


def find_callback(trainer, kind: Type[T], needed_for: Optional[str] = None) -> Optional[T]:
    """The trainer's callback of type ``kind``; None when absent, unless ``needed_for`` names
    what needs it (then a clear error)."""
    found = next((c for c in trainer.callbacks if isinstance(c, kind)), None)
    if found is None and needed_for is not None:
        raise RuntimeError(f"{needed_for} needs the {kind.__name__} callback (the CLI adds it as "
                           f"--{kind.__name__.lower()}.*)")
    return found
