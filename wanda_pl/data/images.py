"""LightningDataModule for image-classifier calibration and evaluation (ImageNet folder layout).

Layout of ``root``::

    root/train/...            calibration images (any depth: class folders or flat; labels unused)
    root/val/<class>/<image>  evaluation images, labelled by their folder

Class folders are integer class indices, ImageNet-1k WordNet ids or any names in sorted order
(:mod:`wanda_pl.data.image_files`, which finds and loads the files). ``unlabelled`` adds a folder
of extra images (any depth) that are evaluated for *agreement with the dense model* only (label -1).

Transforms: both calibration and evaluation use the model's own EVAL transform
(``timm.data.resolve_data_config`` + ``create_transform(is_training=False)``: resize, center crop).
The reference passed its 4096 calibration images through the *training* augmentation (random
resized crops, flips); we calibrate on what the model sees at test time, deterministically. Images
leave this module as uint8 pixel tensors (N, 3, H, W): 4x smaller than floats; the model's
``Normalize`` (mean/std) is applied by the model (:func:`wanda_pl.families.timm.normalize`),
exactly as ``ToTensor`` + ``Normalize`` would.

Calibration draws ``nsamples`` images **with replacement** (as the reference) from the calibration
files with ``torch.Generator().manual_seed(seed)``; the draw is kept and reused.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from .image_files import (IMAGE_EXTENSIONS, ImageDataset, labelled_images, list_images, load_image, pixel_transform,
                          resolve_root)
from .counts import check_at_least, my_share

log = logging.getLogger(__name__)


class ImageFolderDataModule(L.LightningDataModule):
    """Calibration and evaluation images in ImageNet folder layout.

    Args:
        root: a folder (``train/`` for calibration, ``val/<class>/`` for evaluation) or an embedded
            asset name (``imagenet-photos``: the 20 labelled ImageNet photos and real calibration photos).
        nsamples: calibration images, drawn with replacement (the paper used 4096).
        seed: seed of the calibration draw; linked to ``seed_everything``.
        batch_size: images per evaluation batch (and per calibration forward, via the model).
        num_workers: DataLoader workers for evaluation.
        unlabelled: a folder or embedded asset (``natural-images``) of extra images evaluated for
            top-1 agreement with the dense model only.
        max_eval_images: evaluate only the first labelled images (None: all).
        calibration_split: subfolder of ``root`` with the calibration images.
        evaluation_split: subfolder of ``root`` with the labelled evaluation images.
    """

    def __init__(
        self,
        root: str = "imagenet-photos",
        nsamples: int = 4096,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        unlabelled: Optional[str] = None,
        max_eval_images: Optional[int] = None,
        calibration_split: str = "train",
        evaluation_split: str = "val",
    ) -> None:
        super().__init__()
        check_at_least(nsamples=(nsamples, 1), batch_size=(batch_size, 1), num_workers=(num_workers, 0),
                       max_eval_images=(max_eval_images, (1, None)))
        self.root, self.unlabelled = root, unlabelled
        self.nsamples, self.seed, self.batch_size, self.num_workers = nsamples, seed, batch_size, num_workers
        self.max_eval_images = max_eval_images
        self.calibration_split, self.evaluation_split = calibration_split, evaluation_split
        self.data_config: Optional[Dict[str, Any]] = None
        self.num_classes: Optional[int] = None
        self.transform: Optional[Callable] = None
        self.eval_items: Optional[List[Tuple[Path, int]]] = None
        self.class_rule: Optional[str] = None
        self.calibration_files: Optional[List[Path]] = None
        self._calib: Optional[torch.Tensor] = None
        self._calib_draw: Optional[torch.Tensor] = None

    # --- connecting to the model ---
    def setup(self, stage: str) -> None:
        # Lightning's hook: a datamodule nobody prepared gets the trainer's module.
        if self.transform is None and self.trainer is not None:
            self.prepare_for(self.trainer.lightning_module)

    def connect(self, data_config: Dict[str, Any], num_classes: Optional[int] = None) -> None:
        """Late facts from the model: its timm data config (input size, crop, interpolation) and class count."""
        if self.data_config is not None and dict(self.data_config) != dict(data_config):
            self._calib = None  # another model (another input size): redo the calibration images
        self.data_config = dict(data_config)
        self.num_classes = num_classes
        self.transform = pixel_transform(self.data_config)

    def prepare_for(self, module) -> None:
        """Connect to ``module`` and list (and check) every file, so bad settings fail before long work."""
        self.connect(module.data_config, getattr(module, "num_classes", None))
        self.evaluation_items()
        self._calibration_files()

    def _need_transform(self) -> None:
        if self.transform is None:
            raise RuntimeError("ImageFolderDataModule is not connected to a model yet: call prepare_for(model)")

    # --- files ---
    def _root(self) -> Path:
        return resolve_root(self.root, "root")

    def evaluation_items(self) -> List[Tuple[Path, int]]:
        """(path, label) of every evaluation image: the labelled ones, then the unlabelled (label -1)."""
        if self.eval_items is None:
            folder = self._root() / self.evaluation_split
            if not folder.is_dir():
                raise FileNotFoundError(f"evaluation folder {folder} does not exist (expected {self.root}/"
                                        f"{self.evaluation_split}/<class>/<image>)")
            items, self.class_rule = labelled_images(folder)
            if not items:
                raise ValueError(f"no images found under {folder}/<class>/ (extensions: {', '.join(IMAGE_EXTENSIONS)})")
            if self.max_eval_images is not None:
                items = items[: self.max_eval_images]
            top = max(label for _, label in items)
            if self.num_classes is not None and top >= self.num_classes:
                raise ValueError(f"{folder} has class index {top} ({self.class_rule}) but the model has only "
                                 f"{self.num_classes} classes")
            extra: List[Tuple[Path, int]] = []
            if self.unlabelled is not None:
                ufolder = resolve_root(self.unlabelled, "unlabelled")
                extra = [(p, -1) for p in list_images(ufolder)]
                if not extra:
                    raise ValueError(f"data.unlabelled {self.unlabelled!r}: no images found under {ufolder}")
            self.eval_items = items + extra
        return self.eval_items

    def _calibration_files(self) -> List[Path]:
        if self.calibration_files is None:
            folder = self._root() / self.calibration_split
            if not folder.is_dir():
                raise FileNotFoundError(f"calibration folder {folder} does not exist (expected {self.root}/"
                                        f"{self.calibration_split}/...: images, in class folders or not)")
            files = list_images(folder)
            if not files:
                raise ValueError(f"no calibration images found under {folder}")
            self.calibration_files = files
        return self.calibration_files

    # --- calibration ---
    def calibration_draw(self) -> torch.Tensor:
        """Indices into the calibration files: ``nsamples`` draws with replacement (seeded)."""
        if self._calib_draw is None:
            files = self._calibration_files()
            gen = torch.Generator().manual_seed(self.seed)
            self._calib_draw = torch.randint(len(files), (self.nsamples,), generator=gen)
        return self._calib_draw

    def calibration_images(self) -> torch.Tensor:
        """(nsamples, 3, H, W) uint8 pixels after the model's eval resize/crop; drawn once and kept."""
        if self._calib is None:
            self._need_transform()
            files = self._calibration_files()
            draw = self.calibration_draw()
            unique = {int(i): load_image(files[int(i)], self.transform) for i in torch.unique(draw)}
            self._calib = torch.stack([unique[int(i)] for i in draw])
            log.info("calibration: %d images drawn with replacement from %d files (%d distinct)",
                     self.nsamples, len(files), len(unique))
        return self._calib

    calibration_data = calibration_images  # the name the calibration callback asks every datamodule for

    # --- evaluation ---
    def val_dataloader(self) -> DataLoader:
        self._need_transform()
        items = self.evaluation_items()
        ds = ImageDataset(items, self.transform, my_share(len(items), self.trainer))
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def train_dataloader(self) -> DataLoader:
        """Labelled ``root/train/<class>/`` images for fine-tuning (eval transform, shuffled, seeded)."""
        self._need_transform()
        folder = self._root() / self.calibration_split
        items, rule = labelled_images(folder)
        if self.num_classes is not None and items and max(label for _, label in items) >= self.num_classes:
            raise ValueError(f"{folder} has more classes ({rule}) than the model ({self.num_classes})")
        ds = ImageDataset(items, self.transform, my_share(len(items), self.trainer))
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, generator=gen, num_workers=self.num_workers)

    def describe(self) -> dict:
        items = self.eval_items or []
        labelled = sum(1 for _, label in items if label >= 0)
        return {
            "data_root": self.root,
            "calibration": f"{self.root}/{self.calibration_split}",
            "evaluation": f"{self.root}/{self.evaluation_split}" + (f" + {self.unlabelled}" if self.unlabelled else ""),
            "nsamples": self.nsamples,
            "seed": self.seed,
            "calibration_files": None if self.calibration_files is None else len(self.calibration_files),
            "calibration_transform": "model eval transform (resize + center crop), no augmentation",
            "eval_images": labelled,
            "unlabelled_images": len(items) - labelled,
            "class_folders": self.class_rule,
            "input_size": None if self.data_config is None else list(self.data_config.get("input_size", ())),
        }
