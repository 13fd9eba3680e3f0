"""A sparsity plan: which sparsity each prunable layer gets.

The engine takes a mapping from layer name to :class:`SparsitySpec`; ``uniform`` is what the
CLI's ``--pruning.sparsity_ratio`` / ``--pruning.sparsity_type`` mean. Non-uniform allocations
(per-block profiles, outlier-weighted ones) are just other mappings.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Union

from .sparsity import SparsitySpec

Plan = Mapping[str, SparsitySpec]


def uniform(spec: SparsitySpec, names: Iterable[str]) -> Dict[str, SparsitySpec]:
    return {name: spec for name in names}


def plan_for(plan: Union[SparsitySpec, Plan], names: Iterable[str]) -> Dict[str, SparsitySpec]:
    """``plan`` for exactly the layers ``names``: a single spec is uniform; a mapping must name
    every layer and no other."""
    names = list(names)
    if isinstance(plan, SparsitySpec):
        return uniform(plan, names)
    missing = [n for n in names if n not in plan]
    extra = sorted(set(plan) - set(names))
    if missing or extra:
        raise ValueError(f"the sparsity plan does not match the prunable layers: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, not prunable {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in names:
        if not isinstance(plan[name], SparsitySpec):
            raise TypeError(f"the sparsity plan maps {name!r} to {plan[name]!r}, not a SparsitySpec")
    return {n: plan[n] for n in names}


def describe(plan: Plan) -> Dict[str, float]:
    """Planned sparsity per layer, for reports (beside the measured one)."""
    return {name: spec.ratio for name, spec in plan.items()}
