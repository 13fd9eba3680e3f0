"""Hugging Face's ``Conv1D`` (GPT-2 family): a Linear whose weight is stored (in, out)."""
import torch.nn as nn

from .base import LayerKind, rows


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


CONV1D = LayerKind(
    name="Conv1D",
    claims=_is_conv1d,
    matrix=lambda m: m.weight.t(),
    flatten=lambda m, x: rows(x),
    to_param=lambda m, mask: mask.t().contiguous(),
)
