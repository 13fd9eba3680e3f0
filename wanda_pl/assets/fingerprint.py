"""What a model on disk is, cheaply enough for 140 GB: one record per file of its folder.

A path names a model only until someone re-downloads another revision into it, so a resume or a
kept sweep point is decided by the files themselves: each file's size and modification time, and
a content digest: the whole file when it is small (config, tokenizer), else the safetensors header
(every tensor's name, dtype, shape and offsets) plus ``SAMPLES`` byte ranges spread evenly over the
file. Two checkpoints of one architecture share sizes and headers; their bytes differ everywhere,
so the sampled ranges tell them apart while reading about 1 MB a file."""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional

SAMPLES = 16
SAMPLE_BYTES = 1 << 16
WHOLE = 8 << 20  # files up to this size are hashed whole
MAX_HEADER = 100 << 20  # safetensors' own bound on a header


def file_record(path: Path) -> Dict[str, object]:
    """``size``, ``mtime_ns`` and ``digest`` of one file."""
    st = path.stat()
    h = hashlib.sha256(str(st.st_size).encode())
    with open(path, "rb") as f:
        if st.st_size <= WHOLE:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            if path.suffix == ".safetensors":
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(min(n, MAX_HEADER, st.st_size - 8)))
            for k in range(SAMPLES):
                f.seek((st.st_size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": h.hexdigest()[:16]}


def model_files(path: Optional[str]) -> Dict[str, Dict[str, object]]:
    """File name (relative to the model's folder) -> :func:`file_record`, for a model folder or a
    single checkpoint file; empty when the model has no path on disk (built from a config)."""
    if not path:
        return {}
    root = Path(path)
    if root.is_file():
        return {root.name: file_record(root)}
    if not root.is_dir():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache, .git: not the model
        for name in sorted(filenames):
            if not name.startswith("."):
                full = Path(dirpath) / name
                out[str(full.relative_to(root))] = file_record(full)
    return out


def changed_files(then: Mapping[str, Mapping], now: Mapping[str, Mapping]) -> List[str]:
    """What differs, one phrase per file: ``'model.safetensors' (its content differs)``."""
    out = []
    for name in sorted(set(then) | set(now)):
        a, b = then.get(name), now.get(name)
        if a is None:
            out.append(f"{name!r} (new since)")
        elif b is None:
            out.append(f"{name!r} (gone since)")
        elif a.get("size") != b.get("size") or a.get("digest") != b.get("digest"):
            out.append(f"{name!r} (its content differs)")
        elif a.get("mtime_ns") != b.get("mtime_ns"):
            out.append(f"{name!r} (modified since: same size and sampled bytes, but rewritten)")
    return out
