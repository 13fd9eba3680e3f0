"""Named combinations of steps (``--pruning.preset``): the best ones measured, so a user need not
rediscover them. A preset is data: the ``--pruning.*`` values it stands for. What each costs and
gives is measured in ``benchmarks/llm_prune_quality.py`` and stated in the README."""
from __future__ import annotations

from typing import Any, Dict, Mapping

PRESETS: Dict[str, Dict[str, Any]] = {
    # lowest perplexity and zero-shot loss we have; about 4-7x SparseGPT's pruning time on SmolLM2
    "quality": {"method": "admm", "reconstruct": "block"},
    # Wanda's mask with ADMM's weight update: better than SparseGPT at about its time
    "balanced": {"method": "wanda", "update": "admm"},
}


def expand(given: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """``given`` with its preset's values filled in. A value given beside the preset that differs
    from both the default and the preset's is refused: which of the two was meant is not ours to guess."""
    name = given.get("preset")
    if name is None:
        return dict(given)
    if name not in PRESETS:
        raise ValueError(f"pruning.preset must be one of {', '.join(PRESETS)} (or unset), got {name!r}")
    out = dict(given)
    for key, value in PRESETS[name].items():
        mine = given.get(key, defaults[key])
        if mine not in (defaults[key], value):
            raise ValueError(f"pruning.preset {name} sets {key}={value!r}, and pruning.{key}={mine!r} was given too: "
                             f"drop one of them")
        out[key] = value
    return out
