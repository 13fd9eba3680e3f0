"""Pruning methods: one file each, and this table.

A method turns one layer's weight (out x in, fp32) and its calibration statistics into a pruning
mask (True = prune) and, for solvers like SparseGPT, updated weights; it declares its own knobs
(:mod:`.base`). Adding a method is one new file plus one entry in ``METHODS``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List

from . import ablations, admm, magnitude, ria, sparsegpt, wanda
from .base import Method

METHODS: Dict[str, Method] = {m.name: m for m in (
    magnitude.METHOD,
    wanda.METHOD,
    sparsegpt.METHOD,
    *ablations.METHODS,
    ria.METHOD,
    admm.METHOD,
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def check_knobs(**knobs) -> None:
    """Validate every knob with the options class of each method that declares it."""
    for method in METHODS.values():
        method.make_options(**knobs)
    from .compose import STEP_OPTIONS

    for options in STEP_OPTIONS:
        options(**{f.name: knobs[f.name] for f in dataclasses.fields(options) if f.name in knobs})


def method_names() -> List[str]:
    return sorted(METHODS)
