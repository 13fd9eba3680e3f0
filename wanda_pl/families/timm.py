"""timm image classifiers: where the blocks are, which layers are targets, and how pixels go in.

Pruning plan: the same block-sequential engine as the LLM path. The blocks are the repeated
blocks, in the order the network runs them (``blocks`` / ``stages`` / ``layers`` / ``layerN``,
nested ``nn.Sequential`` flattened: ViT/DeiT ``blocks.N``, EfficientNet ``blocks.S.N``, ConvNeXt
``stages.S``, ResNet ``layerK.N``); the stem runs once to capture the first block's input. With
``calibration.propagate: true`` each block calibrates on the activations of the already pruned
blocks before it; ``false`` gives the reference's setting exactly (every statistic from the
dense forward). The chain is checked on one image before use (each block called once, in order,
on the previous block's output, with no other argument); a model that is not such a chain, or
targets outside it (``head``, the stem), fall back to ONE block, the whole network, whose
statistics always come from the dense forward.

Default targets: the Linear layers inside the repeated blocks (ViT / DeiT ``blocks.N.attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``; ConvNeXt ``stages.S.blocks.N.mlp.fc1/fc2``, also when
timm builds them as 1x1 convs (``conv_mlp``); Swin ``layers.S.blocks.N...``), never the stem /
patch embedding, downsampling layers or the head.
With ``convs=True`` also the non-grouped Conv2d inside the blocks (EfficientNet / MobileNet
``conv_pw``, ``conv_pwl``; ResNet ``layerK.N.convM``), but not squeeze-excitation convs
(``se.conv_reduce`` / ``se.conv_expand``: tiny, and they gate whole channels) and never
depthwise/grouped convs. ``targets`` (regexes over names relative to the timm model) replace
the default selection and select every Linear or non-grouped Conv2d they match, head and stem
included (``convs`` is not needed for a conv named explicitly); ``ignore`` removes.
Which modules are prunable layers at all, and how a k x k conv becomes the linear map of its
unfolded (in * k * k) patches, is the layer kinds' business (:mod:`wanda_pl.core.layers`).

Pixels: images travel as uint8 (N, 3, H, W) and are normalized with the model's mean/std on
the way in (:func:`normalize`), exactly as ``ToTensor`` + ``Normalize`` would. Building, loading
and saving the network is :mod:`wanda_pl.families.timm_build`.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..core.hooks import BlockInput, capture_inputs
from ..core.layers import is_prunable, kind_of, select_targets
from ..core.types import Blocks, TargetsFn

log = logging.getLogger(__name__)


# A layer is "inside a block" when its name has one of these (timm naming).
BLOCK_PATTERNS = (r"(^|\.)blocks\.\d+\.", r"^layer\d+\.\d+\.")
# Containers of the repeated blocks, children of the timm model, run one after the other.
CHAIN_CONTAINERS = re.compile(r"^(blocks|stages|layers|layer\d+)$")
# Never pruned by default, even inside a block.
DEFAULT_EXCLUDE = (r"(^|\.)downsample(\.|$)", r"(^|\.)se\.", r"(^|\.)head(\.|$)")


# --- pixels ---
def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the model's input: ``(x / 255 - mean) / std`` (ToTensor + Normalize)."""
    if x.dtype != torch.uint8:
        return x  # already a normalized float tensor
    x = x.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


@dataclass
class ImageInput(BlockInput):
    """One calibration batch: uint8 pixels (normalized on the way in, with ``mean``/``std``) or a
    block's float input. Blocks always run in eval mode: BatchNorm statistics must not move and
    dropout must not fire during calibration, even when pruning starts a ``fit``."""

    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None

    def call(self, block: nn.Module, device) -> torch.Tensor:
        was_training = block.training
        block.eval()
        try:
            if self.mean is None:
                return super().call(block, device)
            return block(normalize(self.hidden.to(device), self.mean.to(device), self.std.to(device)))
        finally:
            block.train(was_training)


# --- targets ---
def _runtime_padding_classes() -> Tuple[type, ...]:
    # Imported here: timm is a heavy import that only the vision path needs.
    from timm.layers import Conv2dSame, conv2d_same

    export = getattr(conv2d_same, "Conv2dSameExport", None)  # the ONNX-friendly twin, same padding rule
    return (Conv2dSame,) + ((export,) if export is not None else ())


def pads_at_run_time(module: nn.Conv2d) -> bool:
    """TF-"same" padding computed from each input's size (timm's ``Conv2dSame``) or given as a string:
    the static ``padding`` attribute is not what the conv applies."""
    return isinstance(module, _runtime_padding_classes()) or isinstance(module.padding, str)


def _pointwise_mlp(name: str, module: nn.Conv2d) -> bool:
    """A 1x1 conv that is an MLP linear in disguise (timm ``Mlp(use_conv=True)`` / ``ConvMlp``, e.g.
    ConvNeXt with ``conv_mlp=True``): selected like the Linear ``mlp.fc1/fc2`` it stands for."""
    return re.search(r"(^|\.)mlp\.fc\d$", name) is not None and module.kernel_size == (1, 1) and module.groups == 1


def _is_conv(module: nn.Module) -> bool:
    kind = kind_of(module)
    return kind is not None and kind.conv


def _unfoldable(name: str, module: nn.Module, explicit: bool) -> bool:
    """A conv that pads at run time with a kernel larger than 1 cannot be unfolded from its
    static padding: skip it (warn if it was asked for by name)."""
    if not isinstance(module, nn.Conv2d) or not is_prunable(module, True):
        return True
    if pads_at_run_time(module) and module.kernel_size != (1, 1):
        (log.warning if explicit else log.debug)("skipping %s: %s with a %s kernel pads at run time",
                                                 name, type(module).__name__, module.kernel_size)
        return False
    return True


def select(block: nn.Module, name: str, targets: Optional[Sequence[str]], ignore: Sequence[str],
           convs: bool) -> Dict[str, nn.Module]:
    """The targets under ``block`` (named ``name`` in the model): the regexes ``targets`` (any
    prunable layer they match, convs included) or the block defaults above; minus ``ignore``."""
    ignore = list(ignore or ())
    if targets is not None:
        found = select_targets(block, name, targets, ignore, True)
    else:
        found = {
            n: m for n, m in select_targets(block, name, None, ignore, True).items()
            if any(re.search(p, n) for p in BLOCK_PATTERNS) and not any(re.search(p, n) for p in DEFAULT_EXCLUDE)
            and (convs or not _is_conv(m) or _pointwise_mlp(n, m))
        }
    return {n: m for n, m in found.items() if _unfoldable(n, m, targets is not None)}


# --- the chain of blocks ---
def block_chain(model: nn.Module) -> Blocks:
    """The repeated blocks in registration order: children of the ``CHAIN_CONTAINERS``
    ``nn.Sequential`` containers, nested ``nn.Sequential`` (EfficientNet stages) flattened."""

    def flatten(name: str, seq: nn.Sequential) -> Blocks:
        out: Blocks = []
        for n, child in seq.named_children():
            full = f"{name}.{n}"
            out += flatten(full, child) if isinstance(child, nn.Sequential) else [(full, child)]
        return out

    chain: Blocks = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and CHAIN_CONTAINERS.match(name):
            chain += flatten(name, child)
    return chain


@torch.no_grad()
def chain_problem(model: nn.Module, chain: Blocks, x: torch.Tensor) -> Optional[str]:
    """Why ``chain`` is not what ``model(x)`` runs (None when it is): every block called exactly
    once, in order, with one tensor argument that is the previous block's output."""
    calls: List[Tuple[int, Any, Any]] = []
    position = {id(block): i for i, (_, block) in enumerate(chain)}

    def pre(module, args, kwargs):
        calls.append((position[id(module)], args, kwargs))

    def post(module, _args, _kwargs, output):
        calls[-1] = calls[-1] + (output,)

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True) for _, block in chain]
    handles += [block.register_forward_hook(post, with_kwargs=True) for _, block in chain]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    order = [c[0] for c in calls]
    if order != list(range(len(chain))):
        return f"blocks called in the order {order[:8]}..., not once each in order"
    for i, (_, args, kwargs, *out) in enumerate(calls):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return f"{chain[i][0]} takes more than one tensor"
        if not out or not isinstance(out[0], torch.Tensor):
            return f"{chain[i][0]} does not return one tensor"
        if i and args[0] is not calls[i - 1][3]:
            return f"{chain[i][0]} does not take {chain[i - 1][0]}'s output"
    return None


def blocks(model: nn.Module, targets_of: TargetsFn, probe: Optional[torch.Tensor] = None) -> Blocks:
    """The block chain, or ``[("", model)]`` when it cannot be used: no chain, targets outside it,
    or (checked on ``probe``, one normalized image; without one the chain is trusted) a model
    that does not run it as a plain chain."""
    whole = [("", model)]
    chain = block_chain(model)
    if not chain:
        return whole
    inside = {n for name, block in chain for n in targets_of(name, block)}
    outside = sorted(set(targets_of("", model)) - inside)
    if outside:
        log.info("targets outside the block chain (%s): one block, statistics from the dense forward", outside[:3])
        return whole
    if probe is not None:
        problem = chain_problem(model, chain, probe)
        if problem:
            log.info("%s does not run its blocks as a plain chain (%s): one block, statistics from the dense "
                     "forward", type(model).__name__, problem)
            return whole
    return chain


def first_inputs(model: nn.Module, first: nn.Module, batches: Sequence[torch.Tensor], mean: torch.Tensor,
                 std: torch.Tensor, store_device="cpu") -> List[ImageInput]:
    """The inputs of block ``first`` for each uint8 batch: the pixels themselves when the block is
    the whole network, else captured with a hook while the stem runs (in eval mode)."""
    mean, std = mean.cpu(), std.cpu()
    pixels = [ImageInput(hidden=b.to(store_device), mean=mean, std=std) for b in batches]
    if first is model:
        return pixels
    device = next(model.parameters()).device
    captured = capture_inputs(model, first, pixels, lambda m, p: p.call(m, device), store_device)
    return [ImageInput(hidden=c.hidden, args=c.args, kwargs=c.kwargs, key=c.key) for c in captured]
