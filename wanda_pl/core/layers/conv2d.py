"""``nn.Conv2d``: a k x k conv is the linear map of its unfolded (in * k * k)-wide patches, so
its weight is (out, in * k * k) and every output pixel of every image is a token."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import LayerKind
from ..precision import as_compute


def patches(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if module.groups != 1:
        raise ValueError("grouped / depthwise convolutions are not prunable targets")
    if module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid"):
        return as_compute(x.detach()).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    padding = module.padding
    if isinstance(padding, str):
        raise ValueError(f"conv padding {padding!r} cannot be unfolded; use explicit padding")
    cols = F.unfold(as_compute(x.detach()), module.kernel_size, module.dilation, padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


CONV2D = LayerKind(
    name="Conv2d",
    claims=lambda m: isinstance(m, nn.Conv2d),
    matrix=lambda m: m.weight.reshape(m.weight.shape[0], -1),
    flatten=patches,
    to_param=lambda m, mask: mask.reshape(m.weight.shape),
    conv=True,
    prunable=lambda m: m.groups == 1,
)
