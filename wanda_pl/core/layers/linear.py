"""``nn.Linear``: the weight is already (out, in); every leading input dimension is a token."""
import torch.nn as nn

from .base import LayerKind, rows

LINEAR = LayerKind(
    name="Linear",
    claims=lambda m: isinstance(m, nn.Linear),
    matrix=lambda m: m.weight,
    flatten=lambda m, x: rows(x),
    to_param=lambda m, mask: mask.reshape(m.weight.shape),
)
