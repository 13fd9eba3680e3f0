"""Perplexity as the paper measures it: ``exp`` of the mean over windows of each window's mean
next-token NLL (fp32 logits, fp64 sums), summed across ranks before the one float comes out."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from ..core.distributed import all_reduce_sum
from .metric import Metric

PERPLEXITY = Metric("ppl", "perplexity", lower_is_better=True, log_scale=True)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window, fp32: shape (batch,)."""
    shift = logits[:, :-1].float()
    nll = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(ids.shape[0], -1).mean(dim=1)


class PerplexitySums:
    """The running sums of one evaluation: update per batch, ``compute`` once (a collective)."""

    def __init__(self, device=None) -> None:
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.windows = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        self.nll += window_nll(logits, ids).double().sum()
        self.windows += ids.shape[0]

    def compute(self) -> Optional[float]:
        """The perplexity over every rank's windows; None when no rank saw any."""
        total, count = all_reduce_sum(self.nll.clone()), all_reduce_sum(self.windows.clone())
        return None if float(count) == 0 else math.exp(float(total) / float(count))


@torch.no_grad()
def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[torch.Tensor], device=None) -> Optional[float]:
    """Perplexity of ``logits_of(ids)`` over ``batches`` of token-id windows (batch, seqlen)."""
    sums = PerplexitySums(device)
    for ids in batches:
        ids = ids.to(device) if device is not None else ids
        sums.update(logits_of(ids), ids)
    return sums.compute()
