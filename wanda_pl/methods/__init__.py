"""Pruning methods and the steps after them: one file each, and these two tables.

A method turns one layer's weight (out x in) and its calibration statistics into a pruning mask
(True = prune) and, for solvers like SparseGPT, updated weights (:mod:`wanda_pl.core.method`); a step
refines a mask-only method's mask or updates its kept weights (:mod:`.compose`). Each declares its own
options as a small frozen dataclass; the command line shows every declared option as
``--pruning.<name>`` (:func:`options`). Adding a method or a step is one new file plus one line here.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, NamedTuple, Tuple

from ..core.method import Method, option_doc
from . import ablations, admm, dsnot, magnitude, ria, sparsegpt, swaps, wanda
from .base import Step

METHODS: Dict[str, Method] = {m.name: m for m in (
    magnitude.METHOD,
    wanda.METHOD,
    sparsegpt.METHOD,
    *ablations.METHODS,
    ria.METHOD,
    admm.METHOD,
)}
STEPS: Dict[str, Step] = {s.name: s for s in (
    dsnot.STEP,
    swaps.STEP,
    admm.STEP,
)}
STEP_KINDS = ("refine", "update")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def step_names(kind: str) -> Tuple[str, ...]:
    """``none`` and the steps of ``kind`` (``refine`` or ``update``), as ``--pruning.<kind>`` takes them."""
    return ("none", *(s.name for s in STEPS.values() if s.kind == kind))


def get_step(kind: str, name: str):
    """The step ``name`` of ``kind``, or None for ``none``."""
    if name not in step_names(kind):
        raise ValueError(f"pruning.{kind} must be one of {step_names(kind)}, got {name!r}")
    return None if name == "none" else STEPS[name]


class Option(NamedTuple):
    default: Any
    type: Any
    doc: str


def options() -> Dict[str, Option]:
    """Every option any method or step declares, by name, in table order: what ``--pruning.*`` offers.
    Methods sharing an option (``granularity``; SparseGPT's ``blocksize``) must agree on its default."""
    out: Dict[str, Option] = {}
    for owner in [*METHODS.values(), *STEPS.values()]:
        types = typing.get_type_hints(owner.options)
        for f in dataclasses.fields(owner.options):
            if f.name in out and out[f.name].default != f.default:
                raise TypeError(f"{owner.name} declares option {f.name!r} with default {f.default!r}, another "
                                f"method {out[f.name].default!r}: one option, one default")
            out.setdefault(f.name, Option(f.default, types[f.name], option_doc(f)))
    return out


def check_options(**values) -> None:
    """Validate every option with the options class of each method and step that declares it (a bad
    value fails whether or not the chosen method reads it: a typo must not wait for the sweep point
    that uses it)."""
    for owner in [*METHODS.values(), *STEPS.values()]:
        names = {f.name for f in dataclasses.fields(owner.options)}
        owner.options(**{k: v for k, v in values.items() if k in names})


def method_names() -> List[str]:
    return sorted(METHODS)
