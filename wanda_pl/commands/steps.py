"""What every command shares: measuring the model, writing the output folder on rank 0, and the
report sections every report has."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional

from .outputs import staged_dir
from .machine import hardware
from .report import peak_memory, versions


@dataclass
class Evaluation:
    """One validation run's results: the module's metrics and, when enabled, zero-shot accuracy."""

    metrics: Dict[str, Any]
    zero_shot: Optional[Dict[str, Any]] = None
    seconds: float = 0.0


def evaluate(trainer, model, datamodule, zero_shot=None) -> Evaluation:
    """Run Lightning's validation (every rank) and collect what each party measured."""
    t0 = time.perf_counter()
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return Evaluation(model.validation_metrics(), None if zero_shot is None else zero_shot.result,
                      time.perf_counter() - t0)


@contextmanager
def staged_output(trainer, output_dir, inputs: Mapping[str, object], command: str,
                  writes: Mapping[str, object] = ()) -> Iterator[Any]:
    """The staged output folder on rank 0 (None elsewhere): under DDP every rank runs the command,
    and another rank's empty stage committed after rank 0's would replace the finished output."""
    with (staged_dir(output_dir, inputs, command, writes) if trainer.is_global_zero else nullcontext()) as stage:
        yield stage


def lightning_writes(trainer) -> Dict[str, object]:
    """Folders Lightning fills during a run: an output folder must not hold them."""
    return {"trainer.default_root_dir": trainer.default_root_dir}


def environment(trainer) -> Dict[str, Any]:
    """The report's ``environment`` section."""
    import torch

    return {"peak_memory_mb": peak_memory(), "devices": trainer.world_size, "torch_threads": torch.get_num_threads(),
            "versions": versions(), "hardware": hardware()}

