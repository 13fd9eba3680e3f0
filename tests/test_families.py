"""Every supported family prunes and validates end to end through the CLI (in-process)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # cli.py lives at the repository root
    sys.path.insert(0, str(ROOT))

from cli import main  # noqa: E402
from conftest import FAMILIES, MOE_FAMILIES  # noqa: E402
from test_cli import load_saved, simple_ppl  # noqa: E402

REQUIRED = ("model", "method", "sparsity_type", "sparsity_ratio", "use_variant", "nsamples", "seqlen", "seed",
            "calibration", "evaluation", "actual_sparsity", "layers", "metrics", "time_s",
            "peak_memory_mb", "versions", "devices", "torch_threads", "calibration_samples_per_rank", "offload")

# decoder-block linears of the tiny configs (2 blocks each)
N_LAYERS = {"llama": 14, "mistral": 14, "qwen2": 14, "gpt2": 8, "opt": 12, "gemma2": 14,
            # MoE (4 experts): attention + 2 slices per expert (+ DeepSeek's 5 latent-attention linears
            # and the shared expert's 3 linears in Qwen2-MoE and DeepSeek-V3)
            "mixtral": 24, "qwen2_moe": 30, "qwen3_moe": 24, "olmoe": 24, "deepseek_v3": 32}
LAYER_NAMES = {
    "llama": ("model.layers.", "q_proj"), "mistral": ("model.layers.", "q_proj"), "qwen2": ("model.layers.", "q_proj"),
    "gpt2": ("transformer.h.", "c_attn"), "opt": ("model.decoder.layers.", "q_proj"),
    "gemma2": ("model.layers.", "q_proj"),
    **{moe: ("model.layers.", "experts.gate_up_proj.3") for moe in MOE_FAMILIES},
}

CASES = [
    ("wanda", "unstructured"),
    ("wanda", "2:4"),
    ("magnitude", "unstructured"),
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_prune(model_dir, text_file, out, method, sparsity_type, *extra):
    args = [
        "prune",
        "--model.name_or_path", str(model_dir),
        "--data.calibration", str(text_file),
        "--data.evaluation", str(text_file),
        "--data.nsamples", "4", "--data.seqlen", "32", "--data.max_eval_windows", "4",
        "--pruning.method", method, "--pruning.sparsity_type", sparsity_type,
        "--trainer.enable_progress_bar", "false",
        "--output_dir", str(out), *extra,
    ]
    if sparsity_type == "unstructured":
        args += ["--pruning.sparsity_ratio", "0.5"]
    saved, sys.argv = sys.argv, [str(ROOT / "cli.py")]  # LightningCLI warns about pytest's argv next to args
    try:
        main(args=args)
    finally:
        sys.argv = saved


@pytest.mark.parametrize("method,sparsity_type", CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_end_to_end(tiny_dirs, text_file, tmp_path, family, method, sparsity_type):
    out = tmp_path / "out"
    run_prune(tiny_dirs[family], text_file, out, method, sparsity_type, "--save_model", "true")

    report = json.loads((out / "report.json").read_text())
    missing = [k for k in REQUIRED if k not in report]
    assert not missing, missing
    assert report["model"] == str(tiny_dirs[family])
    assert report["method"] == method
    assert report["sparsity_type"] == sparsity_type
    assert report["sparsity_ratio"] == 0.5
    assert report["use_variant"] is False
    assert (report["nsamples"], report["seqlen"], report["seed"]) == (4, 32, 0)
    assert report["calibration"] == report["evaluation"] == str(text_file)
    assert report["actual_sparsity"] == 0.5  # every layer's width is even (and a multiple of 4): exact

    layers = report["layers"]
    prefix, probe = LAYER_NAMES[family]
    assert len(layers) == N_LAYERS[family]
    assert all(name.startswith(prefix) for name in layers), list(layers)
    assert any(probe in name for name in layers)
    assert not any("lm_head" in n or "embed" in n or n.endswith("wte") for n in layers)
    for name, value in layers.items():
        assert value == 0.5, (name, value)

    # both perplexities, recomputed here from the logits of the dense folder and the saved pruned model
    text = text_file.read_text()
    pruned, tok = load_saved(out / "model")
    dense, _ = load_saved(tiny_dirs[family])
    ppl = report["metrics"]["ppl"]
    for key, model in (("dense", dense), ("pruned", pruned)):
        assert isinstance(ppl[key], float) and math.isfinite(ppl[key]), (key, ppl[key])
        assert ppl[key] == pytest.approx(simple_ppl(model, tok, text, 32, 4), rel=1e-5), key
    assert ppl["pruned"] != ppl["dense"]

    t = report["time_s"]
    assert set(("calibration", "prune", "eval", "total")) <= set(t)
    assert all(isinstance(t[k], (int, float)) and t[k] >= 0 for k in ("calibration", "prune", "eval", "total"))
    assert t["total"] >= t["prune"] and t["total"] >= t["eval"]
    if method == "magnitude":
        assert not (out / "calibration_ids.pt").exists()  # magnitude never draws calibration data
    else:
        assert (out / "calibration_ids.pt").is_file()
    assert report["peak_memory_mb"]["cpu_rss_mb"] > 0
    for pkg in ("torch", "lightning", "transformers", "python", "wanda_pl"):
        assert pkg in report["versions"]


def test_variant_end_to_end(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    run_prune(tiny_dirs["llama"], text_file, out, "wanda", "unstructured", "--pruning.use_variant", "true")
    report = json.loads((out / "report.json").read_text())
    assert report["use_variant"] is True
    # the variant matches each layer to within 0.001 (rows may differ)
    for name, value in report["layers"].items():
        assert abs(value - 0.5) <= 1e-3 + 1e-9, (name, value)
    assert math.isfinite(report["metrics"]["ppl"]["pruned"])


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_bias_correction_end_to_end(tiny_dirs, text_file, tmp_path, family):
    """Families whose linears have biases (GPT-2's Conv1D, OPT's Linear): through the CLI, every layer
    of the first block gives, on the recorded calibration windows, the dense mean output again."""
    import torch
    from transformers import AutoModelForCausalLM

    from wanda_pl.core.layers import flatten_inputs

    out = tmp_path / "out"
    run_prune(tiny_dirs[family], text_file, out, "magnitude", "unstructured", "--pruning.bias_correction", "true",
              "--save_model", "true")
    report = json.loads((out / "report.json").read_text())
    assert report["bias_correction"] is True and report["actual_sparsity"] == 0.5
    ids = torch.load(out / "calibration_ids.pt")  # magnitude calibrates when correcting
    dense = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    prefix = LAYER_NAMES[family][0] + "0."
    first = [n for n in report["layers"] if n.startswith(prefix)]
    assert len(first) == N_LAYERS[family] // 2
    seen = {}
    hooks = [dense.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.setdefault(n, []).append(flatten_inputs(m, i[0]))) for n in first]
    with torch.no_grad():
        for row in ids:
            dense(input_ids=row[None])
        for h in hooks:
            h.remove()
        for name in first:
            x = torch.cat(seen[name])
            d, p = dense.get_submodule(name), pruned.get_submodule(name)
            assert not torch.equal(d.bias, p.bias), name
            assert int((p.weight == 0).sum()) == p.weight.numel() // 2, name
            torch.testing.assert_close(p(x).mean(0), d(x).mean(0), rtol=1e-4, atol=1e-4, msg=name)
