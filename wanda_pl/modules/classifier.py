"""LightningModule around a timm image classifier: validated by top-1 / top-5 accuracy and top-1
agreement with the dense model, pruned by the one engine, fine-tuned in full.

What the blocks and targets of a timm network are, and how pixels go in: :mod:`wanda_pl.families.timm`;
building, loading and saving it: :mod:`wanda_pl.families.timm_build`; the metrics:
:mod:`wanda_pl.eval.vision`. This module implements :class:`wanda_pl.modules.protocol.PrunableModule`.

Agreement: the first validation run on an unpruned model (no masks given by :meth:`set_masks`)
stores the dense top-1 of every image by its dataset index (gathered from all ranks); later runs
compare against it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.hooks import BlockInput
from ..core.onload import Placement
from ..core.patterns import check_patterns
from ..core.types import Blocks
from ..eval.metric import compare_line
from ..eval.vision import AGREEMENT, AGREEMENT_UNLABELLED, TOP1, TOP5, Agreement, top_k_accuracy, validation_results
from ..families import timm as family
from ..families import timm_build
from .training import adamw, record_train_loss, trainable_params


class Classifier(L.LightningModule):
    """A timm image classifier to prune and validate (top-1, top-5, agreement with the dense model).

    Args:
        name: timm model name (``vit_base_patch16_224``, ``deit_base_patch16_224``,
            ``convnext_base``, ``tf_efficientnet_lite0`` ...). Optional with ``embedded`` or a saved folder.
        pretrained: timm's pretrained weights (needs the Hugging Face hub).
        checkpoint_path: local weights: a state_dict file (``.safetensors``, ``.pt``, ``.pth``) for
            ``name``, or a folder written by ``save`` (``config.json`` + ``model.safetensors``).
        embedded: an embedded real model (``efficientnet-lite0``: ImageNet-1k, offline).
        num_classes: classifier classes (default: the checkpoint's / timm's default).
        targets: regexes of the layers to prune (names relative to the timm model; any Linear or
            non-grouped Conv2d they match); None = the block defaults (:mod:`wanda_pl.families.timm`).
        ignore: regexes of layers never to prune.
        convs: also prune the non-grouped Conv2d inside the blocks (EfficientNet 1x1 convs).
        model_kwargs: extra ``timm.create_model`` keyword arguments (e.g. a small ``img_size``).
        data_config: overrides of timm's resolved eval data config (``crop_pct``, ``mean``, ``std``,
            ``input_size``, ``interpolation``, ``crop_mode``): e.g. ``{crop_pct: 1.0}`` for a model
            rebuilt at a small ``img_size``, whose pretrained ``crop_pct`` would crop the image. A
            folder written by ``save`` brings back the data config it was saved with; this wins over it.
        calibration_batch_size: images per forward during calibration.
        learning_rate: for fine-tuning (``fit``).
        weight_decay: for fine-tuning (AdamW).
    """

    measures = (TOP1, TOP5, AGREEMENT, AGREEMENT_UNLABELLED)

    def __init__(
        self,
        name: Optional[str] = None,
        pretrained: bool = False,
        checkpoint_path: Optional[str] = None,
        embedded: Optional[str] = None,
        num_classes: Optional[int] = None,
        targets: Optional[List[str]] = None,
        ignore: Optional[List[str]] = None,
        convs: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        data_config: Optional[Dict[str, Any]] = None,
        calibration_batch_size: int = 32,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_patterns("model.targets", targets)
        check_patterns("model.ignore", ignore)
        self.save_hyperparameters()
        if calibration_batch_size < 1:
            raise ValueError(f"model.calibration_batch_size must be >= 1, got {calibration_batch_size}")
        self.model, self.timm_name, self.path, saved_data_config = timm_build.build(
            name, pretrained, checkpoint_path, embedded, num_classes, model_kwargs)
        self.model.eval()
        self.num_classes = int(self.model.num_classes)
        self.data_config = timm_build.eval_data_config(self.model, saved_data_config, data_config)
        mean, std = (torch.tensor(self.data_config[k], dtype=torch.float32) for k in ("mean", "std"))
        self.register_buffer("pixel_mean", mean, persistent=False)  # not saved: they follow from the data config
        self.register_buffer("pixel_std", std, persistent=False)
        self.top1 = top_k_accuracy(self.num_classes, 1)
        self.top5 = top_k_accuracy(self.num_classes, 5)
        self.agreement = Agreement()  # holds the dense reference between runs
        self.masks: Dict[str, torch.Tensor] = {}  # the applied masks (set_masks): pruned models store no reference
        self._metrics: Dict[str, Any] = {}
        self.train_losses: List[torch.Tensor] = []

    # --- what to prune ---
    def prunable_blocks(
        self, calibration: Optional[torch.Tensor], store_device="cpu", batch_size: Optional[int] = None
    ) -> Tuple[List[Tuple[str, nn.Module]], List[BlockInput]]:
        """The blocks to prune in order and the calibration inputs of the first one, ``batch_size``
        images per input (None: ``calibration_batch_size``)."""
        if calibration is not None and (calibration.dim() != 4 or calibration.shape[1] != 3):
            raise ValueError(f"calibration images must be (N, 3, H, W), got {tuple(calibration.shape)}")
        batches = [] if calibration is None else list(calibration.split(batch_size or self.hparams.calibration_batch_size))
        blocks = self.blocks(batches[0][:1] if batches else None)
        if calibration is None:
            return blocks, []
        first = blocks[0][1]
        return blocks, family.first_inputs(self.model, first, batches, self.pixel_mean, self.pixel_std, store_device)

    def placement(self) -> Placement:
        """Vision models fit one device: no offloading."""
        return Placement()

    def blocks(self, probe: Optional[torch.Tensor] = None) -> Blocks:
        """The block chain, or ``[("", model)]`` when it cannot be used (:func:`wanda_pl.families.timm.blocks`).

        ``probe``: one uint8 image to check the chain with (without one, the chain is trusted)."""
        x = None if probe is None else family.normalize(probe.to(self.device), self.pixel_mean, self.pixel_std)
        return family.blocks(self.model, self.block_targets, x)

    def block_targets(self, name: str, block: nn.Module) -> Dict[str, nn.Module]:
        hp = self.hparams
        return family.select(block, name, hp.targets, hp.ignore or (), hp.convs)

    def all_targets(self) -> Dict[str, nn.Module]:
        return self.block_targets("", self.model)

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """From the Pruning callback whenever it applies masks: a pruned model stores no dense reference."""
        self.masks = dict(masks)

    # --- evaluation ---
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for uint8 pixel images (normalized here) or already-normalized float images."""
        return self.model(family.normalize(images, self.pixel_mean, self.pixel_std))

    def on_validation_epoch_start(self) -> None:
        for metric in (self.top1, self.top5, self.agreement):
            metric.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, indices = batch
        logits = self(images)
        labels = labels.long()
        self.top1.update(logits, labels)
        self.top5.update(logits, labels)
        self.agreement.update(logits, labels, indices)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.agreement.reference is None and not self.masks:
            self.agreement.keep_as_reference()  # the dense top-1 of every image, from every rank
        self._metrics = validation_results(self.top1, self.top5, self.agreement)
        for metric in self.measures:
            if self._metrics[metric.name] is not None:
                # fp64: a python float is logged as float32 and `validate` would print a rounded value
                self.log(metric.name, torch.tensor(self._metrics[metric.name], dtype=torch.float64), prog_bar=True,
                         rank_zero_only=False, sync_dist=False, batch_size=1)

    def validation_metrics(self) -> Dict[str, Any]:
        """``top1``, ``top5``, ``images``, ``labelled``, ``top1_correct``, ``agreement``,
        ``agreement_unlabelled`` of the last validation run (every rank's images)."""
        return dict(self._metrics)

    @property
    def reference(self) -> Optional[torch.Tensor]:
        """The stored dense top-1 per evaluation image (-1: not seen), or None."""
        return self.agreement.reference

    def reset_reference(self) -> None:
        """Forget the stored dense predictions (the next unpruned validation stores new ones)."""
        self.agreement.reference = None

    # --- fine-tuning ---
    def on_fit_start(self) -> None:
        # Built in eval mode and Lightning keeps each module's mode: without this, fit would train
        # with dropout / drop path off and BatchNorm frozen. Runs after the Pruning callback's
        # on_fit_start (callbacks first), whose calibration runs in eval mode regardless.
        self.train_losses = []
        self.model.train()

    def on_fit_end(self) -> None:
        self.model.eval()

    def configure_optimizers(self):
        return adamw(self.model, self.hparams.learning_rate, self.hparams.weight_decay)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        return record_train_loss(self, F.cross_entropy(self(images), labels.long(), ignore_index=-1))

    def finetune_describe(self) -> Dict[str, Any]:
        """Always full fine-tuning (every parameter that requires a gradient), with the shared AdamW."""
        trainable = trainable_params(self.model)
        return {"finetune": "full", "learning_rate": self.hparams.learning_rate,
                "weight_decay": self.hparams.weight_decay, "trainable_params": trainable}

    # --- reporting ---
    @staticmethod
    def measured_on(metrics: Dict[str, Any]) -> Dict[str, Any]:
        """How many images the metrics are over (every rank's), and how many of them labelled."""
        return {"eval_counts": {"images": metrics.get("images"), "labelled": metrics.get("labelled")}}

    def metrics_line(self, dense: Optional[Dict[str, Any]], pruned: Dict[str, Any]) -> str:
        # the dense model agrees with itself: its agreement goes without saying
        return (f"{compare_line((TOP1, TOP5), dense, pruned)}; "
                f"{AGREEMENT.short} {AGREEMENT.show(pruned.get(AGREEMENT.name))} over {pruned.get('images')} images")

    def save(self, folder, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """``model.safetensors`` (timm state_dict) + ``config.json``: reload with ``checkpoint_path=folder``."""
        timm_build.save_folder(folder, self.model, self.timm_name, self.num_classes, self.hparams.model_kwargs,
                               self.data_config, state_dict)

    def plain_data_config(self) -> Dict[str, Any]:
        """The eval data config as JSON values (tuples as lists)."""
        return timm_build.plain_data_config(self.data_config)

    def describe(self) -> Dict[str, Any]:
        return {
            "model": self.hparams.embedded or self.timm_name,
            "timm_name": self.timm_name,
            "model_path": self.path,
            "num_classes": self.num_classes,
            "convs": self.hparams.convs,
            "data_config": self.plain_data_config(),
            "targets": self.hparams.targets,
            "ignore": self.hparams.ignore,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
