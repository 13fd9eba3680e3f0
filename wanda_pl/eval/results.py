"""lm-eval's raw output reduced to the numbers we report, and the dense-vs-pruned console table.

Apart from :mod:`wanda_pl.eval.zero_shot` because neither needs lm-eval or a model: a saved result
can be tabled again without either.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from .metric import Metric

FIELDS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")  # lm-eval's, kept per task
# the paper's "Mean" column; the per-task tables stay in the report's ``zero_shot`` section
ZERO_SHOT_MEAN_ACC = Metric("zero_shot_mean_acc", "zero-shot mean accuracy", lower_is_better=False, percent=True)


def summarise(raw: dict, log_samples: bool) -> dict:
    def num(x):
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None

    per_task: Dict[str, dict] = {}
    for task, res in raw["results"].items():
        entry = {m: num(res.get(f"{m},none")) for m in FIELDS}
        entry["version"] = raw.get("versions", {}).get(task)
        entry["n"] = raw.get("n-samples", {}).get(task, {}).get("effective")
        per_task[task] = entry
    accs = [t["acc"] for t in per_task.values() if t["acc"] is not None]
    norms = [t["acc_norm"] if t["acc_norm"] is not None else t["acc"] for t in per_task.values()]
    norms = [x for x in norms if x is not None]
    out = {
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "mean_acc_norm": sum(norms) / len(norms) if norms else None,
    }
    if log_samples:
        out["samples"] = {
            task: [
                {
                    "doc_id": s["doc_id"],
                    "target": s["target"],
                    "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]],
                    **{m: s[m] for m in ("acc", "acc_norm") if m in s},
                }
                for s in samples
            ]
            for task, samples in raw.get("samples", {}).items()
        }
    return out


def declared(result: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A zero-shot result's declared metrics by name ({} when zero-shot was not measured)."""
    return {ZERO_SHOT_MEAN_ACC.name: result.get("mean_acc")} if result else {}


def format_table(dense: dict, pruned: dict, metric: str = "acc") -> str:
    """A console table of ``metric`` (``"acc"`` or ``"acc_norm"``), dense vs pruned, in percent."""
    if metric not in ("acc", "acc_norm"):
        raise ValueError("metric must be 'acc' or 'acc_norm'")
    names: List[str] = list(dense.get("tasks", {}))
    names += [t for t in pruned.get("tasks", {}) if t not in names]

    def cell(res: dict, task: str) -> str:
        t = res.get("tasks", {}).get(task)
        if not t:
            return "-"
        v = t.get(metric)
        err = t.get(f"{metric}_stderr")
        if v is None and metric == "acc_norm":  # task without acc_norm: its acc, as in mean_acc_norm
            v, err = t.get("acc"), t.get("acc_stderr")
        if v is None:
            return "-"
        s = f"{100 * v:.2f}"
        if err is not None and not math.isnan(err):
            s += f" ± {100 * err:.2f}"
        return s

    def diff(a, b) -> str:
        return f"{100 * (b - a):+.2f}" if a is not None and b is not None else "-"

    def val(res, task):
        t = res.get("tasks", {}).get(task) or {}
        v = t.get(metric)
        return t.get("acc") if v is None and metric == "acc_norm" else v

    header = ("task", "n", f"dense {metric}", f"pruned {metric}", "diff")
    rows = []
    for task in names:
        t = dense.get("tasks", {}).get(task) or pruned.get("tasks", {}).get(task) or {}
        n = t.get("n")
        rows.append((task, "-" if n is None else str(n), cell(dense, task), cell(pruned, task),
                     diff(val(dense, task), val(pruned, task))))
    key = f"mean_{metric}"
    md, mp = dense.get(key), pruned.get(key)
    rows.append((f"mean ({metric})", "", "-" if md is None else f"{100 * md:.2f}",
                 "-" if mp is None else f"{100 * mp:.2f}", diff(md, mp)))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r)))

    sep = "-" * len(line(header))
    notes = []
    for res, label in ((dense, "dense"), (pruned, "pruned")):
        if res:
            notes.append(f"{label}: source={res.get('source')} limit={res.get('limit')} "
                         f"fewshot={res.get('num_fewshot')} lm-eval {res.get('lm_eval_version')}")
    return "\n".join([line(header), sep] + [line(r) for r in rows[:-1]] + [sep, line(rows[-1])] + notes)
