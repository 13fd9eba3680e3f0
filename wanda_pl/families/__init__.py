"""Model-family knowledge: how a family is loaded and saved, where its repeated blocks are and
which of its layers are targets by default (Hugging Face causal LMs, timm classifiers). The
engine never asks a model for more than its blocks, their targets and the first block's inputs."""
