"""A sweep's table and pictures, made from its points' own reports: ``sweep.csv``, ``sweep.json``
and one ``<metric>_vs_sparsity.png`` per declared metric (:mod:`wanda_pl.eval.metrics`) the points measured."""
from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..eval.metrics import METRICS
from .plots import metric_png
from .machine import hardware
from .report import COVERAGE, atomic_write, headline, versions, write_json

SETTINGS = ("model", "model_path", "dtype", "calibration", "evaluation", "nsamples", "seqlen", "seed",
            "max_eval_windows", "eval_windows", "eval_images")


def row_of(point, report: Mapping[str, Any], resumed: bool = False) -> Dict[str, Any]:
    """One point's row: its settings, actual sparsity, metrics and times, all from its report."""
    times = report.get("time_s") or {}
    return {
        "point": point.name, "method": point.method, "update": report.get("update"),
        "allocation": report.get("allocation"),
        "sparsity_type": report["sparsity_type"], "sparsity_ratio": report["sparsity_ratio"],
        "actual_sparsity": report["actual_sparsity"], **{k: report.get(k) for k in COVERAGE}, **headline(report),
        **{f"time_{k}_s": v for k, v in times.items()},
        **_shape(report),
        "resumed": resumed,
    }


def _shape(report: Mapping[str, Any]) -> Dict[str, Any]:
    """A structured point's columns: what it removed and the parameters before and after."""
    if report.get("structure") not in ("width", "depth"):
        return {}
    before, after = report["parameters_dense"], report["parameters"]
    return {"structure": report["structure"], "width_mlp": report.get("width_mlp"),
            "width_heads": report.get("width_heads"), "blocks_removed": report.get("blocks_removed"),
            "parameters": after, "parameters_dense": before, "parameters_removed": 1 - after / before}


def to_csv(rows: List[Mapping[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_summary(out: Path, grid, rows: List[Dict[str, Any]], dense: Optional[Mapping[str, Any]],
                  last_report: Mapping[str, Any]) -> Dict[str, Any]:
    """Rewrite the sweep's files from ``rows``; returns the summary with the ``files`` written."""
    files = ["sweep.csv", "sweep.json"]
    title = f"{last_report.get('model')}: {last_report.get('nsamples')} calibration samples" + \
        (f" x {last_report['seqlen']} tokens" if last_report.get("seqlen") else "")
    for metric in METRICS.values():
        if any(r.get(metric.name) is not None for r in rows):
            dense_column, name = f"{metric.name}_dense", f"{metric.name}_vs_sparsity.png"
            reference = next((r[dense_column] for r in rows if r.get(dense_column) is not None), None)
            metric_png(out / name, rows, metric.name, metric.axis, reference, metric.log_scale, title)
            files.append(name)
    summary = {
        "grid": asdict(grid), "points": [r["point"] for r in rows], "dense": dense,
        "settings": {k: last_report.get(k) for k in SETTINGS if k in last_report},
        "versions": versions(), "hardware": hardware(), "rows": rows, "files": files,
    }
    atomic_write(out / "sweep.csv", to_csv(rows))
    write_json(out / "sweep.json", summary)
    return summary
