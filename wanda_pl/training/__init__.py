"""Training the sparse model: masks as files, masked LoRA adapters, and the one place that knows
sharded (DTensor) weights, so that fine-tuning under any strategy keeps every pruned weight zero."""
