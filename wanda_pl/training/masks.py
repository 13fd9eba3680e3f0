"""Masks as files and as zeros, and which strategies can keep them on their weights.

A mask is a bool tensor shaped like its layer's weight, True where the weight is pruned; a mask
file (``masks.pt``) maps layer names (relative to the wrapped network) to masks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..core.layers import fused_slice, weight_of
from ..errors import UserError
from .sharding import full

log = logging.getLogger(__name__)

MASKS_FILE = "masks.pt"


def save_masks(masks: Mapping[str, torch.Tensor], path) -> None:
    torch.save({k: v.detach().cpu().bool() for k, v in masks.items()}, path)


MASKS_DIR = "masks"  # offload disk: one file per block (the whole set never in memory while pruning)


def mask_files(path) -> List[Path]:
    """The mask file(s) ``path`` names: a file, a folder holding ``masks.pt``, or a folder of per-block
    ``masks-*.pt`` shards (or holding ``masks/`` with them); empty when it names none."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / MASKS_FILE).is_file():
        return [path / MASKS_FILE]
    folder = path / MASKS_DIR if (path / MASKS_DIR).is_dir() else path
    return sorted(folder.glob("masks-*.pt")) if folder.is_dir() else []


def save_mask_shard(masks: Mapping[str, torch.Tensor], folder, k: int, n: int) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_masks(masks, Path(folder) / f"masks-{k + 1:05d}-of-{n:05d}.pt")


def _check_complete(files: List[Path]) -> None:
    """Per-block shards ``masks-K-of-N.pt`` must be all N of one set: a lost one would leave its
    block unmasked without a word."""
    if len(files) == 1 and not files[0].name.startswith("masks-"):  # one file named by the user
        return
    shards = [f.name[len("masks-"):-len(".pt")].split("-of-") for f in files]
    if not all(len(s) == 2 and s[0].isdigit() and s[1].isdigit() for s in shards):
        odd = next(f.name for f, s in zip(files, shards) if not (len(s) == 2 and s[0].isdigit() and s[1].isdigit()))
        raise UserError(f"{odd!r} in {str(files[0].parent)!r}: mask shards are named masks-K-of-N.pt")
    totals = {int(n) for _, n in shards}
    have = {int(k) for k, _ in shards}
    if len(totals) != 1 or have != set(range(1, max(totals) + 1)):
        n = max(totals)
        missing = sorted(set(range(1, n + 1)) - have)
        raise UserError(f"the mask shards in {str(files[0].parent)!r} are not one complete set of {n}: "
                        f"missing {[f'masks-{k:05d}-of-{n:05d}.pt' for k in missing[:5]]}"
                        f"{' and more' if len(missing) > 5 else ''}"
                        f"{'' if len(totals) == 1 else f', and shards of sets of {sorted(totals)} mixed'}")


def _load_one(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or not torch's: torch's messages omit the file
        raise UserError(f"{str(path)!r} is not a mask file torch can load ({type(err).__name__}: "
                        f"{(str(err).splitlines() or [''])[0][:200]})") from None


def load_masks(path, weights: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Masks saved by ``prune --save_model true`` or :func:`save_adapter` (a file, a folder holding
    ``masks.pt``, or per-block shards), checked against ``weights`` (name -> weight) when given."""
    files = mask_files(path)
    if not files:
        raise FileNotFoundError(f"no mask file at {str(path)!r} (masks.pt, or a folder of masks-*.pt)")
    _check_complete(files)
    masks: Dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_one(f)
        if not isinstance(part, dict) or not part or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise UserError(f"{str(f)!r} is not a mask file (a non-empty dict of layer name -> bool tensor)")
        masks.update(part)
    path = files[0] if len(files) == 1 else Path(path)
    not_bool = [n for n, m in masks.items() if m.dtype != torch.bool]
    if not_bool:  # a 0/1 float mask may mean "keep" where ours means "pruned": no guessing
        raise UserError(f"mask {not_bool[0]!r} in {str(path)!r} is {masks[not_bool[0]].dtype}; masks are bool "
                        f"tensors, True where the weight is pruned")
    if weights is not None:
        missing = [n for n in masks if n not in weights]
        if missing:
            raise UserError(f"masks in {str(path)!r} name layers this model has not: {missing[:5]} "
                            f"({len(missing)} of {len(masks)}); its layers are named like {sorted(weights)[:2]}")
        for n, m in masks.items():
            if tuple(m.shape) != tuple(weights[n].shape):
                raise UserError(f"mask {n!r} in {str(path)!r} has shape {tuple(m.shape)}, the model's weight "
                                f"{tuple(weights[n].shape)}: masks of another model?")
        uncovered = [n for n in weights if n not in masks]
        if uncovered:  # legitimate (a run that pruned only some layers) but worth saying: those stay dense
            log.warning("masks in %r cover %d of the model's %d prunable layers; the other %d (e.g. %s) are not "
                        "masked and stay dense", str(path), len(masks), len(weights), len(uncovered), uncovered[0])
    return {k: v.bool() for k, v in masks.items()}


def masks_from(source: str, targets: Mapping[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """``zeros`` (the zeros of an already pruned model's targets) or a mask file checked against them."""
    if source == "zeros":
        masks = {name: (full(m.weight.detach()) == 0).cpu() for name, m in targets.items()}
        if not any(bool(m.any()) for m in masks.values()):
            log.warning("pruning.masks_from=zeros: the model has no zero weight in its targets (is it dense?)")
        return masks
    return load_masks(source, {name: m.weight for name, m in targets.items()})


@torch.no_grad()
def with_zeros(masks: Mapping[str, torch.Tensor], network: nn.Module) -> Dict[str, torch.Tensor]:
    """``masks`` grown by the kept weights that are exactly zero (trained checkpoints hold a few):
    fine-tuning then keeps every zero, and the sparsity after equals the sparsity before."""
    out, extra = dict(masks), 0
    for name, mask in masks.items():
        zeros = (full(weight_of(network, name)) == 0).cpu()
        if (zeros & ~mask).any():
            extra += int((zeros & ~mask).sum())
            out[name] = mask | zeros
    if extra:
        log.info("%d kept weights are exactly zero: they stay zero too", extra)
    return out


def parameters_and_masks(network: nn.Module, masks: Mapping[str, torch.Tensor]) -> List[tuple]:
    """(parameter, its full-shape mask) for every masked weight: an expert's slices are gathered into
    one mask over their fused parameter, so gradients and optimizer steps are masked on what they
    really update (a slice is a view: it has no gradient of its own)."""
    out, fused = [], {}
    for name, mask in masks.items():
        where = fused_slice(network, name)
        if where is None:
            out.append((network.get_submodule(name).weight, mask))
        else:
            fused.setdefault(where[0], {})[where[1]] = mask
    for pname, parts in fused.items():
        p = network.get_parameter(pname)
        whole = torch.zeros(p.shape, dtype=torch.bool)
        for index, mask in parts.items():
            whole[index] = mask
        out.append((p, whole))
    return out


def check_strategy(trainer) -> None:
    """The masks are edited by layer name on whole weights, or on DTensor shards cut as the weights
    are (ModelParallelStrategy / FSDP2); FSDP1 and DeepSpeed hold flat shards mixing several weights."""
    name = type(trainer.strategy).__name__
    if name in ("FSDPStrategy", "DeepSpeedStrategy"):
        raise NotImplementedError(
            f"the Pruning callback keeps masks on named weights; {name} shards them into flat pieces of "
            f"several weights that it cannot address. To shard a pruned model, use Lightning's "
            f"ModelParallelStrategy (FSDP2: fully_shard in the LightningModule's configure_model; e.g. "
            f"--trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy "
            f"--trainer.strategy.data_parallel_size <devices> --trainer.strategy.tensor_parallel_size 1), "
            f"or fine-tune with ddp or on one device"
        )
