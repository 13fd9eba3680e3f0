"""Writing a Hugging Face sharded safetensors checkpoint piece by piece (offload disk writes each pruned
block as its own shard): a folder ``from_pretrained`` reloads, with the index and config it expects."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hf_shards import INDEX, SINGLE

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class ShardWriter:
    """Writes a Hugging Face sharded safetensors checkpoint piece by piece: a folder from_pretrained reloads.
    With ``n_shards == 1`` the one file is ``model.safetensors`` and no index is written, as save_pretrained
    does for an unsharded model; otherwise ``model-0000i-of-0000N.safetensors`` plus the index."""

    def __init__(self, folder, n_shards: int):
        if n_shards < 1:
            raise ValueError(f"n_shards must be at least 1, got {n_shards}")
        self.folder, self.n_shards, self.total_size = Path(folder), n_shards, 0
        self.weight_map: Dict[str, str] = {}  # tensor name -> shard file name
        self.files: Dict[int, Path] = {}  # shard index -> file
        self.dtypes: Dict[torch.dtype, int] = {}  # floating dtype -> elements: config.json's dtype

    def name(self, index: int) -> str:
        return SINGLE if self.n_shards == 1 else f"model-{index + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _record(self, index: int, tensors: Dict[str, torch.Tensor]) -> Path:
        for t in tensors.values():
            self.total_size += t.numel() * t.element_size()
            if t.is_floating_point():
                self.dtypes[t.dtype] = self.dtypes.get(t.dtype, 0) + t.numel()
        self.weight_map.update(dict.fromkeys(tensors, self.name(index)))
        self.files[index] = self.folder / self.name(index)
        return self.files[index]

    def add(self, tensors: Dict[str, torch.Tensor], index: Optional[int] = None) -> Path:
        """Write ``tensors`` now as shard ``index`` (default: the next one; contiguous, on cpu, metadata
        {"format": "pt"})."""
        index = len(self.files) if index is None else index
        if not 0 <= index < self.n_shards or index in self.files:
            raise ValueError(f"shard {index} of {self.n_shards}: out of range or written already"
                             if index < self.n_shards else f"all {self.n_shards} shards are written already")
        again = sorted(set(tensors) & set(self.weight_map))
        if again:
            raise ValueError(f"tensors written before, in {self.weight_map[again[0]]}: {', '.join(again)}")
        shard, seen = {}, set()
        for key, t in tensors.items():
            if t.is_meta:
                raise ValueError(f"tensor {key} is on the meta device (not loaded, or unloaded already)")
            t = t.detach().to("cpu").contiguous()
            # safetensors refuses entries sharing memory (tied ones with tied_skip=False): copy the later ones
            t = t.clone() if t.untyped_storage().data_ptr() in seen and t.numel() else t
            seen.add(t.untyped_storage().data_ptr())
            shard[key] = t
        save_file(shard, str(self.folder / self.name(index)), metadata={"format": "pt"})
        return self._record(index, shard)

    def adopt(self, index: int) -> Path:
        """Count shard ``index`` as written, from the file an interrupted run left (a resumed run)."""
        path = self.folder / self.name(index)
        with safe_open(str(path), framework="pt", device="cpu") as f:  # shapes and dtypes only: nothing read
            shapes = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
        return self._record(index, {key: torch.empty(shape, dtype=_DTYPES[dtype], device="meta")
                                    for key, (shape, dtype) in shapes.items()})

    def finish(self, config, tokenizer=None, generation_config=None) -> None:
        """The index (when sharded), config.json (its dtype the one written, as save_pretrained sets it),
        the tokenizer and the generation config when given."""
        if len(self.files) != self.n_shards:
            raise ValueError(f"only {len(self.files)} of {self.n_shards} shards added: the checkpoint is incomplete")
        if self.n_shards > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = copy.deepcopy(config)  # the caller's config keeps its dtype
        config.dtype = str(max(self.dtypes, key=self.dtypes.get)).split(".")[1] if self.dtypes else config.dtype
        config.save_pretrained(self.folder)
        for extra in (tokenizer, generation_config):
            if extra is not None:
                extra.save_pretrained(self.folder)
