"""The core every method and model family shares, as small pure pieces on tensors and modules:
sparsity specs and mask selection, sparsity plans, layer kinds, calibration statistics, hooks
that cannot leak, bias correction, and the one block-sequential engine that drives them all."""
