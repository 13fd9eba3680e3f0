"""Hooks that cannot leak: statistics collection and first-block input capture."""
from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .layers import flatten_inputs, in_features
from .stats import LayerStats


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside (tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def move(obj: Any, device) -> Any:
    """``obj`` with every tensor inside moved to ``device``."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=True))


def _stored(obj: Any, device) -> Any:
    """The other block arguments (attention masks, position embeddings), detached and kept on the
    store device like the hidden states, not left on the accelerator for every sample."""
    return map_tensors(obj, lambda t: t.detach().to(device))


@dataclass
class BlockInput:
    """Everything one sample passes to a block: the hidden state (first positional
    argument) plus every other positional and keyword argument the model gave it
    (attention mask, position ids, ``position_embeddings``, cache position, ...).

    Most models give every block the same other arguments. Some do not (Gemma-2/3: sliding-window
    and full-attention layers get different masks and rotary embeddings): ``per_block`` then maps
    ``id(block)`` to that block's own ``(args, kwargs)``, shared between blocks that get the same."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: Dict[str, Any] = field(default_factory=dict)
    key: Optional[str] = None  # set when the model passed the hidden state by keyword
    per_block: Optional[Dict[int, Tuple[tuple, Dict[str, Any]]]] = None

    def call(self, block: nn.Module, device) -> torch.Tensor:
        args, kwargs = self.per_block.get(id(block), (self.args, self.kwargs)) if self.per_block else (self.args, self.kwargs)
        hidden, args, kwargs = self.hidden.to(device), move(args, device), move(kwargs, device)
        out = block(*args, **kwargs, **{self.key: hidden}) if self.key else block(hidden, *args, **kwargs)
        # HF blocks return a tensor (transformers >= 4.54 Llama) or a tuple (GPT-2, OPT, older).
        return out[0] if isinstance(out, (tuple, list)) else out


class _Captured(Exception):
    pass


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))


class _Restore:
    """A "handle" that takes the stand-in forwards off the blocks again."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks

    def remove(self) -> None:
        for b in self.blocks:
            b.__dict__.pop("forward", None)


def _split(args: tuple, kwargs: Dict[str, Any]) -> Tuple[torch.Tensor, tuple, Dict[str, Any], Optional[str]]:
    """(hidden state, other positional args, other kwargs, the hidden state's keyword or None)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs), None
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))  # passed by keyword
    kwargs = dict(kwargs)
    return kwargs.pop(key), (), kwargs, key


def same_arguments(a: Any, b: Any) -> bool:
    """Whether two blocks got the same non-hidden arguments (tensors by value, other objects by identity
    or equality): decides whether one captured copy can stand for both."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same_arguments(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_arguments(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))) and isinstance(b, (int, float, str, bool, type(None))):
        return a == b
    return False  # distinct objects of other kinds (e.g. two cache objects): assume they matter


@contextmanager
def removing(handles: List) -> Iterator[None]:
    """Remove every hook in ``handles`` when the block ends, however it ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def capture_inputs(
    model: nn.Module,
    blocks: Union[nn.Module, Sequence[nn.Module]],
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    store_device="cpu",
) -> List[BlockInput]:
    """Run ``forward(model, batch)`` for each batch, keeping the inputs of the first block.

    With the whole list of ``blocks``, the first batch runs through every block to learn which
    blocks get other arguments than the first one (:class:`BlockInput` ``per_block``); later
    batches stop at the first block of the last kind, so usually (all blocks alike) only the stem
    (embeddings) ever runs for capture."""
    blocks = [blocks] if isinstance(blocks, nn.Module) else list(blocks)
    position = {id(b): i for i, b in enumerate(blocks)}
    captured: List[BlockInput] = []
    kinds: List[Tuple[int, tuple, Dict[str, Any]]] = []  # (first block, args, kwargs) of each distinct kind
    kind_of: List[int] = []  # per block, its kind (learned on the first batch)
    state = {"stop": len(blocks) - 1, "first_batch": True}
    seen: Dict[int, Tuple[tuple, Dict[str, Any]]] = {}

    def hook(module, args, kwargs):
        i = position[id(module)]
        hidden, other, kw, key = _split(args, kwargs)
        if i == 0:
            captured.append(BlockInput(hidden.detach().to(store_device), key=key))
        if state["first_batch"]:
            for k, (_, a, b) in enumerate(kinds):
                if same_arguments(a, other) and same_arguments(b, kw):
                    kind_of.append(k)
                    break
            else:
                kind_of.append(len(kinds))
                kinds.append((i, other, kw))
        if not state["first_batch"] or i == 0:
            seen[i] = (_stored(other, store_device), _stored(kw, store_device))
        if i >= state["stop"]:
            raise _Captured

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    # A block's arguments come from the model's own loop, not from the block before: while
    # capturing, each block passes its hidden state on unchanged, so an offloaded block's weights
    # (on the meta device, or on the host) are never needed.
    for b in blocks:
        b.forward = _pass_through
    handles.append(_Restore(blocks))
    with removing(handles), torch.no_grad():
        for n, batch in enumerate(batches):
            seen.clear()
            try:
                forward(model, batch)
            except _Captured:
                pass
            else:
                if n or len(kind_of) != len(blocks):
                    raise RuntimeError("the first block was never called during the forward pass; "
                                       "cannot capture its inputs" if not kind_of else
                                       f"only {len(kind_of)} of the {len(blocks)} blocks were called in order")
            if state["first_batch"]:
                for first, other, kw in kinds:
                    seen[first] = (_stored(other, store_device), _stored(kw, store_device))
                state["first_batch"], state["stop"] = False, max(first for first, _, _ in kinds)
                kinds_first = [first for first, _, _ in kinds]
                kinds.clear()  # drop the references to the first batch's tensors
            inp = captured[-1]
            inp.args, inp.kwargs = seen[0]
            if len(kinds_first) > 1:
                inp.per_block = {id(b): seen[kinds_first[kind_of[i]]] for i, b in enumerate(blocks)}
    return captured


def _samples_in(x: torch.Tensor) -> int:
    # Inputs of Linear layers are (batch, ..., features) with a batch axis when 3-D or more;
    # a 2-D input is one sample of tokens. Conv inputs are (batch, C, H, W).
    return x.shape[0] if x.dim() >= 3 else 1


@contextmanager
def collect_stats(targets: Dict[str, nn.Module], with_hessian: bool = False,
                  share: bool = True) -> Iterator[Dict[str, LayerStats]]:
    """Forward hooks on ``targets`` that accumulate :class:`LayerStats`; removed on exit.

    ``share``: layers that read the very same input tensor (q/k/v; gate/up) share one
    :class:`LayerStats` (one ``X^T X``, one norm accumulator instead of one each): decided on the first
    call, where a later layer of the forward is handed the tensor an earlier one was (the same object,
    same kind of layer); the sums are those each would have made, bit for bit, made once."""
    stats = {name: LayerStats(in_features(m), with_hessian) for name, m in targets.items()}
    leader: Dict[str, str] = {}  # name -> the layer whose statistics it uses (itself, or an earlier reader)
    first: Dict[str, Tuple[Any, type]] = {}  # leaders' first input (a weak reference) and layer type

    def hook(mod, inputs, _output, name):
        x = inputs[0]
        who = leader.get(name)
        if who is None:
            who = next((n for n, (ref, kind) in first.items() if share and ref() is x and kind is type(mod)
                        and stats[n].in_features == stats[name].in_features), name)
            leader[name] = who
            if who == name:
                first[name] = (weakref.ref(x), type(mod))
            else:
                stats[name] = stats[who]
        if who == name:
            stats[name].update(flatten_inputs(mod, x), _samples_in(x))

    handles = [module.register_forward_hook(functools.partial(hook, name=name)) for name, module in targets.items()]
    with removing(handles):
        yield stats
