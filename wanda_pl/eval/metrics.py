"""The table of every declared metric (:class:`wanda_pl.eval.metric.Metric`), in the order reports,
sweep tables, plots, loggers and model cards show them. A new metric: its declaration beside the
code computing it, one line here, and the module (or callback) producing its value by that name.

Nothing below the commands reads this table: a module names its own metrics directly.
"""
from __future__ import annotations

from typing import Dict

from .metric import Metric
from .perplexity import PERPLEXITY
from .results import ZERO_SHOT_MEAN_ACC
from .vision import AGREEMENT, AGREEMENT_UNLABELLED, TOP1, TOP5

METRICS: Dict[str, Metric] = {m.name: m for m in (
    PERPLEXITY,
    TOP1,
    TOP5,
    AGREEMENT,
    AGREEMENT_UNLABELLED,
    ZERO_SHOT_MEAN_ACC,
)}
