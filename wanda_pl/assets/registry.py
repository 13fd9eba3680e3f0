"""The one table of embedded assets: every name, what kind of thing it is, and the function
that builds it. The lists that options and error messages use (``EMBEDDED_MODELS`` for
``--model.name_or_path``, ``EMBEDDED_TEXT`` for the text sources, ...) are derived from it, so
adding or renaming an asset is one line here and cannot leave a stale name elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

from . import models, tasks, text, vision
from .fetch import AssetError

__all__ = ["AssetError", "Asset", "REGISTRY", "KINDS", "names", "ensure", "ensure_all",
           "EMBEDDED_MODELS", "EMBEDDED_TEXT", "EMBEDDED_CLASSIFIERS", "EMBEDDED_IMAGES", "EMBEDDED_TASKS"]

# What a name can stand for: which option accepts it.
CAUSAL_LM = "causal-lm"  # --model.name_or_path
TEXT = "text"  # --data.calibration / --data.evaluation
CLASSIFIER = "classifier"  # --model.embedded of the image classifier
IMAGES = "images"  # --data.root / --data.unlabelled of the image datamodule
TASK_DATA = "tasks"  # zero-shot evaluation, source="embedded"
KINDS = (CAUSAL_LM, TEXT, CLASSIFIER, IMAGES, TASK_DATA)


@dataclass(frozen=True)
class Asset:
    kind: str
    build: Callable[[], Path]  # fetches and converts on first use; the cached folder after
    # For model cards of what is pruned from it: the hub model it was converted from, its licence.
    hub_id: str = ""
    license: str = ""


REGISTRY: Dict[str, Asset] = {
    "smollm2-135m": Asset(CAUSAL_LM, models.smollm2_135m, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "smollm2-moe-8x135m": Asset(CAUSAL_LM, models.smollm2_moe, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    "wikipedia": Asset(TEXT, text.wikipedia),
    "news": Asset(TEXT, text.news),
    "efficientnet-lite0": Asset(CLASSIFIER, vision.efficientnet_lite0, "timm/tf_efficientnet_lite0.in1k", "apache-2.0"),
    "imagenet-photos": Asset(IMAGES, vision.imagenet_photos),
    "natural-images": Asset(IMAGES, vision.natural_images),
    tasks.ASSET_NAME: Asset(TASK_DATA, tasks.zero_shot_tasks),
}


def names(kind: str) -> Tuple[str, ...]:
    """The embedded names of one kind, in table order."""
    if kind not in KINDS:
        raise ValueError(f"unknown asset kind {kind!r}; kinds: {', '.join(KINDS)}")
    return tuple(name for name, asset in REGISTRY.items() if asset.kind == kind)


EMBEDDED_MODELS = names(CAUSAL_LM)
EMBEDDED_TEXT = names(TEXT)
EMBEDDED_CLASSIFIERS = names(CLASSIFIER)
EMBEDDED_IMAGES = names(IMAGES)
EMBEDDED_TASKS = names(TASK_DATA)


def ensure(name: str) -> Path:
    """Local path of the embedded asset ``name`` (fetched and converted on first use)."""
    if name not in REGISTRY:
        raise AssetError(f"unknown embedded asset {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].build()


def ensure_all() -> Dict[str, str]:
    return {name: str(asset.build()) for name, asset in sorted(REGISTRY.items())}
