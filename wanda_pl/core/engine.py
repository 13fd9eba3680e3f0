"""The one block-sequential pruning engine, shared by every method and architecture.

For each block in order: hook its prunable layers and run every calibration sample
through it (pass 1, statistics), prune all its layers at once, then re-run the pruned
block (pass 2) so the next block calibrates on the activations it will really see.
``propagate=False`` skips pass 2 and feeds the dense outputs forward instead (the vision
reference's behaviour); a method that needs no activations (magnitude) runs no forward
pass at all. Activations live on ``store_device`` (CPU by default) between blocks, while
each block runs on its own device, so calibration memory on the accelerator is one block.
Each layer gets the sparsity its plan says (:mod:`wanda_pl.core.plan`; one spec = uniform) and
the method's own options. With ``bias_correction`` every method (magnitude too) calibrates, sees
statistics about the input mean, and each layer's lost mean output is put back
(:mod:`wanda_pl.core.correction`).

Scale: a placement (:mod:`wanda_pl.core.onload`) brings each block's weights in just before its
turn and takes them back after it, so the model need not fit the device (or host memory); under
``torch.distributed`` each rank runs its share of the samples and the statistics are summed
(:mod:`wanda_pl.core.distributed`) before any mask is chosen; each finished block is handed to
the checkpoints, and a resumed run starts at the first block not finished.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import correction
from .distributed import check_same, sum_stats
from .hooks import BlockInput, collect_stats
from .onload import Placement
from .reconstruct import Reconstruction, parts, reconstruct_block, record_calls, with_targets
from .plan import Plan, plan_for
from .precision import as_compute
from .sparsity import SparsitySpec
from .layers import param_mask, weight_matrix
from .layers.experts import RareExperts
from .method import Method, unpack
from .types import TargetsFn

log = logging.getLogger(__name__)

OnBlock = Callable[[int, str, nn.Module, List[BlockInput], "PruneResult"], None]


@dataclass
class PruneResult:
    """What one pruning produced: the masks, the sparsity each layer was given, and the times."""

    masks: Dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool, shaped like module.weight
    plan: Dict[str, SparsitySpec] = field(default_factory=dict)  # name -> the sparsity it was given
    # name -> input-column order under which its mask is N:M (RIA's permutation; only layers that have one)
    permutations: Dict[str, torch.Tensor] = field(default_factory=dict)
    method_s: float = 0.0  # mask + weight-update computation only (how the paper timed methods)
    forward_s: float = 0.0  # calibration forwards (pass 1 and 2)
    calibration_data_s: float = 0.0  # getting the calibration inputs (set by the caller)
    total_s: float = 0.0  # from the calibration data to the last block (set by the caller)
    samples_per_rank: List[int] = field(default_factory=list)  # calibration samples each rank ran (set by the caller)
    resumed_from: int = 0  # the first block this process pruned (> 0: a resumed run)
    tokens: Dict[str, int] = field(default_factory=dict)  # name -> calibration tokens it saw (all ranks)
    rare: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # rare experts' slices: tokens, what they took
    experts: Dict[str, Dict[str, list]] = field(default_factory=dict)  # whole experts removed, per MoE (REAP)
    reconstruction: Dict[str, Dict[str, float]] = field(default_factory=dict)  # part -> output error before/after
    structure: Dict[str, Any] = field(default_factory=dict)  # --pruning.structure: what was kept, removed, counted


class NoCheckpoints:
    """A run that is not checkpointed: the plan computed, nothing to resume, nothing saved
    (the interface :class:`wanda_pl.commands.resume.BlockCheckpoints` implements)."""

    def plan(self, compute: Callable[[], Plan]) -> Plan:
        return compute()

    def restore(self, blocks, inputs: List[BlockInput], recut=None) -> Tuple[int, PruneResult]:
        """(the first block still to prune, the masks and plan of those before it); ``recut(name,
        block, record)`` gives a structured pass's block its checkpointed shapes before its weights."""
        return 0, PruneResult()

    def save(self, index: int, name: str, block: nn.Module, inputs: List[BlockInput], result: PruneResult,
             weights: bool = True) -> None:
        pass


def merge_resumed(done: PruneResult, result: PruneResult, start: int) -> None:
    """``result`` of a run resumed at block ``start`` made whole with the blocks ``done`` before it."""
    result.masks, result.plan = {**done.masks, **result.masks}, {**done.plan, **result.plan}
    result.permutations = {**done.permutations, **result.permutations}
    result.tokens, result.rare = {**done.tokens, **result.tokens}, {**done.rare, **result.rare}
    result.reconstruction = {**done.reconstruction, **result.reconstruction}
    result.resumed_from = start


def check_targets(targets: Dict[str, nn.Module], plan: Union[SparsitySpec, Plan]) -> Dict[str, SparsitySpec]:
    """Fail before any work if a layer cannot take its sparsity (N:M needs M to divide the input
    width); returns the plan for exactly ``targets``."""
    if not targets:
        raise ValueError("no prunable layers were selected; check the targets / ignore patterns")
    plan = plan_for(plan, targets)
    for name, module in targets.items():
        plan[name].check_width(weight_matrix(module).shape[1], name)
    return plan


def device_of(block: nn.Module, default) -> torch.device:
    p = next(block.parameters(), None)
    return p.device if p is not None else torch.device(default)


def needs_activations(method: Method, bias_correction: bool = False) -> bool:
    return method.needs_activations or bias_correction


def prune_layers(
    targets: Dict[str, nn.Module], stats: Dict, method: Method, plan: Union[SparsitySpec, Plan], options: Any,
    result: PruneResult, sinks: Optional[Dict[str, nn.Module]] = None, bias_correction: bool = False,
    rare: Optional[RareExperts] = None,
) -> None:
    """Compute and apply every target's mask in place (weights keep their dense shape and dtype).

    ``options``: the method's own (None: its defaults). With ``bias_correction``, ``sinks`` (from
    :func:`correction.find_sinks`) say where each layer's mean shift goes. ``rare``: what an MoE
    expert that calibration barely reached gets instead (magnitude, or left dense; listed in the result)."""
    plan = plan_for(plan, targets)
    options = method.options() if options is None else options
    if bias_correction:
        correction.require_sinks(targets, sinks or {})
    for name, module in targets.items():
        w = weight_matrix(module)
        st = stats.get(name)
        run, opts = method, options
        if rare is not None and rare.rare(name, module, st, method.needs_hessian):
            result.rare[name] = {"tokens": int(st.tokens), "took": rare.action}
            if rare.action == "dense":
                result.masks[name], result.plan[name] = torch.zeros(w.shape, dtype=torch.bool), plan[name]
                continue
            run, opts = rare.fallback, rare.fallback.options()
        if bias_correction:
            old_w = as_compute(w.detach()).clone()
            st = st.centered()
        t0 = time.perf_counter()
        mask, new_w, perm = unpack(run(as_compute(w.detach()), st, plan[name], opts))
        if w.is_cuda:
            torch.cuda.synchronize(w.device)
        result.method_s += time.perf_counter() - t0
        with torch.no_grad():
            if new_w is not None:
                w.copy_(new_w.to(w.dtype))
            w.masked_fill_(mask.to(w.device), 0)
        if bias_correction:
            correction.apply_shift(module, sinks[name], correction.output_shift(old_w, w.detach(), stats[name].mean))
        result.masks[name] = param_mask(module, mask).cpu()
        result.plan[name] = plan[name]
        if perm is not None:
            result.permutations[name] = perm.cpu()


def prune_sequential(
    blocks: Sequence[Tuple[str, nn.Module]],
    inputs: List[BlockInput],
    targets_fn: TargetsFn,
    method: Method,
    plan: Union[SparsitySpec, Plan],
    options: Any = None,
    *,
    bias_correction: bool = False,
    propagate: bool = True,
    store_device="cpu",
    progress: bool = True,
    placement: Optional[Placement] = None,
    start: int = 0,
    on_block: Optional[OnBlock] = None,
    keep_masks: bool = True,
    rare: Optional[RareExperts] = None,
    reconstruct: Optional[Reconstruction] = None,
) -> PruneResult:
    """Prune ``blocks`` in order; ``inputs`` are the captured inputs of the first block; ``plan``
    gives each layer its sparsity (one spec: all of them); ``options`` are the method's.

    ``placement`` brings each block's weights in for its turn (offload); ``start`` skips the blocks
    before it (a resumed run: ``inputs`` are then those entering block ``start``); ``on_block(i,
    name, block, inputs, result)`` runs after each block is final and given back (checkpoints);
    without ``keep_masks`` a block's masks are dropped after it (the checkpoints hold them: a model
    offloaded to disk must not hold a byte per weight of its whole depth); ``rare``: what MoE experts
    that calibration barely reached get (:class:`RareExperts`); ``reconstruct``: fit each pruned block's
    kept weights to the dense block's outputs (:mod:`wanda_pl.core.reconstruct`). Under
    ``torch.distributed`` each rank passes its share of the samples: statistics are summed over
    the ranks before any mask is chosen, and the masks checked equal on every rank."""
    result = PruneResult()
    placement = placement or Placement()
    all_targets = [targets_fn(name, block) for name, block in blocks]
    every_target = {k: v for t in all_targets for k, v in t.items()}
    plan = check_targets(every_target, plan)
    options = method.options() if options is None else options
    if bias_correction:
        correction.check_possible(every_target, [b for _, b in blocks])
    rec = reconstruct if reconstruct is not None and reconstruct.enabled else None
    active = needs_activations(method, bias_correction) or rec is not None
    todo = list(zip(range(len(blocks)), blocks, all_targets))[start:]
    if rec is not None and rec.dense_stream and start > 0:
        raise ValueError("pruning.reconstruct_target dense cannot resume: the dense stream of the blocks already "
                         "pruned is gone; start the run again, or use reconstruct_target pruned")
    dense = [dataclasses.replace(inp) for inp in inputs] if rec is not None and rec.dense_stream else None
    what = "blocks" if active else "layers"
    bar = tqdm(todo, desc=f"{method.name}: {what}", disable=not progress, initial=start, total=len(blocks))
    for index, (name, block), targets in bar:
        placement.enter(name, block)
        if active:
            _calibrate_and_prune(block, targets, inputs, method, {n: plan[n] for n in targets}, options, result,
                                 bias_correction, propagate, store_device, rare, (name, index, rec, dense))
        else:
            prune_layers(targets, {}, method, {n: plan[n] for n in targets}, options, result)
        check_same(name, {n: result.masks[n] for n in targets})
        placement.leave(name, block, pruned=True)  # first: an offloaded block is written out here
        if on_block is not None:
            on_block(index, name, block, inputs, result)
        if not keep_masks:
            for n in targets:
                del result.masks[n]
        bar.set_postfix_str(name)
    return result


def _calibrate_and_prune(block, targets, inputs, method, plan, options, result, bias_correction, propagate,
                         store_device, rare=None, where=("", 0, None, None)) -> None:
    """One block's turn: pass 1 (statistics, summed over ranks; with a reconstruction, the dense
    outputs of what it fits), its masks, the reconstruction, pass 2; ``inputs`` then hold what enters
    the next block. ``where``: (the block's name, its index, the reconstruction or None, the dense
    stream's inputs or None: their outputs are then the reconstruction's targets)."""
    name, index, rec, dense = where
    device = device_of(block, store_device)
    t0 = time.perf_counter()
    finding = correction.find_sinks(block, targets) if bias_correction else nullcontext(None)
    recording = record_calls(parts(block, targets, name, rec.mode), store_device) if rec else nullcontext({})
    with torch.no_grad(), collect_stats(targets, method.needs_hessian) as stats, finding as sinks, recording as calls:
        outs = [inp.call(block, device).to(store_device) for inp in inputs]
    if dense is not None:
        with torch.no_grad(), record_calls(parts(block, targets, name, rec.mode), store_device) as dense_calls:
            for inp in dense:
                inp.hidden = inp.call(block, device).to(store_device)
        calls = with_targets(calls, dense_calls)
    sum_stats(stats)
    result.forward_s += time.perf_counter() - t0
    result.tokens.update({n: int(s.tokens) for n, s in stats.items()})  # an MoE expert: the tokens routed to it
    prune_layers(targets, stats, method, plan, options, result, sinks, bias_correction, rare)
    del stats
    if rec is not None:
        t0 = time.perf_counter()
        result.reconstruction.update(reconstruct_block(block, name, targets, result.masks, calls, rec, device,
                                                       seed=rec.seed + index))
        result.method_s += time.perf_counter() - t0
    if propagate:
        t0 = time.perf_counter()
        with torch.no_grad():
            outs = [inp.call(block, device).to(store_device) for inp in inputs]
        result.forward_s += time.perf_counter() - t0
    for inp, out in zip(inputs, outs):
        inp.hidden = out
