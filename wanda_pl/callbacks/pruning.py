"""Pruning Callback: computes masks with the engine, applies them, and keeps them applied.

Masks are callback state (saved in checkpoints); weights stay dense-shaped, edited in place. While
fitting, pruned weights' gradients are zeroed before each optimizer step and the weights re-masked
after it, so momentum, weight decay or Adam's moments cannot revive one. Sharded weights (FSDP2,
tensor parallel DTensors) keep full-shape masks: each rank cuts its piece as the weight is cut and
edits its local shard; FSDP1 and DeepSpeed hold flat pieces of several weights: refused.

A command prunes as an explicit step: ``with pruning.run(settings) as run:`` prunes at the start of
the first validation inside (where Lightning put the model: device, DDP ranks) and ``run.result`` is
what it produced. ``validate`` and ``fit`` prune at their start when ``enabled``."""
from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from lightning.pytorch.callbacks import Callback

from ..core.engine import NoCheckpoints, PruneResult, merge_resumed, prune_sequential
from ..core.expert_pruning import prune_experts
from ..core.reshape import reshape_model
from ..methods import options
from ..methods.settings import GENERAL, PruningSettings, general_docs
from ..training.masks import check_strategy, mask_files, masks_from, parameters_and_masks, with_zeros
from ..training.sharding import is_dtensor, is_sharded, local, local_mask, overall_sparsity
from .calibration import Calibration
from .lookup import find_callback

log = logging.getLogger(__name__)


@dataclass
class PruningRun:
    """One pruning asked for by a command: its settings, where its blocks are checkpointed, and
    (once the validation inside :meth:`Pruning.run` started) its result."""

    settings: PruningSettings
    checkpoints: Any = None  # per-block checkpoints (commands.resume.BlockCheckpoints) or None
    result: Optional[PruneResult] = None


class Pruning(Callback):
    __doc__ = None  # written below from the method table (:func:`_docstring`): what ``--help`` shows

    def __init__(self, method: str = "wanda", sparsity_ratio: Optional[float] = None,
                 sparsity_type: str = "unstructured", refine: str = "none", update: str = "none",
                 bias_correction: bool = False, allocation: str = "uniform", owl_m: float = 5.0,
                 owl_lambda: float = 0.08,
                 profile: Optional[Union[List[float], Dict[str, float]]] = None,
                 min_expert_tokens: Optional[int] = None, rare_experts: str = "magnitude", experts_ratio: float = 0.0,
                 reconstruct: str = "none", reconstruct_steps: int = 20, reconstruct_lr: float = 1e-3,
                 reconstruct_batch: int = 4, reconstruct_target: str = "pruned", preset: Optional[str] = None,
                 structure: str = "none", width_mlp: Optional[float] = None, width_heads: Optional[float] = None,
                 blocks_removed: int = 0, compensate: str = "none", width_multiple: int = 1, enabled: bool = False,
                 masks_from: Optional[str] = None,
                 **method_options: Any) -> None:
        given = {k: v for k, v in locals().items() if k in GENERAL}  # every general setting, as named above
        self.settings = PruningSettings.from_args(**given, **method_options)
        if masks_from is not None and masks_from != "zeros":
            if not mask_files(masks_from):
                raise ValueError(f"pruning.masks_from must be 'zeros' or a mask file (or a folder holding masks.pt); "
                                 f"{masks_from!r} is neither")
        self.init_args = {**self.settings.args, "enabled": enabled, "masks_from": masks_from}  # the run's config
        self.enabled = enabled
        self.masks_from = masks_from
        self.masks_source: Optional[str] = None  # where the current masks came from, for reports
        self.start_sparsity: Optional[float] = None  # measured when fitting starts, masks applied
        # (trainable weight, full mask, this rank's piece of it on the weight's device)
        self._live: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []
        self.masks: Dict[str, torch.Tensor] = {}
        self.result: Optional[PruneResult] = None  # of the last pruning this callback did
        self._run: Optional[PruningRun] = None
        self._untouched = False

    def describe(self) -> dict:
        """The report's ``method`` section."""
        return {**self.settings.describe(), **({"masks_from": self.masks_from} if self.masks_from is not None else {})}

    # --- computing masks ---
    @contextmanager
    def run(self, settings: Optional[PruningSettings] = None, checkpoints=None) -> Iterator[PruningRun]:
        """One pruning with ``settings`` (unset: this callback's) at the start of the first validation
        run inside the block; ``run.result`` then holds its masks, plan and times. The callback's own
        masks are as before once the block ends (a sweep runs one pruning per point)."""
        run = PruningRun(settings or self.settings, checkpoints)
        before, self._run = (self._run, self.masks, self.masks_source, self.result), run
        try:
            yield run
        finally:
            self._run, self.masks, self.masks_source, self.result = before
        if run.result is None:
            raise RuntimeError("pruning.run(): no validation ran inside the block, so nothing was pruned")

    @contextmanager
    def untouched(self) -> Iterator[None]:
        """Validation inside the block measures the model as it is: nothing is pruned or masked,
        whatever ``enabled`` says (a command's dense baseline)."""
        was, self._untouched = self._untouched, True
        try:
            yield
        finally:
            self._untouched = was

    def prune(self, trainer, pl_module, run: Optional[PruningRun] = None) -> PruneResult:
        """Calibrate and prune ``pl_module`` block by block with the one engine; masks applied."""
        run = run or PruningRun(self.settings)
        settings, calib = run.settings, find_callback(trainer, Calibration) or Calibration()
        placement = pl_module.placement()
        t0 = time.perf_counter()
        blocks, inputs, store, shares = calib.block_inputs(trainer, pl_module, settings.needs_activations)
        t1 = time.perf_counter()
        ckpt = run.checkpoints or NoCheckpoints()
        if settings.structure.enabled:
            result = reshape_model(pl_module, blocks, inputs, settings.structure, store, placement,
                                   trainer.is_global_zero, ckpt)
            return self._done(run, result, shares, t0, t1)
        removed = prune_experts(blocks, inputs, settings.experts_ratio, pl_module.model.config, store, placement,
                                trainer.is_global_zero) if settings.experts_ratio else {}
        plan = ckpt.plan(lambda: settings.plan(blocks, inputs, pl_module.block_targets, store, trainer.is_global_zero,
                                               placement))
        t_plan = time.perf_counter() - t1  # OWL's dense statistics pass: calibration forwards too
        start, done = ckpt.restore(blocks, inputs)
        result = prune_sequential(
            blocks, inputs, pl_module.block_targets, settings.method, plan, settings.options,
            bias_correction=settings.bias_correction, propagate=calib.propagate, store_device=store,
            progress=trainer.is_global_zero, placement=placement, start=start, on_block=ckpt.save,
            keep_masks=getattr(ckpt, "keep_masks", True), rare=settings.rare, reconstruct=settings.reconstruct,
        )
        merge_resumed(done, result, start)
        result.experts = removed
        result.forward_s += t_plan if settings.allocation.needs_activations else 0.0
        return self._done(run, result, shares, t0, t1)

    def _done(self, run: PruningRun, result: PruneResult, shares, t0: float, t1: float) -> PruneResult:
        result.samples_per_rank = shares
        self.masks, self.masks_source = result.masks, "pruned"
        result.calibration_data_s, result.total_s = t1 - t0, time.perf_counter() - t1
        self.result = run.result = result
        return result

    @property
    def wants_masks(self) -> bool:
        return self.enabled or self.masks_from is not None

    def obtain_masks(self, trainer, pl_module) -> bool:
        """Masks when there are none yet: loaded (``masks_from``) or computed (``enabled``). True if new."""
        if self.masks:
            return False
        if self.masks_from is not None:
            self.masks = masks_from(self.masks_from, pl_module.all_targets())
            self.masks_source = f"masks_from:{self.masks_from}"
        elif self.enabled:
            if self.settings.structure.enabled and trainer.state.fn == "fit":
                raise ValueError("pruning.structure reshapes the model, which fit's optimizer already holds: prune with "
                                 "--save_model true, then fit the saved, smaller model (distilling from the dense one)")
            if is_sharded(pl_module.model):
                raise NotImplementedError(
                    "the Pruning callback computes masks on whole weights, and this model's weights are sharded "
                    f"({type(trainer.strategy).__name__}): prune first on one device or with ddp "
                    "(prune --save_model true), then fit the sharded model with "
                    "--pruning.masks_from <that output>/masks.pt"
                )
            self.prune(trainer, pl_module)
        else:
            return False
        return True

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._untouched:
            return
        if self._run is not None:  # a command's explicit step: nothing else decides
            if self._run.result is None:
                self.prune(trainer, pl_module, self._run)
                self.apply(pl_module)
        elif self.wants_masks and self.obtain_masks(trainer, pl_module):
            self.apply(pl_module)

    def on_fit_start(self, trainer, pl_module) -> None:
        """Masks from the checkpoint (restored before this hook, or before ``on_train_start`` where the strategy
        restores after its setup), ``masks_from`` or pruning now; applied, given to the module (masked LoRA), kept."""
        if self.wants_masks or self.masks:
            check_strategy(trainer)  # early; _start checks again, masks restored from a checkpoint included
        if getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            # ModelParallelStrategy (and the other sharded ones) restore the checkpoint, this callback's
            # masks and the weights included, only after on_fit_start: start once it is in place.
            return
        self._start(trainer, pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(trainer.strategy, "restore_checkpoint_after_setup", False):
            self._start(trainer, pl_module)

    def _start(self, trainer, pl_module) -> None:
        if self.wants_masks:
            self.obtain_masks(trainer, pl_module)
        if not self.masks:
            return
        check_strategy(trainer)
        # Masks made under a validation's inference mode cannot enter autograd (the masked LoRA update).
        self.masks = {k: v.clone() if v.is_inference() else v for k, v in self.masks.items()}
        self.apply(pl_module)
        self.masks = with_zeros(self.masks, pl_module.model)
        pl_module.set_masks(self.masks)
        self.start_sparsity = overall_sparsity(pl_module.all_targets())  # a collective when sharded
        self._remove_hooks()
        self._live = [(w, m, local_mask(m, w)) for w, m in self._params(pl_module) if w.requires_grad]
        if self._live:
            # Right after every optimizer step that runs (AMP's skipped steps change nothing), with
            # gradient accumulation, manual optimization or several optimizers alike.
            self._handles = [opt.register_step_post_hook(self._after_step) for opt in trainer.optimizers]
        log.info("keeping %d masks (%d trainable layers) while fitting", len(self.masks), len(self._live))

    def on_fit_end(self, trainer, pl_module) -> None:
        self._remove_hooks()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._live = [], []

    # --- keeping masks ---
    def _params(self, pl_module):
        # Mask names are relative to the wrapped network (``pl_module.model``).
        return parameters_and_masks(pl_module.model, self.masks)

    @torch.no_grad()
    def apply(self, pl_module) -> None:
        """Zero every masked weight and tell the module which masks it now carries."""
        for weight, mask in self._params(pl_module):
            local(weight).masked_fill_(local_mask(mask, weight), 0)
        pl_module.set_masks(self.masks)

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs) -> None:
        for weight, _, piece in self._live:
            local(weight).masked_fill_(piece, 0)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Before clipping and the step: pruned weights neither move nor count in a gradient norm.
        for weight, mask, piece in self._live:
            grad = weight.grad
            if grad is None:
                continue
            if is_dtensor(grad) and tuple(grad.placements) != tuple(weight.placements):
                piece = local_mask(mask, grad)  # a gradient laid out unlike its weight: cut for it
            local(grad).masked_fill_(piece, 0)

    def state_dict(self) -> dict:
        return {"masks": self.masks, "config": self.describe()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.masks = state_dict["masks"]
        self.masks_source = f"checkpoint (pruned with {state_dict.get('config')})"


CALLBACK_DOCS = {
    "enabled": "prune when ``validate`` or ``fit`` starts (``prune`` and ``sweep`` prune as their own step).",
    "masks_from": "take the masks instead of computing them: ``zeros`` (the zeros of an already pruned "
                  "model) or a mask file (``masks.pt``, or its folder). ``fit`` uses them even without ``enabled``.",
}


def _docstring() -> str:
    """The Args the CLI shows: the general settings, then every option of the method and step tables."""
    general = {**general_docs(), **CALLBACK_DOCS}
    assert set(general) == set(GENERAL) | {"enabled", "masks_from"}, "every general setting documented"
    lines = [f"    {k}: {v}" for k, v in general.items()]
    lines += [f"    {name}: {o.doc}" for name, o in options().items()]
    return "Prune with a method (and its steps) at a sparsity, and keep the masks while fitting.\n\nArgs:\n" + \
        "\n".join(lines)


def _signature() -> inspect.Signature:
    """``__init__``'s signature with every method's options as keyword arguments (what jsonargparse
    reads to make ``--pruning.*``): a new method's option is a CLI option with no edit here."""
    own = [p for p in inspect.signature(Pruning.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.type)
             for name, o in options().items()]
    return inspect.Signature(own + extra)


def refresh() -> None:
    """Re-read the method and step tables (a test that adds a method to them calls this)."""
    Pruning.__init__.__signature__ = None
    Pruning.__init__.__signature__ = _signature()
    Pruning.__doc__ = _docstring()


refresh()
