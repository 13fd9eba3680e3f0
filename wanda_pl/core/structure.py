"""Structured pruning: whole MLP channels, whole attention heads (with grouped-query attention: whole
KV groups with their query heads) and whole blocks removed, so the model is physically smaller and
faster on every device with no special kernel.

Scores are per channel, summed over every weight the channel owns: its row in each producer (gate and
up; q, k and v) and its column in the consumer (down; o):

- ``magnitude``: ``sum |W|``;
- ``wanda`` (Wanda-sp, FLAP's baseline): ``sum |W_ij| * ||X_j||``, each weight weighed by the norm of
  the input it multiplies (producers: the block's hidden state; consumer: the channel itself);
- ``flap`` (FLAP's fluctuation): ``Var(channel input) * ||consumer column||^2``, how much the channel's
  contribution to the output moves over the calibration text (a steady one is replaced by a bias).

A head's score is the sum of its ``head_dim`` channels' (q rows, o columns), a KV group's the sum of
its query heads' plus its k and v rows. Depth: a block's influence is ``1 - cos(input, output)`` of
the hidden state, averaged over tokens (ShortGPT); the blocks that change it least go first.

Everything here is a pure function of tensors, or an edit of one module given the indices to keep.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .layers import kind_of, weight_matrix
from .layers.conv1d import CONV1D
from .layouts import GPT2, LAYOUTS, LLAMA, OPT, Layout, group_of, head_dim_of, kv_groups_of, layout_of, path, width_of  # noqa: F401  (the table's users import here)

SCORES = ("magnitude", "wanda", "flap")


def channel_scores(score: str, producers: List[torch.Tensor], consumer: torch.Tensor,
                   producer_sq: Optional[torch.Tensor] = None, consumer_sq: Optional[torch.Tensor] = None,
                   consumer_var: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One score per channel (a row of every producer, shaped (C, in); a column of the consumer,
    shaped (out, C)). ``*_sq``: the sum over calibration tokens of each input's square (the
    statistics' ``sq_sum``); ``consumer_var``: each channel's variance over tokens (``flap``)."""
    if score not in SCORES:
        raise ValueError(f"pruning structure score must be one of {', '.join(SCORES)}, got {score!r}")
    consumer = consumer.float()
    if score == "flap":
        if consumer_var is None:
            raise ValueError("the flap score needs the variance of each channel's input")
        return consumer_var.float() * consumer.pow(2).sum(0)
    if score == "wanda" and (producer_sq is None or consumer_sq is None):
        raise ValueError("the wanda score needs the input norms of the producers and of the consumer")
    out = torch.zeros(consumer.shape[1], dtype=torch.float32)
    for w in producers:
        w = w.float().abs()
        out += (w * producer_sq.float().sqrt()[None]).sum(1) if score == "wanda" else w.sum(1)
    c = consumer.abs()
    return out + ((c * consumer_sq.float().sqrt()[None]).sum(0) if score == "wanda" else c.sum(0))


def refit_columns(weight: torch.Tensor, xtx: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The consumer's weight on its kept input columns that best reproduces its full output on the
    calibration inputs (least squares, FLAP's and SliceGPT's compensation): with ``H = X^T X``,
    ``W' = W H[:, k] (H[k, k] + damp * mean(diag H[k, k]) I)^-1``; shaped (out, len(keep))."""
    h = xtx.double()
    hk = h[keep][:, keep]
    hk = hk + damp * hk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=h.dtype, device=h.device)
    rhs = weight.double() @ h[:, keep]
    return torch.linalg.solve(hk, rhs.T).T.to(weight.dtype)  # H[k, k] is symmetric


def with_bias(linear: nn.Module, add: Optional[torch.Tensor] = None) -> nn.Module:
    """``linear`` with a bias (zeros where it had none) plus ``add``: a new module when one is needed
    (a Linear: GPT-2's Conv1D always has one)."""
    if linear.bias is None:
        out = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                        dtype=linear.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(linear.weight)
            out.bias.zero_()
        linear = out
    if add is not None:
        with torch.no_grad():
            linear.bias.add_(add.to(linear.bias.device, linear.bias.dtype))
    return linear


def mean_shift(weight: torch.Tensor, mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """What the removed input channels added to the consumer's output on average (FLAP's bias)."""
    return weight.double()[:, removed] @ mean.double()[removed]


def group_scores(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Scores of consecutive groups of ``size`` channels (a head's ``head_dim``)."""
    if scores.numel() % size:
        raise ValueError(f"{scores.numel()} channels do not split into groups of {size}")
    return scores.reshape(-1, size).sum(1)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The indices of the ``keep`` highest scores, in their original order (ties: the lower index)."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()} channels: keep at least 1 and at most all")
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:keep]
    return order.sort().values


def expand(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Channel indices of the kept groups (each ``size`` consecutive channels)."""
    return (groups[:, None] * size + torch.arange(size)[None]).reshape(-1)


def sliced(layer: nn.Module, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> nn.Module:
    """A new layer of ``layer``'s kind (Linear or Conv1D) holding only ``rows`` (outputs) and ``cols``
    (inputs) of it, same dtype and device."""
    w = weight_matrix(layer).detach()  # (out, in) whichever way round the layer stores it
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    bias = layer.bias
    if bias is not None:
        bias = bias.detach() if rows is None else bias.detach()[rows.to(w.device)]
    if kind_of(layer) is CONV1D:  # stored (in, out): built on meta, so no throwaway init of the full shape
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            out = Conv1D(w.shape[0], w.shape[1])
        out.weight = nn.Parameter(w.t().clone(memory_format=torch.contiguous_format))
        out.bias = nn.Parameter(bias.clone())
        return out
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def keep_mlp_channels(mlp: nn.Module, keep: torch.Tensor, layout: Layout = LLAMA) -> None:
    """Cut ``mlp`` to the channels ``keep`` (rows of the producers, columns of the consumer), in place."""
    for name in layout.producers:
        setattr(mlp, name, sliced(getattr(mlp, name), rows=keep))
    setattr(mlp, layout.consumer, sliced(getattr(mlp, layout.consumer), cols=keep))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = int(keep.numel())


def keep_kv_groups(attention: nn.Module, groups: torch.Tensor, head_dim: int, group_size: int,
                   layout: Layout = LLAMA) -> None:
    """Cut ``attention`` to the KV groups ``groups`` with their query heads, in place: q rows and o
    columns of the kept query heads, k and v rows of the kept groups."""
    heads = expand(groups, group_size)  # query heads of the kept groups
    q_rows, kv_rows = expand(heads, head_dim), expand(groups, head_dim)
    setattr(attention, layout.q, sliced(getattr(attention, layout.q), rows=q_rows))
    setattr(attention, layout.k, sliced(getattr(attention, layout.k), rows=kv_rows))
    setattr(attention, layout.v, sliced(getattr(attention, layout.v), rows=kv_rows))
    setattr(attention, layout.o, sliced(getattr(attention, layout.o), cols=q_rows))


def influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """ShortGPT's block influence: ``1 - cos(input, output)`` per token, averaged (hidden states
    shaped (..., hidden))."""
    a, b = x_in.float().reshape(-1, x_in.shape[-1]), x_out.float().reshape(-1, x_out.shape[-1])
    return float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean())


def keep_blocks(layers: nn.ModuleList, keep: Sequence[int]) -> nn.ModuleList:
    """The blocks ``keep`` (indices into ``layers``, in order), renumbered for the KV cache."""
    kept = nn.ModuleList([layers[i] for i in keep])
    for new, block in enumerate(kept):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new
    return kept


def smaller_config(config, *, intermediate: Optional[int] = None, heads: Optional[int] = None,
                   kv_heads: Optional[int] = None, blocks: Optional[Sequence[int]] = None,
                   layout: Layout = LLAMA, biases: Sequence[str] = ()) -> None:
    """State the new widths and depth in ``config`` (in place) so stock ``from_pretrained`` builds the
    smaller model: one number per width, the head size written out (it was implied by the head count)."""
    if intermediate is not None:
        setattr(config, layout.width_field, int(intermediate))
    if heads is not None:
        config.head_dim = head_dim_of(config)
        config.num_attention_heads, config.num_key_value_heads = int(heads), int(kv_heads)
    for field in biases:  # mlp_bias / attention_bias: every projection of that part now has one
        setattr(config, field, True)
    if blocks is not None:
        for field in ("layer_types",):  # per-block lists some families keep
            values = getattr(config, field, None)
            if isinstance(values, list) and len(values) == config.num_hidden_layers:
                setattr(config, field, [values[i] for i in blocks])
        config.num_hidden_layers = len(blocks)


def rounded_width(channels: int, keep: int, multiple: int) -> int:
    """``keep`` of ``channels`` rounded to the nearest multiple of ``multiple`` (at least one multiple,
    at most the largest below ``channels``): a matrix dimension of 1017 runs slower than 1024 on most
    GEMM kernels, CPU and GPU alike. Refused where no rounding removes anything."""
    top = (channels - 1) // multiple * multiple  # the most a multiple can keep while removing something
    if top < multiple:
        raise ValueError(f"pruning.width_multiple {multiple} cannot cut {channels} MLP channels: no multiple of "
                         f"{multiple} lies below {channels}; use a smaller width_multiple")
    return min(max(multiple, int(round(keep / multiple)) * multiple), top)


MODES = ("none", "width", "depth")
# none; bias: the removed channels' mean contribution into the consumer's bias (FLAP); lsq: the consumer
# refitted on the kept channels by least squares (SliceGPT-like)
COMPENSATIONS = ("none", "bias", "lsq")


@dataclass(frozen=True)
class Structure:
    """What ``--pruning.structure`` removes: ``width`` (``mlp``: the share of every block's MLP channels,
    ``heads``: of its KV groups with their query heads, by ``score``), or ``depth`` (``blocks`` whole
    blocks, least influence first)."""

    mode: str = "none"
    score: str = "wanda"
    mlp: float = 0.0
    heads: float = 0.0
    blocks: int = 0
    compensate: str = "none"  # width: what the consumers (down, o) get for the removed channels (COMPENSATIONS)
    multiple: int = 1  # width: the kept MLP channels are a multiple of this (GEMM-friendly shapes)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"pruning.structure must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "width":
            if self.score not in SCORES:
                raise ValueError(f"pruning.structure width scores channels by pruning.method one of "
                                 f"{', '.join(SCORES)}, got {self.score!r}")
            for name, share in (("width_mlp", self.mlp), ("width_heads", self.heads)):
                if not (isinstance(share, (int, float)) and 0 <= share < 1):
                    raise ValueError(f"pruning.{name} must be in [0, 1), got {share!r}")
            if not self.mlp and not self.heads:
                raise ValueError("pruning.structure width with width_mlp and width_heads both 0 removes nothing")
        if self.compensate not in COMPENSATIONS:
            raise ValueError(f"pruning.compensate must be one of {', '.join(COMPENSATIONS)}, got {self.compensate!r}")
        if self.compensate != "none" and self.mode != "width":
            raise ValueError(f"pruning.compensate {self.compensate} makes up for removed channels: it needs "
                             f"pruning.structure width, got {self.mode!r}")
        if not (isinstance(self.multiple, int) and not isinstance(self.multiple, bool) and self.multiple >= 1):
            raise ValueError(f"pruning.width_multiple must be an integer >= 1, got {self.multiple!r}")
        if self.multiple != 1 and not (self.mode == "width" and self.mlp):
            raise ValueError(f"pruning.width_multiple {self.multiple} rounds the MLP channels a width pruning keeps: "
                             f"it needs pruning.structure width with width_mlp > 0, got structure {self.mode!r}")
        if self.mode == "depth" and not (isinstance(self.blocks, int) and self.blocks >= 1):
            raise ValueError(f"pruning.structure depth needs pruning.blocks_removed >= 1, got {self.blocks!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def widths(self, config) -> Dict[str, int]:
        """Channels and KV groups every block keeps; refused where nothing would be left."""
        layout = layout_of(config)
        channels = width_of(config, layout)
        if self.heads and layout.heads_refused:
            raise ValueError(f"pruning.width_heads {self.heads:g}: {layout.heads_refused}; set pruning.width_heads 0 "
                             "(MLP channels only; left unset, width_heads is sparsity_ratio)")
        groups = kv_groups_of(config)
        keep = {"channels": channels - round(self.mlp * channels), "kv_groups": groups - round(self.heads * groups)}
        if keep["channels"] < 1:
            raise ValueError(f"pruning.width_mlp {self.mlp:g} leaves no MLP channel of {channels} in a block")
        if self.multiple > 1 and self.mlp:
            keep["channels"] = rounded_width(channels, keep["channels"], self.multiple)
        if keep["kv_groups"] < 1:
            raise ValueError(f"pruning.width_heads {self.heads:g} leaves no attention head: the {groups} KV groups "
                             f"(each with {group_of(config)} query heads) go whole")
        return keep

    def describe(self) -> Dict[str, object]:
        if self.mode == "depth":
            return {"structure": "depth", "blocks_removed": self.blocks, "method": "influence"}
        return {"structure": "width", "width_mlp": self.mlp, "width_heads": self.heads, "method": self.score,
                "compensate": self.compensate,
                # only when set: the fingerprints of earlier width points stay what they were
                **({"width_multiple": self.multiple} if self.multiple != 1 else {})}

    def check(self, config) -> None:
        if self.mode == "width":
            self.widths(config)
            fields = layout_of(config).bias_fields  # (): the biases are there already, nothing to state
            for share, field, what in zip((self.mlp, self.heads), fields, ("MLP", "attention")):
                shared_off = fields[0] == fields[1] and getattr(config, field, None) is False  # would add every bias
                if self.compensate == "bias" and share and (getattr(config, field, None) is None or shared_off):
                    raise ValueError(f"pruning.compensate bias puts the removed channels' mean into a bias, and "
                                     f"{config.model_type}'s config cannot state an {what} bias ({field}): use lsq "
                                     f"or none")
        elif self.mode == "depth" and self.blocks >= config.num_hidden_layers:
            raise ValueError(f"pruning.blocks_removed {self.blocks} must be below the model's "
                             f"{config.num_hidden_layers} blocks")
        elif self.mode == "depth" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("pruning.structure depth renumbers the blocks it keeps, and this config scales each "
                             "block's attention by 1 / (its number + 1) (scale_attn_by_inverse_layer_idx): the saved "
                             "model would reload with other scales")
