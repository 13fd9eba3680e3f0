"""What decides a number is written next to it: sparsity, versions, atomic JSON, tables."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..eval.metric import FIT_SIDES, PRUNE_SIDES, paired
from ..eval.metrics import METRICS
from ..eval.results import declared as zero_shot_declared
from .outputs import TMP_TAG

# What every report says of its coverage (core.coverage): sweeps' rows and loggers take them as they are.
COVERAGE = ("target_coverage", "sparsity_block_weights", "sparsity_model")


def assemble(**sections: Mapping[str, Any]) -> Dict[str, Any]:
    """One flat report from named sections (``model``, ``method``, ``data``, ``results``, ...), in
    that order; a key in two sections is an error, not a silent overwrite. ``sections`` lists
    which keys came from which section."""
    report: Dict[str, Any] = {}
    owner: Dict[str, str] = {}
    for name, section in sections.items():
        for key, value in section.items():
            if key in owner:
                raise ValueError(f"report key {key!r} is in both the {owner[key]!r} and the {name!r} sections")
            owner[key] = name
            report[key] = value
    if "sections" in owner:
        raise ValueError(f"report key 'sections' is reserved (found in the {owner['sections']!r} section)")
    report["sections"] = {name: list(section) for name, section in sections.items()}
    return report


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "lightning", "transformers", "datasets", "timm", "lm_eval", "torchmetrics", "peft"):
        mod = sys.modules.get(pkg)
        if mod is None:
            try:
                from importlib.metadata import version

                out[pkg] = version(pkg.replace("_", "-"))
            except Exception:  # noqa: BLE001 - a missing optional package is just not recorded
                continue
        else:
            out[pkg] = getattr(mod, "__version__", "?")
    from importlib.metadata import version as _v

    out["wanda_pl"] = _v("wanda_pl")
    return out


def peak_memory() -> Dict[str, float]:
    """Peak resident memory of this process (MB) and, on CUDA, peak allocated device memory."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss_mb": round(rss_kb / 1024, 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def atomic_write(path: Path, data, mode: str = "w") -> Path:
    """Write ``data`` (text, bytes, or a callable given the open file) to ``path`` atomically: a
    reader sees the old file or the new one, never half of one. Permissions as a plain write's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from a shared group
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as f:
            data(f) if callable(data) else f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically."""
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def block_grid(layers: Mapping[str, float]) -> Tuple[List[str], List[str], Dict[str, Dict[str, float]]]:
    """Per-layer values as (blocks, layer types, block -> type -> value): a layer's block is its name
    up to the first numeric part (``model.layers.3``), its type the rest (``self_attn.q_proj``)."""
    rows: Dict[str, Dict[str, float]] = {}
    cols: Dict[str, None] = {}
    for name, value in layers.items():
        parts = name.split(".")
        split = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
        block, leaf = ".".join(parts[:split]), ".".join(parts[split:]) or parts[-1]
        rows.setdefault(block, {})[leaf] = value
        cols.setdefault(leaf)
    return list(rows), list(cols), rows


def column_names(types: List[str]) -> List[str]:
    """A short header per layer type: its last name part, or the last two where the last is shared
    (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``)."""
    last = [t.split(".")[-1] for t in types]
    return [".".join(t.split(".")[-2:]) if last.count(short) > 1 else short for t, short in zip(types, last)]


def sparsity_table(layers: Mapping[str, float]) -> str:
    """Per-layer sparsity as a block x layer-type grid (one row per block)."""
    blocks, names, rows = block_grid(layers)
    width = max([len("block")] + [len(b) for b in blocks])
    cell = max([9] + [len(c) for c in column_names(names)])
    head = "block".ljust(width) + "".join(f" {c:>{cell}}" for c in column_names(names))
    lines = [head, "-" * len(head)]
    for block, vals in rows.items():
        lines.append(block.ljust(width) + "".join(f" {vals[c]:>{cell}.4f}" if c in vals else f" {'-':>{cell}}"
                                                  for c in names))
    return "\n".join(lines)


def measured(first, second, sides: Tuple[str, str] = PRUNE_SIDES) -> Dict[str, Any]:
    """The report's ``metrics`` from two evaluations (``first`` may be None): each declared metric
    measured, ``{name: {sides[0]: value, sides[1]: value}}``; with zero-shot, its per-task tables
    too, as ``zero_shot: {side: result}`` (the mean accuracy is in ``metrics`` as well)."""
    def values(evaluation):
        return None if evaluation is None else {**evaluation.metrics, **zero_shot_declared(evaluation.zero_shot)}

    out: Dict[str, Any] = {"metrics": paired(METRICS.values(), values(first), values(second), sides)}
    if second.zero_shot is not None:
        out["zero_shot"] = {sides[0]: None if first is None else first.zero_shot, sides[1]: second.zero_shot}
    return out


def sides_of(report: Mapping[str, Any]) -> Tuple[str, str]:
    """A fit report compares before and after fine-tuning; a prune report dense and pruned."""
    return FIT_SIDES if "sparsity_after" in report else PRUNE_SIDES


_OLD = ("ppl", "ppl_dense", "accuracy", "metrics_before", "metrics_after")


def upgrade(report: Mapping[str, Any]) -> Dict[str, Any]:
    """``report`` in today's shape, whichever version wrote it: sweeps resume from old reports.

    Before metrics were declared, a prune report kept ``ppl`` / ``ppl_dense`` flat, a classifier's
    pairs under ``accuracy.<name>.{dense, pruned}`` and the zero-shot mean only in ``zero_shot``; a
    fit report kept each side whole in ``metrics_before`` / ``metrics_after`` (zero-shot tables and a
    classifier's image counts included). Today's reports come back as they are."""
    if "metrics" in report or not any(k in report for k in (*_OLD, "zero_shot")):
        return dict(report)
    new = {k: v for k, v in report.items() if k not in _OLD}
    if "metrics_after" in report:
        before, after = report.get("metrics_before"), report["metrics_after"]
        results = measured(*(_side(side, (side or {}).get("zero_shot")) for side in (before, after)), FIT_SIDES)
        if "images" in after:
            results["eval_counts"] = {"images": after["images"], "labelled": after.get("labelled")}
    else:
        zero_shot = report.get("zero_shot") or {}
        pairs = {**({"ppl": {"dense": report.get("ppl_dense"), "pruned": report["ppl"]}} if "ppl" in report else {}),
                 **(report.get("accuracy") or {})}
        results = measured(*(_side({k: pair.get(side) for k, pair in pairs.items()}, zero_shot.get(side))
                             for side in PRUNE_SIDES))
        results.update({k: report[k] for k in ("eval_counts",) if k in report})
    new.update(results)
    if "sections" in report:
        kept = [k for k in report["sections"].get("results", []) if k not in (*_OLD, *results)]
        new["sections"] = {**report["sections"], "results": kept + list(results)}
    return new


def _side(values: Optional[Mapping[str, Any]], zero_shot: Optional[Mapping[str, Any]]) -> Any:
    """One side of an old report read as an evaluation: its metrics and its zero-shot result."""
    return None if values is None else SimpleNamespace(metrics=values, zero_shot=zero_shot)


def headline(report: Mapping[str, Any]) -> Dict[str, Optional[float]]:
    """A report's measured numbers, flat, for each declared metric measured: the pruned (after)
    value under the metric's name, the dense (before) one as ``<name>_dense`` (``_before``). What
    sweeps tabulate, loggers receive and model cards state; old reports are read through :func:`upgrade`."""
    pairs = upgrade(report).get("metrics") or {}
    first, second = sides_of(report)
    out: Dict[str, Optional[float]] = {}
    for metric in METRICS.values():
        if metric.name in pairs:
            out.update({metric.name: pairs[metric.name].get(second),
                        f"{metric.name}_{first}": pairs[metric.name].get(first)})
    return out


def method_label(report: Mapping[str, Any]) -> str:
    """The method with its steps, as a sweep names it: ``wanda``, ``wanda+dsnot+admm``."""
    steps = [str(report[k]) for k in ("refine", "update") if report.get(k) not in (None, "none")]
    return "+".join([str(report.get("method")), *steps])
