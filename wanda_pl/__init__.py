"""wanda_pl: prune Hugging Face causal LMs and timm classifiers (Wanda, SparseGPT, magnitude, ...)
and measure what pruning cost them, as a PyTorch Lightning pipeline.

Layers, from the math outward: ``core`` (sparsity, statistics, layer kinds, the one engine),
``methods`` (one file each), ``families`` (where a model family keeps its blocks), ``modules``
(the LightningModules and their contract), ``callbacks`` (thin adapters: calibration, pruning,
zero-shot), ``eval`` (metrics), ``data`` (datamodules), ``assets`` (the embedded models and data),
``training`` (LoRA, sharding, masks) and ``commands`` (prune, fit: the steps and the report).
"""
