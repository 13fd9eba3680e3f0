"""What the engine, the callbacks and the commands may ask of a prunable LightningModule.

``CausalLM`` and ``Classifier`` implement it; nothing else is probed. Mask and target names are
relative to ``model`` (the wrapped network), so a mask file fits the bare network too.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple, runtime_checkable

import torch
import torch.nn as nn

from ..core.hooks import BlockInput
from ..core.onload import Placement
from ..core.types import Blocks
from ..eval.metric import Metric


@runtime_checkable
class PrunableModule(Protocol):
    model: nn.Module  # the wrapped network (Hugging Face or timm)
    path: Optional[str]  # the local weights it was loaded from (an input: never overwritten)
    train_losses: List[torch.Tensor]  # one per training step of the current fit

    # --- what to prune ---
    def all_targets(self) -> Dict[str, nn.Module]:
        """Every prunable layer, by name."""

    def block_targets(self, name: str, block: nn.Module) -> Dict[str, nn.Module]:
        """The prunable layers of one block (``name`` is the block's own name)."""

    def prunable_blocks(self, calibration: Optional[torch.Tensor], store_device,
                        batch_size: Optional[int] = None) -> Tuple[Blocks, List[BlockInput]]:
        """The blocks in the order the network runs them, and the first block's captured inputs
        for ``calibration`` (none when it is None), ``batch_size`` samples per input (None: the
        module's default)."""

    def placement(self) -> Placement:
        """Where each block's weights come from for its turn (:mod:`wanda_pl.core.onload`)."""

    def set_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """The masks now applied (from the Pruning callback): e.g. masked LoRA updates skip them."""

    # --- measuring ---
    measures: Tuple[Metric, ...]  # the declared metrics (wanda_pl.eval.metrics) its validation measures

    def validation_metrics(self) -> Dict[str, Any]:
        """The metrics of the last validation run (written by this module only), by their declared
        names, and whatever else the run counted."""

    def measured_on(self, metrics: Dict[str, Any]) -> Dict[str, Any]:
        """What the report keeps beside the declared metrics of ``validation_metrics()``: what they
        were measured over, where the data section does not say it (a classifier's image counts)."""

    def metrics_line(self, dense: Optional[Dict[str, Any]], pruned: Dict[str, Any]) -> str:
        """One console line comparing dense and pruned."""

    # --- describing and saving ---
    def describe(self) -> Dict[str, Any]:
        """The report's ``model`` section: what was loaded, from where, in which dtype."""

    def finetune_describe(self) -> Dict[str, Any]:
        """The fine-tuning settings (mode, learning rate, trainable parameters) for ``fit``'s report."""

    def save(self, folder, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """The network as a folder this module (or its library) reloads; ``state_dict``: the whole
        weights of a sharded model."""


MEMBERS = tuple(sorted({*PrunableModule.__annotations__, *(n for n in vars(PrunableModule) if not n.startswith("_"))}))


def require(module: Any) -> PrunableModule:
    """``module`` if it implements :class:`PrunableModule`, else a clear error naming what it lacks."""
    missing = [n for n in MEMBERS if not hasattr(module, n)]
    if missing:
        raise TypeError(f"{type(module).__name__} is not a prunable module (wanda_pl.modules.protocol."
                        f"PrunableModule): it lacks {', '.join(missing)}")
    return module
