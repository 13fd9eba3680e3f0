"""Hooks that cannot leak: statistics collection and first-block input capture."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import torch
import torch.nn as nn

from .stats import LayerStats, flatten_inputs, in_features


def move(obj: Any, device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move(o, device) for o in obj)
    if isinstance(obj, list):
        return [move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInput:
    """Everything one sample passes to a block: the hidden state (first positional
    argument) plus every other positional and keyword argument the model gave it
    (attention mask, position ids, ``position_embeddings``, cache position, ...)."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    key: Optional[str] = None  # set when the model passed the hidden state by keyword

    def call(self, block: nn.Module, device) -> torch.Tensor:
        hidden, args, kwargs = self.hidden.to(device), move(self.args, device), move(self.kwargs, device)
        out = block(*args, **kwargs, **{self.key: hidden}) if self.key else block(hidden, *args, **kwargs)
        # HF blocks return a tensor (transformers >= 4.54 Llama) or a tuple (GPT-2, OPT, older).
        return out[0] if isinstance(out, (tuple, list)) else out


class _Captured(Exception):
    pass


def capture_inputs(
    model: nn.Module, first: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any], store_device="cpu"
) -> List[BlockInput]:
    """Run ``forward(model, batch)`` for each batch, stopping at ``first`` and keeping its inputs.

    Stopping there means only the stem (embeddings) runs: the rest of the model is never
    computed for capture."""
    captured: List[BlockInput] = []

    def hook(_module, args, kwargs):
        if not args:  # some models pass the hidden state by keyword
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            kwargs = dict(kwargs)
            hidden = kwargs.pop(key)
            captured.append(BlockInput(hidden.detach().to(store_device), (), _detach(kwargs, store_device), key))
        else:
            captured.append(BlockInput(args[0].detach().to(store_device), _detach(args[1:], store_device),
                                       _detach(kwargs, store_device)))
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    forward(model, batch)
                except _Captured:
                    continue
                raise RuntimeError("the first block was never called during the forward pass; cannot capture its inputs")
    finally:
        handle.remove()
    return captured


def _detach(obj: Any, device=None) -> Any:
    """``obj`` with every tensor detached and (blocking) moved to ``device``: the other block
    arguments (attention masks, position embeddings) are kept on the store device like the
    hidden states, not left on the accelerator for every sample."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if device is None else obj.detach().to(device)
    if isinstance(obj, tuple):
        return tuple(_detach(o, device) for o in obj)
    if isinstance(obj, list):
        return [_detach(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v, device) for k, v in obj.items()}
    return obj


def _samples_in(x: torch.Tensor) -> int:
    # Inputs of Linear layers are (batch, ..., features) with a batch axis when 3-D or more;
    # a 2-D input is one sample of tokens. Conv inputs are (batch, C, H, W).
    return x.shape[0] if x.dim() >= 3 else 1


@contextmanager
def collect_stats(targets: Dict[str, nn.Module], with_hessian: bool = False) -> Iterator[Dict[str, LayerStats]]:
    """Forward hooks on ``targets`` that accumulate :class:`LayerStats`; removed on exit."""
    stats = {name: LayerStats(in_features(m), with_hessian) for name, m in targets.items()}
    handles = []
    for name, module in targets.items():
        def hook(mod, inputs, _output, _s=stats[name]):
            x = inputs[0]
            _s.update(flatten_inputs(mod, x), _samples_in(x))

        handles.append(module.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
