"""The block-sequential passes that make a model smaller (``--pruning.structure``), on the engine's
pieces: each block's statistics over every calibration input (summed over ranks), the block cut, and
its new outputs fed to the next block, so every block is scored on the activations it will see."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .distributed import check_same, sum_stats, summed
from .engine import NoCheckpoints, PruneResult, device_of
from .hooks import BlockInput, collect_stats
from .layers import param_mask, weight_matrix
from .onload import Placement
from .sparsity import SparsitySpec
from .structure import Structure, channel_scores, expand, group_of, group_scores, head_dim_of, influence, keep_blocks, \
    keep_kv_groups, keep_mlp_channels, keep_top, layout_of, mean_shift, path, refit_columns, smaller_config, with_bias


def _variance(s) -> torch.Tensor:
    return (s.sq_sum / s.tokens - s.mean * s.mean).clamp_min(0)


def cut_block(name: str, block: nn.Module, stats, structure: Structure, keep: Dict[str, int], config) -> Dict[str, list]:
    """Score and cut one block in place; returns the kept channel and KV-group indices."""
    layout, out, refits, shifts = layout_of(config), {}, {}, {}
    mlp_name, attn_name = path(name, layout.mlp), path(name, layout.attention)
    mlp, attention = block.get_submodule(layout.mlp), block.get_submodule(layout.attention)
    channels = groups = None
    if structure.mlp:
        # (out, in) matrices: GPT-2's Conv1D stores its weight the other way round
        producers = [weight_matrix(getattr(mlp, p)).detach() for p in layout.producers]
        consumer = weight_matrix(getattr(mlp, layout.consumer)).detach()
        p_stats, c_stats = stats[f"{mlp_name}.{layout.producers[0]}"], stats[f"{mlp_name}.{layout.consumer}"]
        scores = channel_scores(structure.score, producers, consumer, p_stats.sq_sum, c_stats.sq_sum, _variance(c_stats))
        channels = keep_top(scores, keep["channels"])
        if structure.compensate == "lsq":
            refits["mlp"] = refit_columns(consumer, c_stats.xtx, channels)
        if structure.compensate == "bias":
            shifts["mlp"] = mean_shift(consumer, c_stats.mean, _without(channels, len(scores)))
        out["channels"] = channels.tolist()
    if structure.heads:
        head_dim, group = head_dim_of(config), group_of(config)
        q, k, v, o = (weight_matrix(getattr(attention, p)).detach() for p in (layout.q, layout.k, layout.v, layout.o))
        h_stats, o_stats = stats[f"{attn_name}.{layout.q}"], stats[f"{attn_name}.{layout.o}"]
        # per channel: q rows and o columns (a query head's), k and v rows (its KV group's)
        per_q = channel_scores(structure.score, [q], o, h_stats.sq_sum, o_stats.sq_sum, _variance(o_stats))
        if structure.score == "flap":
            per_kv = torch.zeros(k.shape[0])  # FLAP scores a head by its output's fluctuation alone
        else:
            per_kv = channel_scores(structure.score, [k, v], torch.zeros(1, k.shape[0]), h_stats.sq_sum,
                                    torch.zeros(k.shape[0]), None)
        scores = group_scores(per_q, head_dim * group) + group_scores(per_kv, head_dim)
        groups = keep_top(scores, keep["kv_groups"])
        columns = expand(expand(groups, group), head_dim)  # o's inputs: the kept query heads' channels
        if structure.compensate == "lsq":
            refits["attention"] = refit_columns(o, o_stats.xtx, columns)
        if structure.compensate == "bias":
            shifts["attention"] = mean_shift(o, o_stats.mean, _without(columns, o.shape[1]))
        out["kv_groups"] = groups.tolist()
    _cut(block, structure, config, channels, groups, refits, shifts)
    return out


def recut_block(block: nn.Module, record: Dict[str, list], structure: Structure, config) -> None:
    """A block cut as an interrupted run cut it (``record``: its kept indices), to take back the
    weights that run checkpointed: the shapes and, with ``compensate bias``, the (zero) biases."""
    as_index = lambda key: torch.tensor(record[key]) if key in record else None  # noqa: E731
    _cut(block, structure, config, as_index("channels"), as_index("kv_groups"))


def _cut(block: nn.Module, structure: Structure, config, channels: Optional[torch.Tensor],
         groups: Optional[torch.Tensor], refits: Optional[Dict[str, torch.Tensor]] = None,
         shifts: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Cut ``block`` in place to the kept MLP ``channels`` and KV ``groups`` (None: that part whole); the
    consumers (down, o) take their ``refits`` (lsq) and, with ``compensate bias``, every projection of
    the part a bias, the consumer's holding ``shifts`` (none given: zeros, to be overwritten)."""
    layout, refits, shifts = layout_of(config), refits or {}, shifts or {}
    if channels is not None:
        mlp = block.get_submodule(layout.mlp)
        keep_mlp_channels(mlp, channels, layout)
        _set_weight(getattr(mlp, layout.consumer), refits.get("mlp"))
        if structure.compensate == "bias":
            _biased(mlp, layout.producers, layout.consumer, shifts.get("mlp"))
    if groups is not None:
        attention = block.get_submodule(layout.attention)
        keep_kv_groups(attention, groups, head_dim_of(config), group_of(config), layout)
        _set_weight(getattr(attention, layout.o), refits.get("attention"))
        if structure.compensate == "bias":
            _biased(attention, (layout.q, layout.k, layout.v), layout.o, shifts.get("attention"))


def _unpruned(targets: Dict[str, nn.Module]) -> PruneResult:
    """No weight zeroed in ``targets``: all-False masks at sparsity 0 (a structure cuts, it does not mask)."""
    # shaped like each parameter, as the engine's masks are (GPT-2's Conv1D: (in, out))
    masks = {n: param_mask(m, torch.zeros(weight_matrix(m).shape, dtype=torch.bool)) for n, m in targets.items()}
    return PruneResult(masks=masks, plan=dict.fromkeys(masks, SparsitySpec(0.0)))


def _checkpoint(ckpt, index: int, name: str, block: nn.Module, inputs, record: Dict[str, Any], targets,
                weights: bool = True) -> None:
    """The block's record and its (empty) masks, which offload disk writes out as the block's mask shard;
    ``weights``: whether the block's weights are needed to resume (not for a block left whole)."""
    result = _unpruned(targets)
    result.structure = {"blocks": {name: record}}
    ckpt.save(index, name, block, inputs, result, weights=weights)


def _without(kept: torch.Tensor, n: int) -> torch.Tensor:
    drop = torch.ones(n, dtype=torch.bool)
    drop[kept] = False
    return drop.nonzero().flatten()


def _biased(part: nn.Module, producers, consumer: str, shift: Optional[torch.Tensor]) -> None:
    """Every projection of ``part`` with a bias (the config states one flag for them all), the
    consumer's holding ``shift``."""
    for name in producers:
        setattr(part, name, with_bias(getattr(part, name)))
    setattr(part, consumer, with_bias(getattr(part, consumer), shift))


def _set_weight(layer: nn.Module, weight) -> None:
    """``layer``'s weight set to the (out, in) ``weight``, through the view that stores it either way round."""
    if weight is not None:
        with torch.no_grad():
            weight_matrix(layer).copy_(weight.to(layer.weight.device))


def prune_width(blocks: Sequence[Tuple[str, nn.Module]], inputs: List[BlockInput], targets_fn, structure: Structure,
                config, store_device="cpu", placement=None, progress: bool = True, ckpt=None) -> Dict[str, Any]:
    """Cut every block to the same widths (the config states one number each); ``inputs`` end as
    the last block's outputs. Returns the kept indices per block and the widths. ``ckpt``: each
    block checkpointed as it is cut; a resumed run takes back the blocks cut before."""
    keep, placement, ckpt = structure.widths(config), placement or Placement(), ckpt or NoCheckpoints()
    start, done = ckpt.restore(blocks, inputs, lambda name, block, record: recut_block(block, record, structure, config))
    kept: Dict[str, Dict[str, list]] = dict((done.structure or {}).get("blocks", {}))
    for index, (name, block) in enumerate(tqdm(blocks, desc=f"width ({structure.score})", disable=not progress)):
        if index < start:
            continue
        placement.enter(name, block)
        device = device_of(block, store_device)
        with torch.no_grad(), collect_stats(targets_fn(name, block), structure.compensate == "lsq") as stats:
            for inp in inputs:
                inp.call(block, device)
        sum_stats(stats)
        kept[name] = cut_block(name, block, stats, structure, keep, config)
        check_same(name, {k: torch.tensor(v) for k, v in kept[name].items()})
        with torch.no_grad():
            outs = [inp.call(block, device).to(store_device) for inp in inputs]
        placement.leave(name, block, pruned=True)
        for inp, out in zip(inputs, outs):
            inp.hidden = out
        _checkpoint(ckpt, index, name, block, inputs, kept[name], targets_fn(name, block))
    heads = keep["kv_groups"] * group_of(config) if structure.heads else None
    biases = [f for f, share in zip(layout_of(config).bias_fields, (structure.mlp, structure.heads))
              if share and structure.compensate == "bias"]
    smaller_config(config, intermediate=keep["channels"] if structure.mlp else None, heads=heads,
                   kv_heads=keep["kv_groups"] if structure.heads else None, layout=layout_of(config), biases=biases)
    return {"kept": kept, "widths": keep, "start": start}


def prune_depth(model: nn.Module, blocks: Sequence[Tuple[str, nn.Module]], inputs: List[BlockInput], targets_fn,
                structure: Structure, store_device="cpu", placement=None, progress: bool = True,
                ckpt=None) -> Dict[str, Any]:
    """Remove the ``structure.blocks`` blocks that turn the hidden state least (on the dense model's
    own activations); the model's block list and config say so. Returns every block's influence.
    ``ckpt``: each block's influence checkpointed; a resumed run takes back those measured before."""
    placement, current = placement or Placement(), [dataclasses.replace(inp) for inp in inputs]
    ckpt = ckpt or NoCheckpoints()
    start, done = ckpt.restore(blocks, current, lambda name, block, record: None)  # blocks stay whole until the end
    measured = (done.structure or {}).get("blocks", {})
    scores = [measured[name]["influence"] for name, _ in blocks[:start]]
    for index, (name, block) in enumerate(tqdm(blocks, desc="depth: influence", disable=not progress)):
        if index < start:
            continue
        placement.enter(name, block)
        device = device_of(block, store_device)
        with torch.no_grad():
            outs = [inp.call(block, device).to(store_device) for inp in current]
        placement.leave(name, block, pruned=False)
        total = torch.tensor([sum(influence(i.hidden, o) * o[..., 0].numel() for i, o in zip(current, outs)),
                              float(sum(o[..., 0].numel() for o in outs))], dtype=torch.float64)
        total = summed(total)
        scores.append(float(total[0] / total[1]))
        for inp, out in zip(current, outs):
            inp.hidden = out
        _checkpoint(ckpt, index, name, block, current, {"influence": scores[-1]}, targets_fn(name, block),
                    weights=False)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    removed = sorted(order[: structure.blocks])
    keep = [i for i in range(len(blocks)) if i not in removed]
    parent_name = blocks[0][0].rsplit(".", 1)[0]
    owner_name, _, attr = parent_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, keep_blocks(getattr(owner, attr), keep))
    smaller_config(model.config, blocks=keep)
    return {"removed": [blocks[i][0] for i in removed], "influence": {n: round(s, 6) for (n, _), s in zip(blocks, scores)},
            "start": start}


def reshape_model(pl_module, blocks, inputs: List[BlockInput], structure: Structure, store_device="cpu",
                  placement=None, progress: bool = True, ckpt=None) -> PruneResult:
    """``--pruning.structure``: the model made smaller in place; the result holds what was kept or
    removed and the parameter counts before and after, and no weight is zeroed (masks all False)."""
    model, t0 = pl_module.model, time.perf_counter()
    before = sum(p.numel() for p in model.parameters())
    if structure.mode == "width":
        info = prune_width(blocks, inputs, pl_module.block_targets, structure, model.config, store_device, placement,
                           progress, ckpt)
    else:
        info = prune_depth(model, blocks, inputs, pl_module.block_targets, structure, store_device, placement, progress,
                           ckpt)
    start = info.pop("start")
    result = _unpruned(pl_module.all_targets())
    result.forward_s, result.resumed_from = time.perf_counter() - t0, start  # scoring: a small part of these
    result.structure = {"mode": structure.mode, **info,
                        "parameters": {"before": before, "after": sum(p.numel() for p in model.parameters())}}
    return result
