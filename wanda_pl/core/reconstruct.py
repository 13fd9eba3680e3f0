"""Block-level reconstruction (Wanda++'s regional optimisation, EBFT; "A Free Lunch in LLM
Compression" 2025): after every layer of a block is pruned, a few steps of Adam on the block's kept
weights, masks fixed, so that its output matches the dense block's.

Targets (``--pruning.reconstruct_target``): ``pruned`` (default), the dense block's outputs on the
inputs the pruned model gives it, which the engine's first pass computes anyway (the statistics pass
runs the dense block on them): each block corrects its own pruning error, on the activations it will
see. ``dense``: the dense model's own outputs at that block, from a second, dense, activation stream
kept beside the pruned one (twice the calibration memory, one more forward per block), which also
pulls each block towards undoing the errors of the blocks before it. Both fit on the pruned model's
inputs. Measured on SmolLM2 in the README (Block reconstruction); a resumed run cannot rebuild the
dense stream of the blocks already pruned, so ``dense`` is refused there.

``block``: one loss on the block's output. ``attn_mlp``: each child of the block that holds targets
(the attention, the MLP; a family whose linears sit directly in the block: each of them) is fitted to
its own dense output on its own inputs, both recorded in the first pass; the cheaper of the two in
the literature, and the one whose optimisation never back-propagates through the whole block.

Pruned weights stay exactly zero (gradients masked before each step, weights re-masked after), every
other parameter (norms, routers, biases) stays as it is. Deterministic under ``seed``; under
``torch.distributed`` each rank's gradients are averaged before every step, as fine-tuning does.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .hooks import map_tensors
from .layers import fused_slice, parameter_of

MODES = ("none", "block", "attn_mlp")
TARGETS = ("pruned", "dense")


@dataclass(frozen=True)
class Reconstruction:
    mode: str = "none"
    steps: int = 20
    lr: float = 1e-3
    batch: int = 4
    seed: int = 0
    target: str = "pruned"  # whose inputs the dense block's target outputs come from (see the module's doc)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pruning.reconstruct must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"pruning.reconstruct_steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"pruning.reconstruct_lr must be > 0, got {self.lr!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"pruning.reconstruct_batch must be an integer >= 1, got {self.batch!r}")
        if self.target not in TARGETS:
            raise ValueError(f"pruning.reconstruct_target must be one of {', '.join(TARGETS)}, got {self.target!r}")

    @property
    def dense_stream(self) -> bool:
        return self.enabled and self.target == "dense"

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


def parts(block: nn.Module, targets: Dict[str, nn.Module], block_name: str, mode: str) -> Dict[str, nn.Module]:
    """What is fitted: the block itself (``block``), or its children that hold targets (``attn_mlp``)."""
    if mode == "block":
        return {"": block}
    prefix = f"{block_name}." if block_name else ""
    children = {name[len(prefix):].split(".")[0] for name in targets}
    return {c: block.get_submodule(c) for c in sorted(children)}


@contextmanager
def record_calls(modules: Dict[str, nn.Module], store_device) -> Iterator[Dict[str, List[tuple]]]:
    """Every call of each module while active: (args, kwargs, output) on ``store_device``."""
    seen: Dict[str, List[tuple]] = {name: [] for name in modules}

    def hook(name):
        def on_call(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            seen[name].append((_to(args, store_device), _to(kwargs, store_device), out.detach().to(store_device)))
        return on_call

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def with_targets(calls: Dict[str, List[tuple]], dense: Dict[str, List[tuple]]) -> Dict[str, List[tuple]]:
    """The calls recorded on the pruned model's inputs, each with the output the dense model's own
    stream gave at the same call instead (``reconstruct_target dense``)."""
    return {name: [(args, kwargs, d[2]) for (args, kwargs, _), d in zip(calls[name], dense[name], strict=True)]
            for name in calls}


def _to(obj, device, fresh: bool = False):
    """``obj``'s tensors on ``device``; ``fresh``: copies made outside inference mode (Lightning validates,
    and so prunes, under ``torch.inference_mode``, whose tensors autograd refuses to save)."""
    return map_tensors(obj, lambda t: t.detach().to(device).clone() if fresh else t.detach().to(device))


def kept_parameters(block: nn.Module, targets: Dict[str, nn.Module], masks: Dict[str, torch.Tensor],
                    block_name: str) -> List[Tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, its pruned mask) of every target; an MoE expert slice's fused parameter once,
    with every slice's mask in it."""
    out: Dict[int, Tuple[nn.Parameter, torch.Tensor]] = {}
    for name, module in targets.items():
        param = parameter_of(module)
        entry = out.setdefault(id(param), (param, torch.zeros(param.shape, dtype=torch.bool, device=param.device)))
        local = name[len(block_name) + 1:] if block_name else name
        where = fused_slice(block, local)
        mask = masks[name].to(param.device)
        if where is None:
            entry[1].copy_(mask.view(param.shape))
        else:
            entry[1][where[1]] = mask
    return list(out.values())


def _mean_grads(params: List[nn.Parameter]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= dist.get_world_size()


def fit(module: nn.Module, calls: List[tuple], kept: List[Tuple[nn.Parameter, torch.Tensor]],
        settings: Reconstruction, device, seed: int) -> Tuple[float, float]:
    """Adam on the kept weights so that ``module(*args, **kwargs)`` matches each recorded output; returns
    the mean squared error over every call before and after."""
    params = [p for p, _ in kept]
    was = [(p, p.requires_grad) for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    order = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        optimizer = torch.optim.Adam(params, lr=settings.lr)
        return _fit(module, calls, kept, settings, device, order, optimizer, was)


def _out_of_inference(module: nn.Module) -> None:
    """Weights a placement brought in during validation (read from disk, moved to the accelerator) are
    inference tensors, which autograd cannot use: replaced by ordinary ones of the same values."""
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()


def joined(calls: List[tuple]) -> Optional[tuple]:
    """Several recorded calls as one call on their samples together (one forward and backward a
    step instead of one per call): a tensor whose first dimension is each call's sample count is
    concatenated, anything else must be the same in every call and is passed once. None where the
    calls cannot be joined so (other structures, a differing non-batch value): run one by one."""
    if len(calls) == 1:
        return calls[0]
    flat = [tree_flatten(call) for call in calls]
    if any(spec != flat[0][1] for _, spec in flat):
        return None
    rows = [call[2].shape[0] for call in calls]
    leaves = []
    for values in zip(*(f[0] for f in flat)):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() and all(
                isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n for v, n in zip(values, rows)):
            leaves.append(torch.cat(values))
        elif all(v is first or (isinstance(v, torch.Tensor) and isinstance(first, torch.Tensor) and
                                v.shape == first.shape and torch.equal(v, first)) for v in values):
            leaves.append(first)
        elif all(not isinstance(v, torch.Tensor) and v == first for v in values):
            leaves.append(first)
        else:
            return None
    return tree_unflatten(leaves, flat[0][1])


def _fit(module, calls, kept, settings, device, order, optimizer, was) -> Tuple[float, float]:
    params = [p for p, _ in kept]
    try:
        before = _error(module, calls, device, settings.batch)
        for _ in range(settings.steps):
            batch = torch.randperm(len(calls), generator=order)[: settings.batch].tolist()
            optimizer.zero_grad(set_to_none=True)
            together = joined([calls[i] for i in batch])
            for args, kwargs, target in [together] if together is not None else [calls[i] for i in batch]:
                loss = _mse(module, args, kwargs, target, device) * (1 if together is not None else 1 / len(batch))
                loss.backward()
            _mean_grads(params)
            for p, mask in kept:
                p.grad.masked_fill_(mask, 0)
            optimizer.step()
            with torch.no_grad():
                for p, mask in kept:
                    p.masked_fill_(mask, 0)
        after = _error(module, calls, device, settings.batch)
    finally:
        for p, flag in was:
            p.requires_grad_(flag)
    return before, after


def _mse(module, args, kwargs, target, device) -> torch.Tensor:
    out = module(*_to(args, device, True), **_to(kwargs, device, True))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return (out.float() - _to(target, device, True).float()).pow(2).mean()


@torch.no_grad()
def _error(module, calls, device, size: int = 1) -> float:
    """The mean squared error per call, ``size`` calls per forward where they join."""
    total = 0.0
    for start in range(0, len(calls), size):
        group = calls[start:start + size]
        together = joined(group)
        if together is not None and len({c[2].shape[0] for c in group}) == 1:  # equal weights: the same mean
            total += float(_mse(module, *together, device)) * len(group)
        else:
            total += sum(float(_mse(module, a, k, t, device)) for a, k, t in group)
    return total / max(len(calls), 1)


def reconstruct_block(block: nn.Module, block_name: str, targets: Dict[str, nn.Module],
                      masks: Dict[str, torch.Tensor], calls: Dict[str, List[tuple]], settings: Reconstruction,
                      device, seed: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """Fit each recorded part of ``block`` in turn; returns per part the error before and after."""
    report = {}
    _out_of_inference(block)
    for i, (name, module) in enumerate(parts(block, targets, block_name, settings.mode).items()):
        prefix = f"{block_name}.{name}." if name else f"{block_name}."
        mine = {n: m for n, m in targets.items() if n.startswith(prefix) or not name}
        kept = kept_parameters(block, mine, masks, block_name)
        before, after = fit(module, calls[name], kept, settings, device, (settings.seed if seed is None else seed) + i)
        report[f"{block_name}.{name}" if name else block_name] = {"before": before, "after": after}
    return report
