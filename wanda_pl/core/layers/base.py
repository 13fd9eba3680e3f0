"""The shape of a layer kind (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..precision import as_compute


def rows(x: torch.Tensor) -> torch.Tensor:
    """Every leading dimension is a token: (..., in) -> (tokens, in), in the compute dtype."""
    return as_compute(x.detach()).reshape(-1, x.shape[-1])


@dataclass(frozen=True)
class LayerKind:
    name: str
    claims: Callable[[nn.Module], bool]  # is this module of the kind
    matrix: Callable[[nn.Module], torch.Tensor]  # weight as (out, in), sharing storage
    flatten: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # input -> (tokens, in), compute dtype
    to_param: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (out, in) mask -> weight-shaped
    conv: bool = False  # selected only when convolutions are asked for
    prunable: Callable[[nn.Module], bool] = lambda module: True  # e.g. not a grouped conv
