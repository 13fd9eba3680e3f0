"""Pruning Callback: computes masks with the engine, applies them, and keeps them applied.

Masks are callback state (saved in checkpoints); weights stay dense-shaped, edited in place. While
fitting, pruned weights' gradients are zeroed before each optimizer step and the weights re-masked
after it, so momentum, weight decay or Adam's moments cannot revive one. Sharded weights (FSDP2,
tensor parallel DTensors) keep full-shape masks: each rank cuts its piece as the weight is cut and
edits its local shard; FSDP1 and DeepSpeed hold flat pieces of several weights: refused."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from lightning.pytorch.callbacks import Callback

from ..core import correction
from ..core.allocation import Allocation
from ..core.engine import (NoCheckpoints, PruneResult, check_targets, merge_resumed, needs_activations,
                           prune_sequential)
from ..core.plan import uniform
from ..core.sparsity import SparsitySpec
from ..methods import check_knobs, get_method, ria
from ..methods.compose import compose
from ..training.masks import check_strategy, mask_files, masks_from, with_zeros
from ..training.sharding import is_dtensor, is_sharded, local, local_mask, overall_sparsity
from .calibration import Calibration
from .lookup import find_callback

log = logging.getLogger(__name__)


class Pruning(Callback):
    """Args:
        method: magnitude | wanda | sparsegpt | ablate_{mag,wanda}_{seq,iter} | ria | admm (gradual ADMM).
        sparsity_ratio: fraction of weights to prune, in [0, 1) (unset: N/M for N:M, else 0.5).
        sparsity_type: ``unstructured`` or ``N:M`` (N pruned of every M consecutive inputs, e.g. 2:4).
        use_variant: the Wanda variant (per-row threshold on cumulative scores; unstructured only).
        granularity: comparison group, ``row`` or ``layer`` (unset: the method's default).
        blocksize, percdamp: SparseGPT's column block size and damping (a fraction of the Hessian's mean diagonal).
        ria_alpha, ria_permute: RIA's exponent of the input norm (0.5 as its paper); its channel permutation (N:M).
        refine: after a mask-only method's mask: ``none`` or ``dsnot`` (DSnoT's prune-and-grow swaps).
        dsnot_cycles, dsnot_threshold, dsnot_var_power: DSnoT's cycles, stop on ``|e|``, variance power.
        update: after a mask-only method: ``none`` or ``admm`` (ADMM's reconstruction of the outputs on the mask).
        admm_iterations, admm_rho, admm_percdamp, admm_gradual: ADMM's iterations (>= 1), penalty,
            damping (of the scaled X^T X) and, for the ``admm`` method, the iterations its gradual mask takes.
        bias_correction: put back each pruned layer's mean output (``(W - W') E[x]``) into its bias (or the
            running mean of the BatchNorm a bias-free conv feeds); methods then weigh activations about
            their mean. For EfficientNet-like conv nets, ViT, OPT; bias-free linears (LLaMA) are refused.
        allocation: how the ratio is spread over the blocks: ``uniform``, ``owl`` (blocks with more
            outlier scores pruned less, from a dense statistics pass) or ``profile``; unstructured only.
        owl_m: OWL's outlier threshold, in multiples of a block's mean Wanda score.
        owl_lambda: OWL's spread: the blocks' sparsities span ``2 * owl_lambda`` around ``sparsity_ratio``.
        profile: with ``allocation: profile``: a sparsity per block (a list) or per layer (regex -> ratio).
        enabled: prune when validation or fitting starts (``prune`` turns it on after the dense baseline).
        masks_from: take the masks instead of computing them: ``zeros`` (the zeros of an already pruned model,
            e.g. ``--model.name_or_path outputs/x/model``) or a mask file (``masks.pt`` from ``prune --save_model
            true`` or a fine-tuning run, or its folder). ``fit`` uses them even without ``enabled``.
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
        ria_alpha: float = 0.5,
        ria_permute: bool = False,
        refine: str = "none",
        dsnot_cycles: int = 50,
        dsnot_threshold: float = 0.1,
        dsnot_var_power: float = 1.0,
        update: str = "none",
        admm_iterations: int = 20,
        admm_rho: float = 1.0,
        admm_percdamp: float = 0.1,
        admm_gradual: int = 15,
        bias_correction: bool = False,
        allocation: str = "uniform",
        owl_m: float = 5.0,
        owl_lambda: float = 0.08,
        profile: Optional[Union[List[float], Dict[str, float]]] = None,
        enabled: bool = False,
        masks_from: Optional[str] = None,
    ) -> None:
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # sweeps vary them
        self.spec = SparsitySpec.parse(sparsity_type, sparsity_ratio)
        self.method, self.refine, self.update = compose(get_method(method), refine, update), refine, update
        if refine != "none" and bias_correction:
            raise ValueError("pruning.refine dsnot balances the mean output change that bias_correction restores "
                             "exactly: use one of them")
        if use_variant and (self.spec.structured or "use_variant" not in self.method.option_names):
            raise ValueError(f"pruning.use_variant needs unstructured sparsity and a method that has it (wanda), "
                             f"got method={method!r}, sparsity_type={self.spec.type!r}")
        self.knobs = dict(granularity=granularity, use_variant=use_variant, blocksize=blocksize, percdamp=percdamp,
                          ria_alpha=ria_alpha, ria_permute=ria_permute, admm_iterations=admm_iterations,
                          admm_rho=admm_rho, admm_percdamp=admm_percdamp, admm_gradual=admm_gradual,
                          dsnot_cycles=dsnot_cycles, dsnot_threshold=dsnot_threshold, dsnot_var_power=dsnot_var_power)
        check_knobs(**self.knobs)  # every knob, whether or not this method reads it: a typo must not wait
        if ria_permute and "ria_permute" in self.method.option_names and (refine != "none" or not self.spec.structured):
            raise ValueError(f"{ria.PERMUTE_ONLY_NM} and without pruning.refine (DSnoT swaps within the unpermuted "
                             f"groups), got sparsity_type={self.spec.type!r}, refine={refine!r}")
        self.options = self.method.make_options(**self.knobs)
        self.bias_correction = bias_correction
        self.allocation = Allocation(allocation, owl_m, owl_lambda, profile)
        self.allocation.check(self.spec)
        if masks_from is not None and masks_from != "zeros":
            if not mask_files(masks_from):
                raise ValueError(f"pruning.masks_from must be 'zeros' or a mask file (or a folder holding masks.pt); "
                                 f"{masks_from!r} is neither")
        self.enabled = enabled
        self.masks_from = masks_from
        self.masks_source: Optional[str] = None  # where the current masks came from, for reports
        self.start_sparsity: Optional[float] = None  # measured when fitting starts, masks applied
        # (trainable weight, full mask, this rank's piece of it on the weight's device)
        self._live: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._handles: list = []
        self.masks: Dict[str, torch.Tensor] = {}
        self.outcome: Optional[PruneResult] = None  # set by prune(), read by the commands
        self.checkpoints = None  # per-block checkpoints of a resumable run (set by the prune command)

    def describe(self) -> dict:
        """The report's ``method`` section."""
        hessian = {k: self.knobs[k] for k in ("blocksize", "percdamp") if k in self.method.option_names}
        return {
            "method": self.method.name, "refine": self.refine, "update": self.update,
            "sparsity_type": self.spec.type, "sparsity_ratio": self.spec.ratio,
            "use_variant": self.knobs["use_variant"], "bias_correction": self.bias_correction,
            "granularity": self.knobs["granularity"] or self.method.default_granularity,
            **hessian,
            "method_options": self.method.describe_options(self.options),  # all the method itself reads
            **self.allocation.describe(),
            **({"masks_from": self.masks_from} if self.masks_from is not None else {}),
        }

    def check(self, pl_module) -> None:
        """Fail early where a layer cannot take the sparsity (M does not divide it), a profile or a bias correction."""
        targets = pl_module.all_targets()
        blocks, _ = pl_module.prunable_blocks(None)
        owl = self.allocation.needs_activations  # its plan needs the dense pass: checked as uniform here
        check_targets(targets, uniform(self.spec, targets) if owl else
                      self.allocation.plan(self.spec, blocks, (), pl_module.block_targets))
        if self.bias_correction:
            correction.check_possible(targets, [pl_module])

    @property
    def needs_activations(self) -> bool:
        return needs_activations(self.method, self.bias_correction) or self.allocation.needs_activations

    # --- computing masks ---
    @contextmanager
    def armed(self) -> Iterator["Pruning"]:
        """Prune at the start of the next validation run inside this block (``prune`` does so after
        the dense baseline): the masks are computed where Lightning put the model, on every rank."""
        was, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = was

    def prune(self, trainer, pl_module) -> PruneResult:
        """Calibrate and prune ``pl_module`` block by block with the one engine; masks applied."""
        calib = find_callback(trainer, Calibration) or Calibration()
        placement = pl_module.placement()
        t0 = time.perf_counter()
        blocks, inputs, store, shares = calib.block_inputs(trainer, pl_module, self.needs_activations)
        t1 = time.perf_counter()
        ckpt = self.checkpoints or NoCheckpoints()
        plan = ckpt.plan(lambda: self.allocation.plan(self.spec, blocks, inputs, pl_module.block_targets, store,
                                                      trainer.is_global_zero, placement))
        t_plan = time.perf_counter() - t1  # OWL's dense statistics pass: calibration forwards too
        start, done = ckpt.restore(blocks, inputs)
        result = prune_sequential(
            blocks, inputs, pl_module.block_targets, self.method, plan, self.options,
            bias_correction=self.bias_correction, propagate=calib.propagate, store_device=store,
            progress=trainer.is_global_zero, placement=placement, start=start, on_block=ckpt.save,
            keep_masks=getattr(ckpt, "keep_masks", True),
        )
        merge_resumed(done, result, start)
        result.samples_per_rank = shares
        self.masks, self.masks_source = result.masks, "pruned"
        result.calibration_data_s, result.total_s = t1 - t0, time.perf_counter() - t1
        result.forward_s += t_plan if self.allocation.needs_activations else 0.0
        self.outcome = result
        return self.outcome

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
        if not trainer.sanity_checking and self.wants_masks and self.obtain_masks(trainer, pl_module):
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
        for name, mask in self.masks.items():
            yield pl_module.model.get_submodule(name).weight, mask

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
