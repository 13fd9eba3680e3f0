"""Sparsity allocation: how the requested ratio is spread over the blocks, as a sparsity plan.

- ``uniform``: every layer gets the ratio (the paper).
- ``owl`` (Yin et al., ICML'24, "Outlier Weighed Layerwise sparsity"): on the dense model, each
  block's outlier ratio ``D_l`` is the share of its Wanda scores ``|W| * ||X||`` (all its layers
  together) above ``M`` times their mean; the ``D_l`` are rescaled to ``[0, 2 lambda]`` and block
  ``l`` gets sparsity ``s - (D'_l - mean D')``: blocks with more outliers are pruned less, and the
  blocks' sparsities span ``2 lambda``. The mean is weighted by the block's prunable weights, so
  the plan's overall ratio is ``s`` exactly (OWL's plain mean, for blocks of one size).
- ``profile``: the user's sparsity per block (a list), or per layer name (regex -> ratio), whose
  weighted mean must be ``s``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .passes import dense_pass
from .hooks import BlockInput
from .layers import weight_matrix
from .patterns import check_patterns
from .precision import as_compute
from .sparsity import SparsitySpec
from .types import TargetsByBlock, TargetsFn

ALLOCATIONS = ("uniform", "owl", "profile")
Profile = Union[Sequence[float], Mapping[str, float]]
# (weight (out x in), the input's scaler_row) -> a score per weight: OWL counts the outliers of Wanda's
OutlierScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TOLERANCE = 1e-6  # on a profile's mean


def check(allocation: str, spec: SparsitySpec, owl_m: float, owl_lambda: float, profile: Optional[Profile]) -> None:
    """Refuse, before any work, an allocation these settings cannot have."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"pruning.allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if allocation != "uniform" and spec.structured:
        raise ValueError(f"pruning.allocation={allocation!r} gives blocks different sparsities, and N:M sparsity "
                         f"{spec.type} fixes every block at {spec.ratio:g}: use unstructured sparsity, or "
                         f"allocation uniform")
    if allocation == "owl":
        bound = min(spec.ratio, 1 - spec.ratio)
        if not (isinstance(owl_lambda, (int, float)) and 0 <= owl_lambda < bound):
            raise ValueError(f"pruning.owl_lambda must be in [0, min(s, 1 - s)) = [0, {bound:g}) for sparsity "
                             f"{spec.ratio:g}, got {owl_lambda!r}")
        if not (isinstance(owl_m, (int, float)) and math.isfinite(owl_m) and owl_m > 0):
            raise ValueError(f"pruning.owl_m must be a number > 0, got {owl_m!r}")
    if isinstance(profile, Mapping):
        check_patterns("pruning.profile", profile)
    if (allocation == "profile") != (profile is not None):
        raise ValueError("pruning.profile is given exactly when pruning.allocation is 'profile' "
                         f"(allocation={allocation!r}, profile={profile!r})")


def sizes(blocks: TargetsByBlock) -> Dict[str, int]:
    """Prunable weights per block (what a plan's mean is weighted by)."""
    return {b: sum(m.weight.numel() for m in targets.values()) for b, targets in blocks.items()}


def per_layer(block_ratios: Mapping[str, float], blocks: TargetsByBlock) -> Dict[str, SparsitySpec]:
    return {name: SparsitySpec(float(block_ratios[b])) for b, targets in blocks.items() for name in targets}


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """Percentage of ``scores`` (one block's, all layers together) above ``m`` times their mean."""
    flat = torch.cat([as_compute(s.detach()).flatten().cpu() for s in scores])
    return float((flat > flat.mean() * m).sum()) / flat.numel() * 100


def owl_ratios(outliers: Sequence[float], ratio: float, lam: float, weights: Optional[Sequence[float]] = None) -> List[float]:
    """Per-block sparsity from the blocks' outlier ratios (see the module docstring)."""
    d = torch.tensor(list(outliers), dtype=torch.float64)
    w = torch.ones_like(d) if weights is None else torch.tensor(list(weights), dtype=torch.float64)
    w = w / w.sum()
    spread = d.max() - d.min()
    if float(spread) == 0:  # no block stands out: nothing to move
        return [ratio] * len(d)
    d = (d - d.min()) / spread * (2 * lam)
    return [float(x) for x in ratio - (d - (w * d).sum())]


def owl_plan(blocks, inputs: List[BlockInput], targets_fn: TargetsFn, ratio: float, m: float, lam: float,
             score: OutlierScore, store_device="cpu", progress: bool = True, placement=None) -> Dict[str, SparsitySpec]:
    """OWL's plan: one dense statistics pass over every block (the same engine), then
    :func:`owl_ratios` weighted by each block's prunable weights; ``score`` is Wanda's (the caller's:
    core knows no method)."""
    outliers: Dict[str, float] = {}
    targets_of: Dict[str, Dict[str, nn.Module]] = {}

    def on_block(name, targets, stats):
        targets_of[name] = targets
        outliers[name] = outlier_ratio(
            [score(weight_matrix(mod).detach().float(), stats[n].scaler_row) for n, mod in targets.items()], m)

    dense_pass(blocks, inputs, targets_fn, on_block, store_device=store_device, progress=progress, desc="owl: outliers",
               placement=placement)
    ratios = dict(zip(outliers, owl_ratios(list(outliers.values()), ratio, lam, list(sizes(targets_of).values()))))
    bad = {b: r for b, r in ratios.items() if not 0 <= r < 1}
    if bad:
        raise ValueError(f"OWL (owl_lambda={lam:g}, sparsity {ratio:g}) gives blocks sparsities outside [0, 1): "
                         f"{ {b: round(r, 4) for b, r in list(bad.items())[:3]} }; lower pruning.owl_lambda")
    return per_layer(ratios, targets_of)


def profile_plan(profile: Profile, blocks: TargetsByBlock, ratio: float) -> Dict[str, SparsitySpec]:
    """The plan a user's profile gives: a ratio per block (a list, in block order) or per layer
    (``{regex: ratio}``, the first regex that matches a layer name wins)."""
    names = list(blocks)
    if isinstance(profile, Mapping):
        layer_ratio: Dict[str, float] = {}
        for regex, value in profile.items():
            if not any(re.search(regex, n) for targets in blocks.values() for n in targets):
                raise ValueError(f"pruning.profile: {regex!r} matches no prunable layer (names like "
                                 f"{next(iter(next(iter(blocks.values()))))!r})")
        for targets in blocks.values():
            for n in targets:
                hit = next((v for r, v in profile.items() if re.search(r, n)), None)
                if hit is None:
                    raise ValueError(f"pruning.profile: no entry matches the layer {n!r}; add one (e.g. '.': {ratio})")
                layer_ratio[n] = hit
        values = list(layer_ratio.values())
    else:
        values = list(profile)
        if len(values) != len(names):
            raise ValueError(f"pruning.profile has {len(values)} entries, the model has {len(names)} blocks "
                             f"({names[0]} .. {names[-1]})")
        layer_ratio = {n: v for b, v in zip(names, values) for n in blocks[b]}
    bad = [v for v in values if not (isinstance(v, (int, float)) and 0 <= v < 1)]
    if bad:
        raise ValueError(f"pruning.profile entries must be in [0, 1), got {bad[:5]}")
    size = {n: m.weight.numel() for targets in blocks.values() for n, m in targets.items()}
    mean = sum(layer_ratio[n] * size[n] for n in size) / sum(size.values())
    if abs(mean - ratio) > TOLERANCE:
        raise ValueError(f"pruning.profile averages {mean:.6f} over the prunable weights, not the sparsity "
                         f"ratio {ratio:g}: scale it, or set --pruning.sparsity_ratio {mean:.6f}")
    return {n: SparsitySpec(float(v)) for n, v in layer_ratio.items()}


@dataclass(frozen=True)
class Allocation:
    """One allocation with its options (``--pruning.allocation``, ``owl_m``, ``owl_lambda``, ``profile``)."""

    kind: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    profile: Optional[Profile] = None

    def check(self, spec: SparsitySpec) -> None:
        check(self.kind, spec, self.owl_m, self.owl_lambda, self.profile)

    @property
    def needs_activations(self) -> bool:
        return self.kind == "owl"  # OWL's outlier ratios come from a dense statistics pass

    def describe(self) -> Dict[str, object]:
        return {"allocation": self.kind,
                **({"owl_m": self.owl_m, "owl_lambda": self.owl_lambda} if self.kind == "owl" else {}),
                **({"profile": self.profile} if self.kind == "profile" else {})}

    def plan(self, spec: SparsitySpec, blocks, inputs, targets_fn: TargetsFn, store_device="cpu",
             progress: bool = False, placement=None, outlier_score: Optional[OutlierScore] = None
             ) -> Dict[str, SparsitySpec]:
        """The sparsity of every target of ``blocks`` (OWL: from a dense pass over ``inputs``, its
        blocks brought in by ``placement``, outliers by ``outlier_score``)."""
        if self.kind == "owl":
            if outlier_score is None:
                raise TypeError("allocation owl counts outliers of a score: pass outlier_score (Wanda's)")
            return owl_plan(blocks, list(inputs), targets_fn, spec.ratio, self.owl_m, self.owl_lambda,
                            outlier_score, store_device, progress, placement)
        targets = {name: targets_fn(name, block) for name, block in blocks}
        if self.kind == "profile":
            return profile_plan(self.profile, targets, spec.ratio)
        return {n: spec for t in targets.values() for n in t}
