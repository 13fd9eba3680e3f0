"""timm image classifiers: building the network, its weight files and saved folders, its data config.

A network comes from exactly one source: timm's pretrained weights (the Hugging Face hub), a
local state-dict file for a named timm model, a folder written by :func:`save_folder`, or an
embedded model (a folder of the same layout, built once from a package). The eval data config
(input size, crop, interpolation, mean/std) is timm's, corrected for a ViT rebuilt at another
``img_size``, then the saved folder's, then the user's overrides.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
WEIGHT_FILES = ("model.safetensors", "model.pt", "pytorch_model.bin")  # in a saved folder, first found wins


class Built(NamedTuple):
    model: nn.Module
    timm_name: str
    path: Optional[str]  # the local weights it was loaded from (a file or a folder), None for timm's own
    saved_data_config: Dict[str, Any]  # what a folder written by save_folder() was evaluated with


def load_state_dict_file(path: Path) -> Dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (plain, or under ``state_dict`` / ``model``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state_dict")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in obj.items()}


def checked_data_config(overrides: Dict[str, Any]) -> Dict[str, Any]:
    """``overrides`` of timm's data config, checked, with lists made tuples as timm keeps them."""
    unknown = sorted(set(overrides) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"model.data_config: unknown key(s) {unknown}; allowed: {', '.join(DATA_CONFIG_KEYS)}")
    out = {}
    for key, value in overrides.items():
        if key in ("input_size", "mean", "std"):
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise ValueError(f"model.data_config.{key} must be a list of 3 numbers, got {value!r}")
            value = tuple(value)
        if key == "crop_pct" and not (isinstance(value, (int, float)) and 0 < value <= 2):
            raise ValueError(f"model.data_config.crop_pct must be a number in (0, 2], got {value!r}")
        out[key] = value
    return out


def saved_folder(path: Path) -> Tuple[Path, Dict[str, Any]]:
    """(weights file, config) of a folder written by :func:`save_folder` or an embedded model."""
    config = json.loads((path / "config.json").read_text())
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name, config
    raise FileNotFoundError(f"{path} has config.json but no model.safetensors / model.pt")


def _embedded_folder(name: str) -> Path:
    from ..assets.registry import AssetError, ensure

    try:
        return Path(ensure(name))
    except AssetError as err:
        raise ValueError(f"model.embedded: {err}") from err


def _create(name: str, pretrained: bool, kwargs: Dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"model.name {name!r}: {err}") from err
        raise
    except Exception as err:
        if pretrained:
            raise ValueError(
                f"could not get timm's pretrained weights for {name!r} (they come from the Hugging Face hub): "
                f"{type(err).__name__}: {str(err)[:300]}\nWithout the hub, use model.checkpoint_path (a local file) "
                f"or model.embedded (efficientnet-lite0)") from err
        raise


def build(name: Optional[str], pretrained: bool = False, checkpoint_path: Optional[str] = None,
          embedded: Optional[str] = None, num_classes: Optional[int] = None,
          model_kwargs: Optional[Dict[str, Any]] = None) -> Built:
    """The timm network from at most one of ``pretrained`` / ``checkpoint_path`` / ``embedded``
    (none: random weights), with a saved folder's name, kwargs and class count as defaults."""
    kwargs = dict(model_kwargs or {})
    path, weights = None, None
    saved_data_config: Dict[str, Any] = {}
    sources = [s for s, v in (("pretrained", pretrained), ("checkpoint_path", checkpoint_path),
                              ("embedded", embedded)) if v]
    if len(sources) > 1:
        raise ValueError(f"model: give at most one of pretrained / checkpoint_path / embedded, got {sources}")
    folder: Optional[Path] = None
    if embedded:
        folder = _embedded_folder(embedded)
    elif checkpoint_path:
        p = Path(checkpoint_path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"model.checkpoint_path {checkpoint_path!r} does not exist")
        if p.is_dir():
            folder = p
        else:
            weights, path = p, str(p)
    if folder is not None:
        weights, config = saved_folder(folder)
        path = str(folder)
        saved_name = config.get("timm_name")
        if name and saved_name and name != saved_name:
            raise ValueError(f"model.name {name!r} does not match the saved model's {saved_name!r}")
        name = name or saved_name
        kwargs = {**config.get("model_kwargs", {}), **kwargs}
        num_classes = num_classes or config.get("num_classes")
        saved_data_config = config.get("data_config") or {}
    if not name:
        raise ValueError("model.name (a timm model name) is required unless model.embedded or a saved folder is given")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _create(name, bool(pretrained), kwargs)
    if weights is not None:
        state = load_state_dict_file(Path(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"weights {weights} do not fit timm {name!r}: missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")
    return Built(model, name, path, saved_data_config)


def eval_data_config(model: nn.Module, saved: Dict[str, Any], overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """timm's resolved eval data config of ``model``, then ``saved`` (a saved folder's), then ``overrides``."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)  # ViT-style fixed input
    if fixed is not None and tuple(config["input_size"][1:]) != tuple(fixed):
        config["input_size"] = (3, *tuple(fixed))  # built with another img_size than its pretrained cfg
    config.update(checked_data_config({**saved, **(overrides or {})}))
    return config


def plain_data_config(data_config: Dict[str, Any]) -> Dict[str, Any]:
    """A data config as JSON values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def save_folder(folder, model: nn.Module, timm_name: str, num_classes: int, model_kwargs: Optional[Dict[str, Any]],
                data_config: Dict[str, Any], state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """``model.safetensors`` (timm state_dict; ``state_dict`` when given, e.g. the gathered weights
    of a sharded model) + ``config.json``: :func:`build` reloads it with ``checkpoint_path=folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = model.state_dict() if state_dict is None else state_dict
    save_file({k: v.detach().contiguous().cpu() for k, v in source.items()}, str(folder / "model.safetensors"))
    config = {"timm_name": timm_name, "num_classes": num_classes,
              "model_kwargs": {k: v for k, v in (model_kwargs or {}).items() if k != "num_classes"},
              "data_config": plain_data_config(data_config)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
