"""Tiny models built in the test (well under 1M parameters) and offline tokenizers."""
from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

# Forced, not defaulted: a developer's HF_HUB_OFFLINE=0 must not let the tests reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
    "The rain in Spain stays mainly in the plain. Knowledge is power, and time is money. "
) * 8


def make_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on a few sentences, fully offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def tiny_config(family: str, vocab_size: int = 256):
    """A random config of ``family`` with hidden 64, 2 layers (< 1M parameters)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=256)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, **common)
    if family == "gemma2":  # alternating sliding-window / full attention: blocks get different masks
        return tf.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, sliding_window=8, **common)
    # Mixture-of-Experts: experts fused into 3-D gate_up_proj / down_proj parameters (transformers 5)
    moe = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, **common)
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=4, **moe)
    if family == "qwen2_moe":  # + a shared expert and its one-output gate
        return tf.Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                                 num_experts=4, **moe)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=4, head_dim=16, **moe)
    if family == "deepseek_v3":  # multi-head latent attention, a shared expert, sigmoid routing
        return tf.DeepseekV3Config(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=4,
                                   n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
                                   **moe)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=None,
                              **moe)
    raise ValueError(family)


DENSE_FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "opt", "gemma2")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")  # experts fused (transformers 5)
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES


def tiny_model(family: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    return model


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads; on a busy 2-core machine OpenMP spinning slows them a lot.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def single_thread():
    """One torch thread for this test only, as in worker processes (bitwise-comparable results);
    restored afterwards, so later tests (the mask fixture's) see the thread count they expect."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def saved_tiny(tmp_path_factory, tokenizer, families) -> dict:
    """family -> a saved Hugging Face folder (model + tokenizer)."""
    out = {}
    for family in families:
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family).save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[family] = d
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    return saved_tiny(tmp_path_factory, tokenizer, FAMILIES)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT * 4)
    return p


ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def plain_argv():
    """LightningCLI warns when it gets ``args`` while sys.argv holds pytest's own arguments."""
    saved, sys.argv = sys.argv, [str(ROOT / "cli.py")]
    try:
        yield
    finally:
        sys.argv = saved


def run_cli(args):
    """Run ``cli.py`` in-process; returns (error message or None, stdout)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from cli import main

    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), plain_argv():
            main(args=list(args))
    except SystemExit as e:  # jsonargparse reports some errors by exiting
        if e.code not in (0, None):
            return f"exit {e.code}: {err.getvalue()[-3000:]}", out.getvalue()
    except Exception as e:  # noqa: BLE001 - the caller asserts on the message
        return f"{type(e).__name__}: {e}", out.getvalue()
    return None, out.getvalue()
