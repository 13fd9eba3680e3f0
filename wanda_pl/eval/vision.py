"""Image-classifier metrics: top-1 / top-5 accuracy, and top-1 agreement with the dense model.

Agreement is the fraction of images whose top-1 class equals the dense model's: a low-noise
measure of pruning damage that needs no labels. The dense reference is the top-1 of every image
by its dataset index, kept from one validation run (:meth:`Agreement.keep_as_reference`, every
rank's images) and compared against in later runs.

Across ranks: each image is evaluated on exactly one rank (the datamodule shards without
padding). A rank keeps a per-index tensor of ``top-1 + 1`` and ``label + 2`` (0 = not seen
here; label -1 = unlabelled), so summing the ranks' tensors gathers every image; torchmetrics
does the sum itself (``dist_reduce_fx="sum"``) when ``compute`` runs under ``torch.distributed``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.distributed import gather_all_tensors

from .metric import Metric as Declared  # ours, beside torchmetrics' Metric

log = logging.getLogger(__name__)

TOP1 = Declared("top1", "top-1 accuracy", lower_is_better=False, short="top-1", percent=True)
TOP5 = Declared("top5", "top-5 accuracy", lower_is_better=False, short="top-5", percent=True)
AGREEMENT = Declared("agreement", "top-1 agreement with the dense model", lower_is_better=False, short="agreement",
                     percent=True)
AGREEMENT_UNLABELLED = Declared("agreement_unlabelled", "top-1 agreement with the dense model, unlabelled images",
                                lower_is_better=False, short="agreement (unlabelled)", percent=True)


def top_k_accuracy(num_classes: int, k: int) -> MulticlassAccuracy:
    """Top-``k`` accuracy over labelled images (label -1 ignored); ``k`` capped at the class count."""
    return MulticlassAccuracy(num_classes=num_classes, top_k=min(k, num_classes), average="micro", ignore_index=-1)


def rounded(metric: Metric) -> float:
    # torchmetrics computes in float32: rounded so that 18/20 reads 0.9, not 0.8999999761
    return round(float(metric.compute()), 6)


def pad_to_longest(parts: List[torch.Tensor]) -> List[torch.Tensor]:
    """1-d tensors zero-padded at the end to the longest (scalars unchanged)."""
    if not parts or parts[0].dim() == 0:
        return parts
    n = max(p.shape[0] for p in parts)
    return [F.pad(p, (0, n - p.shape[0])) for p in parts]


def gather_padded(tensor: torch.Tensor, group=None) -> List[torch.Tensor]:
    """Every rank's ``tensor``, padded to one length: a rank's per-index tensor only reaches the
    highest index it saw, and torchmetrics stacks the gathered tensors before summing them."""
    return pad_to_longest(gather_all_tensors(tensor, group))


def agreement(preds: torch.Tensor, labels: torch.Tensor,
              reference: Optional[torch.Tensor]) -> Tuple[Optional[float], Optional[float]]:
    """(agreement over every image, over the unlabelled ones) of per-index ``preds`` with the
    per-index ``reference`` (-1: not seen); None where there is nothing to compare."""
    if reference is None:
        return None, None
    if reference.numel() != preds.numel():
        log.warning("the evaluation set changed since the dense predictions were stored (%d vs %d images): "
                    "no agreement", reference.numel(), preds.numel())
        return None, None
    reference = reference.to(preds.device)
    both = (preds >= 0) & (reference >= 0)
    same = (preds == reference) & both
    unl = both & (labels < 0)
    total = float(same.sum()) / max(int(both.sum()), 1) if int(both.sum()) else None
    unlabelled = float(same[unl].sum()) / int(unl.sum()) if int(unl.sum()) else None
    return total, unlabelled


class Agreement(Metric):
    """Per-image top-1 by dataset index: image counts, top-1 hits and agreement with ``reference``.

    ``update(logits, labels, indices)`` per batch; ``compute()`` -> ``images``, ``labelled``,
    ``top1_correct``, ``agreement``, ``agreement_unlabelled`` (over every rank). ``reference``
    (dense top-1 per index, -1 = not seen) is not a state: ``reset`` keeps it."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dist_sync_fn", gather_padded)
        super().__init__(**kwargs)
        self.add_state("top1", default=torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")  # top-1 + 1
        self.add_state("label", default=torch.zeros(0, dtype=torch.long), dist_reduce_fx="sum")  # label + 2
        self.reference: Optional[torch.Tensor] = None

    def update(self, logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
        indices = indices.long().to(self.top1.device)
        n = int(indices.max()) + 1 if indices.numel() else 0
        if n > self.top1.numel():
            grow = n - self.top1.numel()
            self.top1 = torch.cat([self.top1, self.top1.new_zeros(grow)])
            self.label = torch.cat([self.label, self.label.new_zeros(grow)])
        self.top1[indices] = logits.argmax(dim=-1).to(self.top1) + 1
        self.label[indices] = labels.long().to(self.label) + 2

    def merge_state(self, incoming_state: Union[Dict[str, Any], Metric]) -> None:
        """torchmetrics' merge (states summed), after padding both sides to one length as
        :func:`gather_padded` does across ranks."""
        if isinstance(incoming_state, Metric) and not isinstance(incoming_state, Agreement):
            return super().merge_state(incoming_state)  # torchmetrics refuses another class
        incoming = dict(incoming_state.metric_state if isinstance(incoming_state, Agreement) else incoming_state)
        for name in ("top1", "label"):
            mine, incoming[name] = pad_to_longest([getattr(self, name), incoming[name].to(getattr(self, name))])
            setattr(self, name, mine)
        super().merge_state(incoming)

    def keep_as_reference(self) -> None:
        """The top-1 seen so far, every rank's, becomes the dense reference (a collective under DDP)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute):
            self.reference = (self.top1 - 1).detach().cpu()
        self._computed = None  # a cached compute() compared against the old reference

    def compute(self) -> Dict[str, Any]:
        preds, labels = self.top1 - 1, self.label - 2
        seen = preds >= 0
        labelled = seen & (labels >= 0)
        out: Dict[str, Any] = {
            "images": int(seen.sum()),
            "labelled": int(labelled.sum()),
            "top1_correct": int((preds[labelled] == labels[labelled]).sum()),
        }
        out[AGREEMENT.name], out[AGREEMENT_UNLABELLED.name] = agreement(preds, labels, self.reference)
        return out


def validation_results(top1: Metric, top5: Metric, images: Agreement) -> Dict[str, Any]:
    """The metrics of one validation run: ``top1``, ``top5`` (None without labelled images) and
    the :class:`Agreement` counts."""
    counts = images.compute()
    labelled = counts["labelled"]
    return {TOP1.name: rounded(top1) if labelled else None, TOP5.name: rounded(top5) if labelled else None,
            **counts}
