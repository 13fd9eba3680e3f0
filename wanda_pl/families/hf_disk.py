"""``offload: disk``: a Hugging Face causal LM that is never whole in memory.

The model is built without weights (meta device); the embeddings, final norm and head are read at
once (they run for every window), each decoder block only for its turn, from the checkpoint's
safetensors files, memory-mapped. A pruned block goes straight to a shard file of the output
folder and is freed; from then on its weights are read from that shard, so the pruned model is
measured on what was written. Host memory is one block plus the activation buffers, whatever the
depth of the model."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..assets.resolve import resolve_model
from ..core.layers import fused_slice
from ..core.onload import Placement
from .hf_causal import DTYPES, named_blocks, non_block_modules
from .hf_shards import Sources, checkpoint_index, empty_causal_lm, load_into, read_tensor, state_of, unload
from .hf_writer import ShardWriter

def _big_allocations_mapped() -> None:
    """Have glibc serve every allocation of 1 MiB or more by its own mmap, returned to the system when
    freed. Its default threshold rises as large blocks are freed, so the weights of block after block
    came from the heap and its fragments stayed: peak memory grew ~13 MB a 180 MB block (twice the
    layers: +25%; with this: flat, benchmarks/llm_scale.py). Not glibc (macOS, musl): nothing to do."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _download(repo_id: str) -> str:
    """A hub id's safetensors, config and tokenizer in the local hub cache (read block by block from
    there); what a plain ``from_pretrained`` would fetch, without loading it."""
    from huggingface_hub import snapshot_download

    from ..assets.resolve import EMBEDDED_MODELS, hub_error

    try:
        return snapshot_download(repo_id, allow_patterns=["*.safetensors", "*.safetensors.index.json", "*.json",
                                                          "tokenizer*", "*.model", "*.txt"])
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: one message with the way out
        raise hub_error("model", repo_id, err, EMBEDDED_MODELS) from err


class DiskModel:
    """The meta-device model, its tokenizer and where each of its tensors is read from."""

    def __init__(self, name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        if dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.path = resolve_model(name_or_path)
        if not Path(self.path).is_dir():
            self.path = _download(name_or_path)
        self.index: Dict[str, Path] = checkpoint_index(self.path)
        _big_allocations_mapped()
        self.dtype = DTYPES[dtype]
        self.model = empty_causal_lm(self.path, self.dtype, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.blocks = [name for name, _ in named_blocks(self.model)]
        self.stem = non_block_modules(self.model)
        self.sources = Sources(self.model, self.index)
        load_into(self.model, self.stem, self.index, "cpu", self.dtype, self.sources)
        self.out: Optional[Path] = None  # where pruned blocks go (set by the command)
        self.writer: Optional[ShardWriter] = None

    @property
    def n_shards(self) -> int:
        return len(self.blocks) + 1  # one per block, the rest last

    def write_to(self, folder) -> None:
        """Pruned blocks are written into ``folder`` (created), as shards of the final checkpoint."""
        self.out = Path(folder)
        self.out.mkdir(parents=True, exist_ok=True)
        self.writer = ShardWriter(self.out, self.n_shards)

    def reuse_written(self, block: str) -> None:
        """Read ``block`` from the shard an interrupted run wrote for it (a resumed run)."""
        self._point_at(block, self.writer.adopt(self.blocks.index(block)))

    def _point_at(self, block: str, shard: Path) -> None:
        """Read ``block``'s tensors from ``shard`` from now on (the writer knows which keys it holds). Its
        keys in the input checkpoint are forgotten: were they in another layout (legacy names, fused
        experts), they would still name the unpruned tensors."""
        written = [key for key, name in self.writer.weight_map.items() if name == shard.name]
        names = self.model.get_submodule(block).state_dict(prefix=f"{block}.")
        for key in {k for name in names if name in self.sources for k in self.sources.keys_of(name)}:
            self.index.pop(key, None)
        self.index.update(dict.fromkeys(written, shard))
        self.sources = Sources(self.model, self.index)

    def placement(self, device) -> "DiskPlacement":
        for name in self.stem:
            self.model.get_submodule(name).to(device)
        return DiskPlacement(self, device)

    def read(self, name: str) -> torch.Tensor:
        """The model tensor ``name`` from where it is now (the input checkpoint, or the shard written)."""
        return read_tensor(self.model, self.index, name, self.sources)

    def _zeros(self, targets: Dict[str, nn.Module]) -> Dict[str, tuple]:
        """(zeros, size) of each target's weight, read one at a time (an expert's slice: from its fused
        parameter, read once for all its experts) from where it is now."""
        out, fused = {}, {}
        for name in targets:
            where = fused_slice(self.model, name)
            if where is None:
                w = self.read(f"{name}.weight")
            else:
                fused = fused if where[0] in fused else {where[0]: self.read(where[0])}
                w = fused[where[0]][where[1]]
            out[name] = (int((w == 0).sum()), w.numel())
        return out

    def weight_zeros(self, name: str, weight: torch.Tensor) -> int:
        """Zeros of the parameter ``name``: read from its shard while its block is not in memory."""
        return int(((weight if not weight.is_meta else self.read(name)).detach() == 0).sum())

    def layer_sparsity(self, targets: Dict[str, nn.Module]) -> Dict[str, float]:
        return {n: z / size for n, (z, size) in self._zeros(targets).items()}

    def overall_sparsity(self, targets: Dict[str, nn.Module]) -> float:
        counts = self._zeros(targets).values()
        return sum(z for z, _ in counts) / max(sum(size for _, size in counts), 1)

    def write_block(self, name: str) -> Path:
        """Write the pruned block ``name`` as its shard and read it from there from now on."""
        if self.out is None:
            raise RuntimeError("model.offload disk: the output folder for pruned blocks was never set")
        shard = self.writer.add(state_of(self.model, name), self.blocks.index(name))
        self._point_at(name, shard)
        return shard

    def finish(self) -> None:
        """The rest (embeddings, norm, head) as the last shard, the index, config and tokenizer: a folder
        ``from_pretrained`` loads."""
        rest = {}
        for name in self.stem:
            rest.update(state_of(self.model, name))
        self.writer.add(rest, len(self.blocks))
        self.writer.finish(self.model.config, self.tokenizer, getattr(self.model, "generation_config", None))


class DiskPlacement(Placement):
    """Each block read in for its turn and dropped after it (written first when pruned)."""

    offloaded = True

    def __init__(self, disk: DiskModel, device) -> None:
        self.disk, self.device = disk, torch.device(device)

    def enter(self, name: str, block: nn.Module) -> None:
        load_into(self.disk.model, [name], self.disk.index, self.device, self.disk.dtype, self.disk.sources)

    def leave(self, name: str, block: nn.Module, pruned: bool) -> None:
        if pruned:
            self.disk.write_block(name)
        unload(self.disk.model, [name])
