"""Where a block's weights are while it is not its turn: the engine asks for a block just before it
runs and gives it back after, so a model need not fit on the accelerator (or in host memory).

:class:`Placement` (``offload: none``) leaves the model where Lightning put it. :class:`HostOffload`
(``offload: cpu``) keeps the weights in host memory and moves one block to the accelerator for its
turn. The disk form (``offload: disk``) reads each block from the checkpoint and writes it back out
pruned: :mod:`wanda_pl.families.hf_disk`."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

OFFLOADS = ("none", "cpu", "disk")


def check_offload(offload: str, device_map) -> None:
    if offload not in OFFLOADS:
        raise ValueError(f"model.offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    if offload != "none" and device_map is not None:
        raise ValueError("model.device_map spreads the whole model over devices and model.offload brings one block "
                         f"at a time: use one of them (got offload={offload!r}, device_map={device_map!r})")


def refuse_offloaded(what: str, offload: str, device_map=None) -> None:
    """``what`` needs whole-model forwards (and backwards): refused on a model that is never whole."""
    if offload != "none":
        raise UserError(f"{what} needs the whole model in memory, and model.offload={offload} holds one block at a "
                        f"time: use model.offload none with model.device_map auto (one model over several GPUs), "
                        f"a smaller model, or for fine-tuning FSDP2 (configs/llm/llama-2-7b_finetune_fsdp.yaml)")
    if device_map is not None and what == "fine-tuning":
        raise UserError("fine-tuning a model spread by model.device_map is not supported: use FSDP2 "
                        "(configs/llm/llama-2-7b_finetune_fsdp.yaml) or ddp on a model that fits one device")


class Placement:
    """Where a block's weights are for its turn. This base is ``offload: none``: every weight stays
    where it is (the whole model on its device); the offloads override ``enter`` and ``leave``."""

    offloaded = False

    def enter(self, name: str, block: nn.Module) -> None:
        """Make ``block``'s weights present on the device it computes on."""

    def leave(self, name: str, block: nn.Module, pruned: bool) -> None:
        """``block``'s turn is over (``pruned``: its weights are final)."""


class HostOffload(Placement):
    """Weights in host memory; each block on ``device`` during its turn only."""

    offloaded = True

    def __init__(self, device) -> None:
        self.device = torch.device(device)

    def enter(self, name: str, block: nn.Module) -> None:
        block.to(self.device)

    def leave(self, name: str, block: nn.Module, pruned: bool) -> None:
        block.to("cpu")
