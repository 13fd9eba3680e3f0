"""What a measured number is, declared once beside the code that computes it (``PERPLEXITY`` in
:mod:`.perplexity`, ``TOP1`` ... in :mod:`.vision`, ``ZERO_SHOT_MEAN_ACC`` in :mod:`.results`); the
table of them all is :data:`wanda_pl.eval.metrics.METRICS`. Reports, sweep tables and plots, loggers,
consoles and model cards take the name, label and scale from here, so none of them spells one out.

Reports keep two measurements of one model side by side as ``{name: {side: value}}``: ``dense`` and
``pruned`` for a prune run, ``before`` and ``after`` for fine-tuning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

PRUNE_SIDES = ("dense", "pruned")
FIT_SIDES = ("before", "after")


@dataclass(frozen=True)
class Metric:
    """One measured number.

    Args:
        name: its key in a module's validation metrics, a report's ``metrics``, the sweep's CSV
            (``name`` and ``name_dense``) and the loggers.
        label: what tables, plots and model cards call it (``top-1 accuracy``).
        lower_is_better: perplexity: True; accuracies: False (said on the plots' axes).
        log_scale: plotted on a log axis (perplexity spans orders of magnitude as sparsity grows).
        short: the console's name for it (default: ``label``).
        percent: a fraction, shown on the console in percent.
    """

    name: str
    label: str
    lower_is_better: bool
    log_scale: bool = False
    short: str = ""
    percent: bool = False

    def show(self, value: Optional[float]) -> str:
        """The console's form of ``value``: ``42.108``, ``85.00%``, ``n/a``."""
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}%" if self.percent else f"{value:.3f}"

    @property
    def axis(self) -> str:
        """The label of a plot's axis for it."""
        notes = ["lower is better" if self.lower_is_better else "higher is better"]
        return f"{self.label} ({', '.join(notes + (['log scale'] if self.log_scale else []))})"


def paired(metrics: Iterable[Metric], first: Optional[Mapping[str, Any]], second: Optional[Mapping[str, Any]],
           sides: Tuple[str, str] = PRUNE_SIDES) -> Dict[str, Dict[str, Any]]:
    """``{name: {sides[0]: value, sides[1]: value}}`` for each of ``metrics`` measured on either side
    (a side not measured at all is None)."""
    out: Dict[str, Dict[str, Any]] = {}
    for m in metrics:
        a, b = ((values or {}).get(m.name) for values in (first, second))
        if a is not None or b is not None:
            out[m.name] = {sides[0]: a, sides[1]: b}
    return out


def compare_line(metrics: Iterable[Metric], dense: Optional[Mapping[str, Any]], pruned: Mapping[str, Any]) -> str:
    """``perplexity dense 19.100, pruned 42.108`` for each of ``metrics``, joined by ``; ``."""
    return "; ".join(f"{m.short or m.label} dense {m.show(None if dense is None else dense.get(m.name))}, "
                     f"pruned {m.show(pruned.get(m.name))}" for m in metrics)
