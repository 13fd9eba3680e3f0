"""A pruning run's numbers into the user's Lightning loggers (``--trainer.logger``: CSV,
TensorBoard, W&B, ...), so pruning runs sit beside training runs in the same dashboard."""
from __future__ import annotations

from typing import Any, Dict, Mapping

from .report import COVERAGE, headline


def _flat(prefix: str, value: Any, out: Dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flat(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (str, int, float, bool)) or value is None:
        out[prefix] = value


def run_metrics(report: Mapping[str, Any]) -> Dict[str, float]:
    """Dense and pruned metrics, actual and target sparsity, timings and per-layer sparsity."""
    numbers: Dict[str, Any] = {**headline(report), **{k: report.get(k) for k in COVERAGE},
                               "actual_sparsity": report.get("actual_sparsity"), "sparsity_ratio": report.get("sparsity_ratio")}
    _flat("time_s", report.get("time_s") or {}, numbers)
    _flat("sparsity", report.get("layers") or {}, numbers)
    return {k: float(v) for k, v in numbers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_run(trainer, report: Mapping[str, Any], step: int = 0) -> None:
    """Every logger of ``trainer`` receives the run's settings (hyperparameters) and numbers at ``step``."""
    if not trainer.loggers:
        return
    params: Dict[str, Any] = {}
    for section in ("model", "method", "data"):
        for key in report.get("sections", {}).get(section, []):
            _flat(key, report[key], params)
    metrics = run_metrics(report)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
        logger.log_metrics(metrics, step=step)
        logger.save()
