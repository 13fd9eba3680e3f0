"""What both LightningModules share, written once: the optimizer and the training loss record."""
from __future__ import annotations

import torch
import torch.nn as nn


def adamw(network: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the parameters that require a gradient; refuses an empty selection."""
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def trainable_params(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def record_train_loss(module, loss: torch.Tensor) -> torch.Tensor:
    """Log one step's loss and keep it for ``fit``'s report (first / last loss of the run)."""
    module.log("train_loss", loss, prog_bar=True)
    module.train_losses.append(loss.detach())
    return loss
