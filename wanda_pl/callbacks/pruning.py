"""Pruning Callback: computes masks with the engine, applies them, and keeps them applied.

Masks are explicit callback state (saved in checkpoints); weights stay dense-shaped and are
edited in place. During fine-tuning, gradients of pruned weights are zeroed before each
optimizer step and the weights re-masked after it, so momentum, weight decay or Adam's
moments cannot revive a pruned weight."""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch
from lightning.pytorch.callbacks import Callback

from ..engine import PruneResult, check_targets, prune_sequential
from ..methods import PruneOptions, get_method
from ..sparsity import GRANULARITIES, SparsitySpec
from .calibration import Calibration

log = logging.getLogger(__name__)


class Pruning(Callback):
    """Args:
        method: magnitude | wanda | sparsegpt | ablate_{mag,wanda}_{seq,iter}.
        sparsity_ratio: fraction of weights to prune, in [0, 1) (unset: N/M for N:M, else 0.5).
        sparsity_type: ``unstructured`` or ``N:M`` (N pruned of every M consecutive inputs, e.g. 2:4).
        use_variant: the Wanda variant (per-row threshold on cumulative scores; unstructured only).
        granularity: comparison group, ``row`` or ``layer`` (unset: the method's default).
        blocksize: SparseGPT column block size.
        percdamp: SparseGPT damping, a fraction of the Hessian's mean diagonal.
        enabled: prune when validation or fitting starts (``prune`` turns it on after the dense baseline).
    """

    def __init__(
        self,
        method: str = "wanda",
        sparsity_ratio: Optional[float] = None,
        sparsity_type: str = "unstructured",
        use_variant: bool = False,
        granularity: Optional[str] = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
        enabled: bool = False,
    ) -> None:
        self.spec = SparsitySpec.parse(sparsity_type, sparsity_ratio)
        self.method = get_method(method)
        if granularity is not None and granularity not in GRANULARITIES:
            raise ValueError(f"pruning.granularity must be one of {GRANULARITIES} or unset, got {granularity!r}")
        if use_variant and (self.spec.structured or not self.method.supports_variant):
            raise ValueError(f"pruning.use_variant needs unstructured sparsity and a method that has it (wanda), "
                             f"got method={method!r}, sparsity_type={self.spec.type!r}")
        if blocksize < 1:
            raise ValueError(f"pruning.blocksize must be >= 1, got {blocksize}")
        if not 0 <= percdamp:
            raise ValueError(f"pruning.percdamp must be >= 0, got {percdamp}")
        self.options = PruneOptions(granularity, use_variant, blocksize, percdamp)
        self.enabled = enabled
        self.masks: Dict[str, torch.Tensor] = {}
        self.result: Optional[PruneResult] = None
        self.times: Dict[str, float] = {}

    def describe(self) -> dict:
        return {
            "method": self.method.name, "sparsity_type": self.spec.type, "sparsity_ratio": self.spec.ratio,
            "use_variant": self.options.use_variant,
            "granularity": self.options.granularity or self.method.default_granularity,
            **({"blocksize": self.options.blocksize, "percdamp": self.options.percdamp} if self.method.needs_hessian else {}),
        }

    def check(self, pl_module) -> None:
        """Fail early when a layer cannot take the sparsity (e.g. M does not divide its width)."""
        check_targets(pl_module.all_targets(), self.spec)

    # --- computing masks ---
    def prune(self, trainer, pl_module) -> None:
        calib = next((c for c in trainer.callbacks if isinstance(c, Calibration)), None) or Calibration()
        t0 = time.perf_counter()
        data = calib.calibration_data(trainer, pl_module) if self.method.needs_activations else None
        t1 = time.perf_counter()
        blocks, inputs = pl_module.prunable_blocks(data, calib.device_for(pl_module))
        result = prune_sequential(
            blocks, inputs, pl_module.block_targets, self.method, self.spec, self.options,
            propagate=calib.propagate, store_device=calib.device_for(pl_module),
            progress=trainer.is_global_zero,
        )
        self.result, self.masks = result, result.masks
        self.times = {"calibration_data": t1 - t0, "prune": time.perf_counter() - t1,
                      "prune_metric": result.time_metric_s, "prune_forward": result.time_forward_s}

    def _maybe_prune(self, trainer, pl_module) -> None:
        if self.enabled and not self.masks:
            self.prune(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._maybe_prune(trainer, pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._maybe_prune(trainer, pl_module)
        self.apply(pl_module)

    # --- keeping masks ---
    def _params(self, pl_module):
        # Mask names are relative to the wrapped network (``pl_module.model``).
        for name, mask in self.masks.items():
            yield pl_module.model.get_submodule(name).weight, mask

    @torch.no_grad()
    def apply(self, pl_module) -> None:
        for weight, mask in self._params(pl_module):
            weight.masked_fill_(mask.to(weight.device), 0)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for weight, mask in self._params(pl_module):
            if weight.grad is not None:
                weight.grad.masked_fill_(mask.to(weight.device), 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.apply(pl_module)

    def state_dict(self) -> dict:
        return {"masks": self.masks, "config": self.describe()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.masks = state_dict["masks"]
