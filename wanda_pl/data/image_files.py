"""Image files for the classifier datamodule: finding images, naming their classes, and turning
one file into the uint8 pixels the model's eval transform gives.

Class folders are either integer class indices (``val/243/x.jpg``), WordNet ids of ImageNet-1k
(``val/n02108422/x.JPEG``, mapped to the standard ImageNet index: the sorted list of the 1000
synsets) or, for any other dataset, arbitrary names numbered in sorted order (torchvision's
``ImageFolder`` rule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def list_images(folder: Path) -> List[Path]:
    """Every image file below ``folder`` (any depth), sorted by relative path."""
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: str(p.relative_to(folder)))


def resolve_root(root: str, what: str) -> Path:
    """A local folder, or the name of an embedded image asset (``imagenet-photos``, ``natural-images``)."""
    path = Path(root).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"data.{what} {root!r} is not a folder")
        return path
    from ..assets.registry import REGISTRY, ensure

    if root in REGISTRY:
        return Path(ensure(root))
    raise FileNotFoundError(f"data.{what} {root!r} is neither an existing folder nor an embedded image asset "
                            f"({', '.join(n for n in ('imagenet-photos', 'natural-images') if n in REGISTRY)})")


def class_indices(names: Sequence[str]) -> Tuple[Dict[str, int], str]:
    """Map class-folder names to class indices, and say which rule was used."""
    names = sorted(names)
    if all(n.isdigit() for n in names):
        return {n: int(n) for n in names}, "integer class indices"
    try:
        from timm.data import ImageNetInfo

        synsets = ImageNetInfo().label_names()
    except Exception:  # pragma: no cover - timm without its ImageNet info
        synsets = []
    index = {s: i for i, s in enumerate(synsets)}
    if names and all(n in index for n in names):
        return {n: index[n] for n in names}, "ImageNet-1k WordNet ids"
    return {n: i for i, n in enumerate(names)}, "sorted folder names"


def labelled_images(folder: Path) -> Tuple[List[Tuple[Path, int]], str]:
    """(image, class index) for every image in ``folder/<class>/``."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders; expected {folder}/<class>/<image>")
    mapping, rule = class_indices(classes)
    items = [(img, mapping[c]) for c in classes for img in list_images(folder / c)]
    return items, rule


def _tensor_steps() -> Tuple[type, ...]:
    """The transform classes that turn a PIL image into an array: torchvision's and timm's own."""
    import timm.data.transforms as timm_t
    from torchvision import transforms as T

    return (T.ToTensor, T.PILToTensor, timm_t.ToTensor, timm_t.MaybeToTensor, timm_t.MaybePILToTensor, timm_t.ToNumpy)


def pixel_transform(data_config: Dict[str, Any]) -> Callable:
    """The model's timm eval transform up to (not including) ToTensor/Normalize, then uint8 pixels."""
    from timm.data import create_transform
    from torchvision import transforms as T

    full = create_transform(**data_config, is_training=False)
    steps = list(getattr(full, "transforms", [full]))
    cut = next((i for i, s in enumerate(steps) if isinstance(s, _tensor_steps())), None)
    if cut is None:
        raise ValueError(f"unexpected timm eval transform (no ToTensor step): {full}")
    rest = steps[cut + 1:]
    if not (rest == [] or (len(rest) == 1 and isinstance(rest[0], T.Normalize))):
        names = [type(s).__name__ for s in rest]
        raise ValueError(f"unexpected steps after ToTensor in the timm eval transform: {names}")
    return T.Compose(steps[:cut] + [T.PILToTensor()])


def load_image(path: Path, transform: Callable) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        x = transform(im.convert("RGB"))
    if x.dtype != torch.uint8 or x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"transform of {path} gave {x.dtype} {tuple(x.shape)}, expected uint8 (3, H, W)")
    return x


class ImageDataset(Dataset):
    """(uint8 image (3, H, W), label (-1 = unlabelled), index) for each item."""

    def __init__(self, items: Sequence[Tuple[Path, int]], transform: Callable, indices: Optional[Sequence[int]] = None):
        self.items = list(items)
        self.transform = transform
        self.indices = list(range(len(self.items))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path, label = self.items[idx]
        return load_image(path, self.transform), label, idx
