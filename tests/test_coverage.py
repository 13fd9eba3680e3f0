"""Coverage: no report states a sparsity the model does not have. A Mixture-of-Experts model keeps its
experts as fused 3-D parameters; before wanda_pl knew them, pruning only its attention succeeded and
printed "actual sparsity 0.5000" with every expert dense. A fused layout it does not know is refused."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import run_cli, saved_tiny, tiny_model
from wanda_pl.core.coverage import block_weights, check_coverage, coverage


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer):
    return saved_tiny(tmp_path_factory, tokenizer, ["mixtral"])["mixtral"]


def test_coverage_counts_every_block_weight_of_two_or_more_dimensions():
    block = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Conv2d(2, 3, 3))
    block.register_parameter("experts", nn.Parameter(torch.zeros(5, 2, 4)))
    blocks = [("b.0", block)]
    assert set(block_weights(blocks)) == {"b.0.0.weight", "b.0.2.weight", "b.0.experts"}  # no norm, no bias
    cov = coverage(blocks, {"b.0.0": block[0]})
    assert (cov.block_weights, cov.covered) == (32 + 54 + 40, 32)
    assert [n for n, _, _ in cov.left_out] == ["b.0.2.weight", "b.0.experts"]  # largest first
    with pytest.raises(ValueError, match=r"cover 25\.4% .*b\.0\.2\.weight \[3, 2, 3, 3\]"):
        check_coverage(cov, explicit_targets=False)
    check_coverage(cov, explicit_targets=True)  # meant: runs
    check_coverage(coverage(blocks, {"b.0.0": block[0], "b.0.2": block[2]}), explicit_targets=False)


def test_a_moe_model_whose_experts_no_method_prunes_is_refused_before_any_work(mixtral_dir, text_file, tmp_path,
                                                                              monkeypatch):
    from test_cli import base_args
    from wanda_pl.core import layers

    monkeypatch.setattr(layers, "is_fused_experts", lambda module: False)  # as before experts were known

    out = tmp_path / "out"
    error, _ = run_cli(base_args(mixtral_dir, text_file, out, "--pruning.method", "wanda"))
    assert error is not None and error.startswith("exit 2")  # a user error: one line, exit code 2
    for part in ("cover 14.", "mlp.experts.gate_up_proj [4, 192, 64]", "MixtralExperts keeps weights fused",
                 "--model.targets"):
        assert part in error, (part, error)
    assert not out.exists()


def test_explicit_targets_run_and_the_report_says_what_they_cover(mixtral_dir, text_file, tmp_path):
    from test_cli import base_args

    out = tmp_path / "out"
    error, _ = run_cli(base_args(mixtral_dir, text_file, out, "--pruning.method", "magnitude",
                                 "--model.targets", '["self_attn"]'))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    model = tiny_model("mixtral")
    attn = sum(p.numel() for n, p in model.named_parameters() if "self_attn" in n and p.dim() == 2)
    blockw = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2)
    assert report["target_coverage"] == round(attn / blockw, 6) < 0.5
    assert report["actual_sparsity"] == 0.5
    assert report["sparsity_block_weights"] == pytest.approx(0.5 * attn / blockw, abs=1e-6)  # experts stayed dense
    assert report["sparsity_model"] < report["sparsity_block_weights"]  # embeddings and head too


def test_a_dense_model_s_default_targets_cover_its_blocks(tiny_dirs, text_file, tmp_path):
    from test_cli import base_args

    out = tmp_path / "out"
    error, _ = run_cli(base_args(tiny_dirs["llama"], text_file, out, "--pruning.method", "magnitude"))
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["target_coverage"] == 1.0
    assert report["sparsity_block_weights"] == report["actual_sparsity"] == 0.5
    assert 0 < report["sparsity_model"] < 0.5


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_a_fused_expert_layout_we_do_not_prune_is_refused_by_name(family, tokenizer, tmp_path):
    """gpt-oss keeps its experts as (experts, in, out) with biases, Llama 4 scales the experts' inputs by the
    routing score: neither is the layout whose slices wanda_pl prunes, and the refusal names the class."""
    import transformers as tf

    from wanda_pl.methods.settings import PruningSettings
    from wanda_pl.modules.causal_lm import CausalLM

    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_local_experts=4, head_dim=16)
    config = tf.GptOssConfig(intermediate_size=48, num_experts_per_tok=2, **common) if family == "gpt_oss" else \
        tf.Llama4TextConfig(intermediate_size=48, intermediate_size_mlp=96, num_experts_per_tok=1, **common)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = CausalLM(str(tmp_path))
    expected = {"gpt_oss": "GptOssExperts", "llama4": "Llama4TextExperts"}[family]
    with pytest.raises(ValueError, match=f"{expected} keeps weights fused in a layout wanda_pl does not prune"):
        PruningSettings.from_args().check(module)
