"""Hugging Face causal LMs: loading, saving, and where the decoder blocks are.

The decoder blocks are the ``nn.ModuleList`` holding most of the parameters (Llama/Mistral/Qwen2
``model.layers``, GPT-2 ``transformer.h``, OPT ``model.decoder.layers``, GPT-NeoX
``gpt_neox.layers`` ...): no hard-coded attribute path. Which layers inside them are prunable is
the layer kinds' business (:mod:`wanda_pl.core.layers`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..assets.resolve import EMBEDDED_MODELS, hub_error, resolve_model
from ..core.hooks import BlockInput, capture_inputs
from ..errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}  # fp64: a reference run, near-ties no longer CPU-dependent (core/precision.py)


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, device_map=None):
    """(model, tokenizer, resolved path) for an embedded name, local folder or hub id; ``device_map``
    (accelerate's: ``auto``, ``balanced``, ``{module: device}``) spreads the blocks over devices."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_device_map(device_map)
    placed = {} if device_map is None else {"device_map": device_map}
    path = resolve_model(name_or_path)
    if Path(path).is_dir():
        model, tokenizer = _load_folder(path, DTYPES[dtype], trust_remote_code, placed)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                         **placed)
        except OSError as err:
            if "/" not in name_or_path and not path.startswith("."):
                raise ValueError(
                    f"{name_or_path!r} is not an embedded model ({', '.join(EMBEDDED_MODELS)}), a local folder, "
                    f"or a model the hub could give: {err}"
                ) from err
            raise hub_error("model", name_or_path, err, EMBEDDED_MODELS) from err
    check_finite(model, path)
    model.config.use_cache = False
    model.eval()
    return model, tokenizer, path


def check_device_map(device_map) -> None:
    """Refuse a device map naming a device this machine does not have, before anything loads."""
    if device_map is None:
        return
    if isinstance(device_map, str):
        if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
            return
        devices = [device_map]
    elif isinstance(device_map, dict):
        devices = list(device_map.values())
    else:
        raise ValueError(f"model.device_map must be auto | balanced | balanced_low_0 | sequential, a device, or a "
                         f"mapping of module names to devices; got {device_map!r}")
    cuda = torch.cuda.device_count()
    for d in devices:
        try:
            dev = torch.device(f"cuda:{d}" if isinstance(d, int) else d)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None and d in ("disk",):
            continue
        ok = dev is not None and (dev.type in ("cpu", "meta") or (dev.type == "cuda" and (dev.index or 0) < cuda))
        if not ok:
            raise ValueError(f"model.device_map names device {d!r}, which is not here (this machine has cpu"
                             f"{''.join(f', cuda:{i}' for i in range(cuda))})")


def _load_folder(folder: str, dtype: torch.dtype, trust_remote_code: bool, placed=None):
    """A local Hugging Face folder; a failure names the folder and the part of it at fault (transformers'
    own messages often do not)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def part(what, load):
        try:
            return load()
        except Exception as err:  # noqa: BLE001 - any failure of a local folder is about its files
            raise UserError(f"model folder {folder!r}: could not load {what}: {type(err).__name__}: "
                            f"{(str(err).strip().splitlines() or [''])[0][:300]}") from err

    config = part("config.json", lambda: AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code))
    tokenizer = part("its tokenizer (tokenizer.json or tokenizer.model, with tokenizer_config.json)",
                     lambda: AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code))
    model = part("its weights (model.safetensors or pytorch_model.bin: truncated or corrupt?)",
                 lambda: AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype,
                                                              trust_remote_code=trust_remote_code, **(placed or {})))
    return model, tokenizer


@torch.no_grad()
def check_finite(model: nn.Module, where: str) -> None:
    """Refuse NaN or Inf weights at load: otherwise they surface only as a NaN perplexity, or as
    non-finite activations once calibration reaches them."""
    for name, param in model.named_parameters():
        bad = ~torch.isfinite(param)
        if bool(bad.any()):
            raise UserError(f"model {where!r}: the weight {name} holds {int(bad.sum())} NaN or Inf values; "
                            f"a model with non-finite weights cannot be pruned or evaluated")


def save_causal_lm(model: nn.Module, tokenizer, folder, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """A Hugging Face folder ``from_pretrained`` reloads (``state_dict``: whole weights of a sharded model)."""
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(folder)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_blocks(model: nn.Module) -> Tuple[str, List[nn.Module]]:
    """The repeated blocks of a transformer: the ModuleList of same-class children with the most parameters."""
    best: Optional[Tuple[int, str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(c) for c in module}) != 1:
                continue
            size = _n_params(module)
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"could not find the repeated blocks (an nn.ModuleList) in {type(model).__name__}")
    return best[1], list(best[2])


def named_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    prefix, blocks = find_blocks(model)
    return [(f"{prefix}.{i}", b) for i, b in enumerate(blocks)]


def capture_block_inputs(model: nn.Module, calibration: torch.Tensor, store_device="cpu",
                         batch_size: int = 1) -> List[BlockInput]:
    """The first decoder block's inputs for calibration windows (token ids, (n, seqlen)), one
    :class:`BlockInput` per ``batch_size`` windows: the model itself builds each batch's masks and
    position arguments, so a smaller last batch gets its own."""
    device = next(model.parameters()).device
    return capture_inputs(model, find_blocks(model)[1], calibration.split(batch_size),
                          lambda m, ids: m(input_ids=ids.to(device), use_cache=False), store_device)


def non_block_modules(model: nn.Module) -> List[str]:
    """The modules holding weights or buffers of their own outside the decoder blocks (embeddings,
    rotary tables, final norm, head), by name."""
    prefix = find_blocks(model)[0]

    def own(m: nn.Module) -> bool:
        return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))

    return [name for name, m in model.named_modules()
            if name != prefix and not name.startswith(prefix + ".") and own(m)]


@torch.no_grad()
def head_logits(model: nn.Module, ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for ``ids`` given what its last block output for them: the model runs as
    usual (embeddings, final norm, head) with every block standing in by that output, so whatever
    comes after the blocks (OPT's projection, Gemma's soft-capping) is the model's own code."""
    blocks = find_blocks(model)[1]
    for block in blocks:
        block.forward = lambda *args, **kwargs: last_hidden
    try:
        device = next(model.get_output_embeddings().parameters()).device
        return model(input_ids=ids.to(device), use_cache=False).logits
    finally:
        for block in blocks:
            del block.forward


def blockwise_logits(model: nn.Module, batches: List[torch.Tensor], placement, device, progress: bool = False):
    """(ids, logits) per batch of windows, computed block-sequentially (embedding, block 0 over every
    window, block 1, ..., norm and head) with ``placement`` bringing each block in: the numbers of
    whole-model forwards, with one block present at a time."""
    from ..core.passes import forward_sequential

    if not batches:
        return
    size = batches[0].shape[0]
    ids = torch.cat(batches)
    inputs = capture_block_inputs(model, ids, "cpu", size)
    finals = forward_sequential(named_blocks(model), inputs, placement, "cpu", progress, desc="perplexity: blocks")
    for chunk, hidden in zip(ids.split(size), finals):
        yield chunk, head_logits(model, chunk, hidden.to(device))
