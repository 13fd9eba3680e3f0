"""Resolving user-given names: embedded assets, local paths, or Hugging Face hub ids.

One rule for every option that takes a model or a data set, so that an offline run fails
with the same advice (a local path, or one of the embedded names) wherever it fails.
"""
from __future__ import annotations

import os
from pathlib import Path

from .registry import EMBEDDED_MODELS, EMBEDDED_TEXT, ensure

__all__ = ["EMBEDDED_MODELS", "EMBEDDED_TEXT", "offline", "looks_like_path", "hub_error", "resolve_model"]


def offline(*variables: str) -> bool:
    """Whether the hub is switched off by the environment (``HF_HUB_OFFLINE``, or any of ``variables``)."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in variables or ("HF_HUB_OFFLINE",))


def looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything more path-like is treated as a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".txt", ".jsonl", ".pt", ".json"))


def hub_error(what: str, name: str, err: Exception, embedded) -> ValueError:
    mode = "HF_HUB_OFFLINE is set" if offline() else "the hub could not be reached or does not have it"
    return ValueError(
        f"could not load {what} {name!r} from the Hugging Face hub ({mode}): {type(err).__name__}: {str(err)[:300]}\n"
        f"Without the hub, use a local path or an embedded name: {', '.join(embedded)}"
    )


def resolve_model(name_or_path: str) -> str:
    """An embedded model name -> its cached folder; a local path -> checked; else a hub id (unchanged)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(ensure(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"model path {str(path)!r} is a file; give a Hugging Face model folder "
                                     f"(config.json, weights, tokenizer files)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; expected a Hugging Face model folder")
        return str(path)
    if looks_like_path(name_or_path):
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist")
    return name_or_path
