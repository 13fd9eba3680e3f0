"""Sequential onloading, the disk side: a Hugging Face causal LM larger than host memory, one block at a time.

Built without weights (:func:`empty_causal_lm`), each block is read from the memory-mapped safetensors
files when its turn comes (:func:`load_into`), written once pruned as its own shard (:class:`ShardWriter`
with :func:`state_of`: save_pretrained's keys and values) and freed (:func:`unload`). A tied weight is one
Parameter held by several modules, as from_pretrained leaves it; loading or freeing it acts on all of them.
Checkpoint keys are renamed and converted as from_pretrained does it, with transformers' own conversion
table (base-model prefix, legacy names, and converters: per-expert MoE tensors fused into one 3-D
parameter, split qkv ...), and written back in the checkpoint's own layout, as save_pretrained does.
"""
from __future__ import annotations

import copy
import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from safetensors import safe_open

from ..errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_index(folder) -> Dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (the index file, model.safetensors, or any
    *.safetensors). Only safetensors can be memory-mapped one tensor at a time: other weights are refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {str(folder)!r} does not exist (or is not a folder)")
    if (folder / INDEX).is_file():
        try:
            index = {k: folder / f for k, f in json.loads((folder / INDEX).read_text())["weight_map"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{folder / INDEX}: not a safetensors index ({type(err).__name__}: {err})") from err
        missing = sorted({f.name for f in index.values() if not f.is_file()})
        if missing:
            raise UserError(f"{folder / INDEX} names shards the folder does not hold: {', '.join(missing)}")
        return index
    files = [folder / SINGLE] if (folder / SINGLE).is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:30]) or "nothing"
        raise UserError(
            f"model folder {str(folder)!r} holds no .safetensors weights (found: {found}); model.offload cpu|disk "
            "reads one block at a time from memory-mapped safetensors files. Convert it once: load it with "
            "from_pretrained and save it with save_pretrained(folder, safe_serialization=True)")
    index = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            index.update({name: file for name in f.keys() if name not in index})
    return index


def empty_causal_lm(folder, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model of folder/config.json with every parameter a meta tensor of ``dtype`` and buffers real
    (rotary ``inv_freq`` and the like are computed, checkpoints do not hold them); eval mode, no KV cache."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"model folder {str(folder)!r} has no config.json")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # accelerate re-wraps every parameter set inside its context, which undoes the tying done in __init__
    model.tie_weights()
    model.config.use_cache = False
    return model.requires_grad_(False).eval()


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def _own(module: nn.Module, buffers: bool = True) -> List[Tuple[str, torch.Tensor]]:
    """(attribute, tensor) of a module's own parameters and persistent buffers, not its children's."""
    out = [(k, t) for k, t in module._parameters.items() if t is not None]
    return out + [(k, t) for k, t in module._buffers.items() if buffers and t is not None
                  and k not in module._non_persistent_buffers_set]


def _slots(model: nn.Module, buffers: bool = True) -> Dict[int, tuple]:
    """id(tensor) -> (tensor, [(full name, module, attribute)]): a tied tensor once, with all its holders."""
    out = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, t in _own(module, buffers):
            out.setdefault(id(t), (t, []))[1].append((f"{mod_name}.{attr}" if mod_name else attr, module, attr))
    return out


def _set(holders, value: torch.Tensor, is_param: bool) -> None:
    value = nn.Parameter(value, requires_grad=False) if is_param else value
    for _, module, attr in holders:
        (module._parameters if is_param else module._buffers)[attr] = value


class Sources:
    """Where each model tensor comes from: a checkpoint key (``plain``), or several keys and the
    transformers converter that fuses them (``fused``: model key -> (converter, [(key, pattern)]))."""

    def __init__(self, model: nn.Module, index: Dict[str, Path]) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta, prefix = model.state_dict(), getattr(model, "base_model_prefix", None) or None
        self.plain: Dict[str, str] = {}
        self.fused: Dict[str, tuple] = {}
        # in natural key order: experts 0, 1, ..., 10 are stacked in that order, as from_pretrained stacks them
        for key in sorted(index, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if pattern is None:
                self.plain.setdefault(name, key)
            else:
                converter = next(c for c in converters if pattern in c.source_patterns)
                self.fused.setdefault(name, (converter, []))[1].append((key, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self.plain or name in self.fused

    def keys_of(self, name: str) -> List[str]:
        return [self.plain[name]] if name in self.plain else [key for key, _ in self.fused[name][1]]


class _Files(ExitStack):
    """The checkpoint's files, each opened (memory-mapped) once while in use."""

    def __init__(self, index: Dict[str, Path]) -> None:
        super().__init__()
        self.index, self.opened = index, {}

    def get(self, key: str) -> torch.Tensor:
        file = self.index[key]
        if file not in self.opened:
            self.opened[file] = self.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        return self.opened[file].get_tensor(key)


def _read(model: nn.Module, files: _Files, sources: Sources, name: str) -> torch.Tensor:
    if name in sources.plain:
        return files.get(sources.plain[name])
    converter, parts = sources.fused[name]
    converter = copy.deepcopy(converter)  # it collects the tensors it converts: one copy per model tensor
    for key, pattern in parts:
        converter.add_tensor(name, key, pattern, lambda key=key: files.get(key))
    return converter.convert(name, model=model, config=getattr(model, "config", None))[name]


def read_tensor(model: nn.Module, index: Dict[str, Path], name: str, sources: Optional[Sources] = None) -> torch.Tensor:
    """The model tensor ``name`` as the checkpoint gives it (converted where transformers converts it)."""
    with _Files(index) as files:
        return _read(model, files, sources or Sources(model, index), name)


def load_into(model: nn.Module, module_names: Sequence[str], index: Dict[str, Path], device="cpu", dtype=None,
              sources: Optional[Sources] = None) -> None:
    """Materialise on ``device`` the parameters and persistent buffers of the named submodules ("" = all),
    cast to their dtype (floating ones to ``dtype`` when given). Tied as from_pretrained ties: read under any
    name the checkpoint holds (the tie's source first), untied where it holds two names with different values.
    ``sources``: the key mapping of this model and checkpoint layout, computed when not given."""
    [model.get_submodule(name) for name in module_names]  # an unknown name: AttributeError names it
    sources = sources or Sources(model, index)
    targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(getattr(model, "_keep_in_fp32_modules_strict",
                                                                                  None) or ())
    with _Files(index) as files:
        def read(name: str, like: torch.Tensor) -> torch.Tensor:
            value = _read(model, files, sources, name)
            if tuple(value.shape) != tuple(like.shape):
                keys = ", ".join(sources.keys_of(name))
                raise UserError(f"checkpoint tensor {keys} in {index[sources.keys_of(name)[0]]} gives shape "
                                f"{list(value.shape)}, the model's {name} needs {list(like.shape)}")
            # as from_pretrained: a family's float32 modules (DeepSeek's router) stay float32
            kept = any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in fp32)
            want = dtype if dtype is not None and like.is_floating_point() and not kept else like.dtype
            return value.to(device=device, dtype=want)

        for tensor, holders in _slots(model).values():
            if not any(_under(n, module_names) for n, _, _ in holders):
                continue
            is_param = isinstance(tensor, nn.Parameter)
            present = sorted((n for n, _, _ in holders if n in sources), key=lambda n: (n in targets, n))
            if not present:
                if not is_param:  # as from_pretrained: a buffer the checkpoint lacks keeps its computed value
                    continue
                where = ", ".join(sorted({str(f.parent) for f in index.values()}))
                raise UserError(f"checkpoint {where} has no tensor {' or '.join(n for n, _, _ in holders)}")
            value, tied = read(present[0], tensor), list(holders)
            for holder in [h for h in holders if h[0] in present[1:]]:
                other = read(holder[0], tensor)
                if not torch.equal(other, value):
                    tied.remove(holder)
                    _set([holder], other, is_param)
                    getattr(model, "all_tied_weights_keys", {}).pop(holder[0], None)
            _set(tied, value, is_param)


def unload(model: nn.Module, module_names: Sequence[str]) -> None:
    """Put the parameters of the named submodules back on the meta device, freeing their memory. A tied
    parameter also held by a module outside ``module_names`` stays as it is (freeing it would take it from
    that module too). Buffers stay: they are small, and non-persistent ones cannot be read back."""
    for tensor, holders in _slots(model, buffers=False).values():
        if tensor.device.type != "meta" and all(_under(n, module_names) for n, _, _ in holders):
            _set(holders, torch.empty_like(tensor, device="meta"), True)


def _tied_left_out(model: nn.Module) -> set:
    """The names save_pretrained drops (remove_tied_weights_from_state_dict): of each group sharing one
    tensor, the sorted names matching a ``_tied_weights_keys`` pattern, all but one name of the group."""
    patterns = [f"{n}.{k}" if n else k for n, m in model.named_modules()
                for k in (getattr(m, "_tied_weights_keys", None) or {})]
    drop = set()
    for _, holders in _slots(model).values():
        names = sorted(n for n, _, _ in holders)
        matching = [n for n in names if len(names) > 1 and any(re.search(p, n) for p in patterns)]
        drop.update(matching[:len(names) - 1])
    return drop


def state_of(model: nn.Module, module_name: str, tied_skip: bool = True) -> Dict[str, torch.Tensor]:
    """The state_dict entries of one submodule as save_pretrained writes them: less
    ``_keys_to_ignore_on_save``, with ``tied_skip`` less the tied entries it leaves out, and in the
    checkpoint layout of the family (transformers' load-time conversions reverted: a fused experts
    parameter is written back as one tensor per expert, under the family's own names)."""
    from transformers.core_model_loading import revert_weight_conversion

    entries = model.get_submodule(module_name).state_dict(prefix=f"{module_name}." if module_name else "")
    drop = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    drop |= _tied_left_out(model) if tied_skip else set()
    return revert_weight_conversion(model, {k: v for k, v in entries.items() if k not in drop})


def outside_blocks(model: nn.Module, block_names: Sequence[str]) -> List[str]:
    """The largest submodules holding none of the blocks (embeddings, final norm, lm_head ...): with the
    blocks they cover every tensor of the model, for :func:`load_into` and :func:`state_of`."""
    above = {".".join(b.split(".")[:i]) for b in block_names for i in range(len(b.split(".")))}
    mixed = sorted(a or "(the model)" for a in above if _own(model.get_submodule(a)))
    if mixed:
        raise ValueError(f"{', '.join(mixed)} hold tensors of their own beside the blocks")
    return [n for n, _ in model.named_modules()
            if n and n not in above and n not in block_names and n.rpartition(".")[0] in above]
