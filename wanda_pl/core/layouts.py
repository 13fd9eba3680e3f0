"""Where each family keeps what structured pruning cuts (the MLP's producers and consumer, the
attention's projections) and the config fields that state their widths: one small table."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Layout:
    """Where a family keeps what structured pruning cuts: the MLP's producers and consumer, the
    attention's projections, and the config fields that state their widths."""

    mlp: str = "mlp"  # "": the producers and consumer sit in the block itself
    producers: Sequence[str] = ("gate_proj", "up_proj")
    consumer: str = "down_proj"
    width_field: str = "intermediate_size"
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    # why the config cannot state fewer heads (None: it can); the config flag of each part's biases
    # ((): every projection has a bias whatever the config says, so a shift has nothing to state)
    heads_refused: Optional[str] = None
    bias_fields: Tuple[str, ...] = ("mlp_bias", "attention_bias")


# The LLaMA layout (LLaMA, Mistral, Qwen2, Gemma2 and most open decoders share it).
LLAMA = Layout()
# OPT: fc1 -> fc2 in the block itself, biases everywhere (enable_bias), the head size implied by
# hidden_size / num_attention_heads.
OPT = Layout(mlp="", producers=("fc1",), consumer="fc2", width_field="ffn_dim", o="out_proj",
             heads_refused="OPT derives the head size from hidden_size / num_attention_heads, so its config cannot "
                           "state fewer heads of the same size",
             bias_fields=("enable_bias", "enable_bias"))
# GPT-2: Conv1D projections (weights stored (in, out)), biases always, n_inner None meaning 4 * n_embd,
# q, k and v fused in c_attn with the head size implied by n_embd / n_head.
GPT2 = Layout(mlp="mlp", producers=("c_fc",), consumer="c_proj", width_field="n_inner", attention="attn",
              q="c_attn", k="c_attn", v="c_attn", o="c_proj",
              heads_refused="GPT-2 derives the head size from n_embd / n_head and fuses q, k and v in c_attn, so its "
                            "config cannot state fewer heads of the same size",
              bias_fields=())
LAYOUTS: Dict[str, Layout] = {t: LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")}
LAYOUTS["opt"] = OPT
LAYOUTS["gpt2"] = GPT2


def path(*parts: str) -> str:
    """Module names joined, the empty ones (a part that is the block itself) left out."""
    return ".".join(p for p in parts if p)


def width_of(config, layout: Layout) -> int:
    """Every block's MLP channels; a field left None (GPT-2's n_inner) means 4 * hidden_size, as the
    model builds it."""
    width = getattr(config, layout.width_field)
    return 4 * config.hidden_size if width is None else width


def head_dim_of(config) -> int:
    """The attention head size (stated, or implied by the head count)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_groups_of(config) -> int:
    """KV groups (key/value heads; as many as the query heads without grouped-query attention)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def group_of(config) -> int:
    """Query heads per KV group (grouped-query attention; 1 without it)."""
    return config.num_attention_heads // kv_groups_of(config)


def layout_of(config) -> Layout:
    model_type = getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise ValueError(f"structured pruning knows the layouts of {', '.join(sorted(LAYOUTS))}; this model is "
                         f"{model_type!r}, whose MLP and attention are laid out otherwise (fused projections or "
                         "experts)")
    return LAYOUTS[model_type]
