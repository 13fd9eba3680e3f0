"""Calibration Callback: what the engine calibrates on and how.

It holds the calibration inputs (token ids from the datamodule, or images), checks them,
and decides where activations live between blocks and whether errors propagate. The
statistics themselves are gathered block by block inside the engine, because each
block's statistics depend on the pruned blocks before it."""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class Calibration(Callback):
    """Args:
        store_device: where calibration activations live between blocks (``cpu`` keeps
            accelerator memory to one block; ``auto`` = the model's device).
        propagate: re-run each pruned block so later blocks calibrate on pruned activations
            (the paper's LLM setting); False feeds the dense outputs forward.
    """

    def __init__(self, store_device: str = "cpu", propagate: bool = True) -> None:
        self.store_device = store_device
        self.propagate = propagate
        self.inputs: Optional[torch.Tensor] = None
        self.time_s = 0.0

    def calibration_data(self, trainer, pl_module) -> torch.Tensor:
        if self.inputs is None:
            t0 = time.perf_counter()
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "calibration_data"):
                raise RuntimeError("pruning needs a datamodule that provides calibration_data()")
            self.inputs = dm.calibration_data()
            self.time_s = time.perf_counter() - t0
            log.info("calibration data: %s", tuple(self.inputs.shape))
        return self.inputs

    def device_for(self, pl_module) -> torch.device:
        return pl_module.device if self.store_device == "auto" else torch.device(self.store_device)
