"""Evaluation as plain functions and metrics: perplexity (sums as tensors, reduced across ranks,
one float out), lm-eval zero-shot accuracy on the in-memory model, and image top-1/top-5 and
agreement with the dense model. Heavy imports (lm-eval) happen lazily, inside the functions.
Each metric is declared once beside its computation (:class:`.metric.Metric`); :mod:`.metrics`
lists them for the report, sweep tables and plots, loggers and model cards."""
