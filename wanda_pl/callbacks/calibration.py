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

from ..core.distributed import check_calibration_shares, share, shares

log = logging.getLogger(__name__)


class Calibration(Callback):
    """Args:
        store_device: where calibration activations live between blocks (``cpu`` keeps
            accelerator memory to one block; ``auto`` = the model's device).
        propagate: re-run each pruned block so later blocks calibrate on pruned activations
            (the paper's LLM setting); False feeds the dense outputs forward.
        batch_size: calibration samples per forward, in both passes (None: the model's default, 1 for
            causal LMs as the reference, ``model.calibration_batch_size`` for classifiers). The
            statistics are sums over samples, so masks are the same up to float summation order;
            larger batches are faster and hold ``batch_size`` samples' activations inside a block.
    """

    def __init__(self, store_device: str = "cpu", propagate: bool = True, batch_size: Optional[int] = None) -> None:
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"calibration.batch_size must be an integer >= 1 (or null: the model's default), "
                             f"got {batch_size!r}")
        self.store_device = store_device
        self.propagate = propagate
        self.batch_size = batch_size
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

    def block_inputs(self, trainer, pl_module, needed: bool):
        """(blocks, this rank's first-block inputs, store device, samples per rank). Under DDP each
        rank takes its share of the samples; the engine sums the ranks' statistics."""
        store = self.device_for(pl_module)
        if not needed:
            return pl_module.prunable_blocks(None, store)[0], [], store, []
        data = self.calibration_data(trainer, pl_module)
        check_calibration_shares(len(data), trainer.world_size)
        mine = data[list(share(len(data), trainer.global_rank, trainer.world_size))]
        blocks, inputs = pl_module.prunable_blocks(mine, store, batch_size=self.batch_size)
        return blocks, inputs, store, shares(len(data), trainer.world_size)
