"""Structured pruning's pieces (#28): removing channels, heads and blocks is exactly zeroing them (or
skipping them), scores equal slow definitions, and the smaller model reloads with stock code."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from wanda_pl.core import structure as st

from test_cli import count_validations  # noqa: E402,F401  (the fixture)

LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "gemma2")


def _model(family, layers=2, seed=0):
    cfg = tiny_config(family)
    if layers != cfg.num_hidden_layers:
        d = {**cfg.to_dict(), "num_hidden_layers": layers}
        if d.pop("layer_types", None) is not None:  # recomputed for the new depth (gemma2)
            d["layer_types"] = None  # (mistral: a layer_types key, even null, reloads as "ministral")
        cfg = type(cfg)(**d)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _ids(n=2, t=12, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _slow_scores(score, producers, consumer, p_sq, c_sq, c_var):
    out = []
    for j in range(consumer.shape[1]):
        s = 0.0
        if score == "flap":
            out.append(float(c_var[j]) * sum(float(consumer[i, j]) ** 2 for i in range(consumer.shape[0])))
            continue
        for w in producers:
            for i in range(w.shape[1]):
                s += abs(float(w[j, i])) * (float(p_sq[i]) ** 0.5 if score == "wanda" else 1.0)
        for i in range(consumer.shape[0]):
            s += abs(float(consumer[i, j])) * (float(c_sq[j]) ** 0.5 if score == "wanda" else 1.0)
        out.append(s)
    return torch.tensor(out)


@pytest.mark.parametrize("score", st.SCORES)
def test_channel_scores_equal_their_slow_definitions(score):
    g = torch.Generator().manual_seed(0)
    producers = [torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)]
    consumer = torch.randn(4, 6, generator=g)
    p_sq, c_sq, c_var = torch.rand(5, generator=g) * 3, torch.rand(6, generator=g) * 3, torch.rand(6, generator=g)
    got = st.channel_scores(score, producers, consumer, p_sq, c_sq, c_var)
    torch.testing.assert_close(got, _slow_scores(score, producers, consumer, p_sq, c_sq, c_var), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refit_lowers_the_layer_error_and_keeping_everything_changes_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 12, generator=g) @ torch.randn(12, 12, generator=g)  # correlated channels
    w = torch.randn(5, 12, generator=g)
    xtx = x.T @ x
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    full = x @ w.T
    plain = x[:, keep] @ w[:, keep].T
    refit = x[:, keep] @ st.refit_columns(w, xtx, keep).T
    assert float((full - refit).pow(2).sum()) < 0.9 * float((full - plain).pow(2).sum())
    # the least-squares optimum: no other weight on the kept columns does better (the normal equations hold)
    exact = st.refit_columns(w, xtx, keep, damp=0.0)
    residual = (full - x[:, keep] @ exact.T)
    torch.testing.assert_close(residual.T @ x[:, keep], torch.zeros(5, 6), atol=1e-3, rtol=0)
    torch.testing.assert_close(st.refit_columns(w, xtx, torch.arange(12), damp=0.0), w, atol=1e-4, rtol=1e-4)


def test_keep_top_keeps_the_highest_in_order_and_refuses_nothing_left():
    scores = torch.tensor([3.0, 1.0, 5.0, 1.0, 4.0, 0.5])
    assert st.keep_top(scores, 3).tolist() == [0, 2, 4]
    assert st.keep_top(scores, 4).tolist() == [0, 1, 2, 4]  # a tie goes to the lower index
    assert st.group_scores(scores, 2).tolist() == [4.0, 6.0, 4.5]
    assert st.expand(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(ValueError, match="cannot keep 0 of 6"):
        st.keep_top(scores, 0)


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_removed_mlp_channels_equal_those_channels_zeroed(family):
    model, ids = _model(family), _ids()
    keep = torch.tensor([0, 3, 4, 9, 10, 11, 50, 64, 100, 127])
    zeroed = _model(family)
    for block in zeroed.model.layers:
        drop = torch.ones(block.mlp.down_proj.weight.shape[1], dtype=torch.bool)
        drop[keep] = False
        with torch.no_grad():
            block.mlp.down_proj.weight[:, drop] = 0
    for block in model.model.layers:
        st.keep_mlp_channels(block.mlp, keep)
        assert block.mlp.gate_proj.weight.shape == (10, 64) and block.mlp.down_proj.weight.shape == (64, 10)
    torch.testing.assert_close(_logits(model, ids), _logits(zeroed, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_removed_kv_groups_equal_their_heads_zeroed(family):
    model, ids = _model(family), _ids()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads per KV group (2)
    zeroed = _model(family)
    for block in zeroed.model.layers:  # group 0 removed: its query heads 0, 1 write nothing
        with torch.no_grad():
            block.self_attn.o_proj.weight[:, : group * head_dim] = 0
    for block in model.model.layers:
        st.keep_kv_groups(block.self_attn, torch.tensor([1]), head_dim, group)
        assert block.self_attn.k_proj.weight.shape[0] == head_dim
        assert block.self_attn.o_proj.weight.shape[1] == group * head_dim
    torch.testing.assert_close(_logits(model, ids), _logits(zeroed, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_removed_blocks_equal_those_blocks_skipped(family):
    model, ids = _model(family, layers=4), _ids()
    skipped = _model(family, layers=4)
    for i in (1, 2):
        skipped.model.layers[i].register_forward_hook(
            lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    model.model.layers = st.keep_blocks(model.model.layers, [0, 3])
    st.smaller_config(model.config, blocks=[0, 3])
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1] and model.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(model, ids), _logits(skipped, ids), rtol=1e-5, atol=1e-5)
    # the KV cache is indexed by the new numbers: generation with the cache equals a full forward
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    full = _logits(model, out[:, :-1])[0, 4:].argmax(-1)
    assert out[0, 5:].tolist() == full.tolist()


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_the_smaller_model_reloads_with_stock_from_pretrained(family, tmp_path):
    model, ids = _model(family, layers=3), _ids()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    keep = torch.arange(0, 128, 2)
    for block in model.model.layers:
        st.keep_mlp_channels(block.mlp, keep)
        st.keep_kv_groups(block.self_attn, torch.tensor([0]), head_dim, 2)
    model.model.layers = st.keep_blocks(model.model.layers, [0, 2])
    st.smaller_config(model.config, intermediate=64, heads=2, kv_heads=1, blocks=[0, 2])
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in model.parameters())
    assert back.config.intermediate_size == 64 and back.config.num_attention_heads == 2
    assert back.config.num_key_value_heads == 1 and back.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids))


def test_influence_is_zero_for_an_unchanged_state_and_grows_with_the_turn():
    x = torch.randn(3, 5, 8)
    assert st.influence(x, x) == pytest.approx(0.0, abs=1e-6)
    assert st.influence(x, 2 * x) == pytest.approx(0.0, abs=1e-6)  # scale is not change of direction
    assert st.influence(x, -x) == pytest.approx(2.0)
    assert 0 < st.influence(x, x + 0.1 * torch.randn(3, 5, 8)) < st.influence(x, x + torch.randn(3, 5, 8))


def test_bias_compensation_is_refused_where_the_config_cannot_state_the_bias():
    with pytest.raises(ValueError, match="mistral's config cannot state an MLP bias"):
        st.Structure("width", "wanda", 0.25, 0.0, compensate="bias").check(tiny_config("mistral"))
    st.Structure("width", "wanda", 0.25, 0.0, compensate="bias").check(tiny_config("llama"))  # LLaMA: mlp_bias


# Families whose head size is implied by the head count: (layout, the reason heads are refused, the block
# list, the MLP's consumer in a block, the config's width field, the dense width). GPT-2's n_inner is None
# (4 * n_embd) in the tiny config, and its c_fc / c_proj are Conv1D, their weights stored (in, out).
IMPLIED_HEADS = {
    "opt": (st.OPT, "OPT derives the head size", "model.decoder.layers", "fc2", "ffn_dim", 128),
    "gpt2": (st.GPT2, "GPT-2 derives the head size", "transformer.h", "mlp.c_proj", "n_inner", 256),
}


@pytest.mark.parametrize("family", IMPLIED_HEADS)
def test_opt_and_gpt2_take_mlp_width_and_depth_and_refuse_heads_with_the_reason(family):
    cfg = tiny_config(family)
    layout, reason, _, _, _, width = IMPLIED_HEADS[family]
    assert st.layout_of(cfg) is layout
    assert st.Structure("width", "wanda", 0.5, 0.0, compensate="bias").widths(cfg) == {"channels": width // 2,
                                                                                        "kv_groups": 4}
    st.Structure("width", "wanda", 0.5, 0.0, compensate="bias").check(cfg)  # the consumer has a bias to take the mean
    st.Structure("depth", blocks=1).check(cfg)
    with pytest.raises(ValueError, match=f"{reason}.*set pruning.width_heads 0"):
        st.Structure("width", "wanda", 0.5, 0.25).check(cfg)
    if family == "opt":  # OPT's biases follow one flag: off, the shift would need every layer given a bias
        cfg.enable_bias = False
        with pytest.raises(ValueError, match="cannot state an MLP bias"):
            st.Structure("width", "wanda", 0.5, 0.0, compensate="bias").check(cfg)
    else:  # scaled by their block numbers, renumbered blocks would reload with other scales
        cfg.scale_attn_by_inverse_layer_idx = True
        with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
            st.Structure("depth", blocks=1).check(cfg)


def _structured_cli(tiny_dirs, text_file, out, family, *extra):
    import json

    from conftest import run_cli
    from test_cli import base_args

    error, _ = run_cli(base_args(tiny_dirs[family], text_file, out, "--save_model", "true", *extra))
    assert error is None, error
    return json.loads((out / "report.json").read_text()), AutoModelForCausalLM.from_pretrained(out / "model").eval()


@pytest.mark.parametrize("compensate", ["none", "bias"])
@pytest.mark.parametrize("family", IMPLIED_HEADS)
def test_opt_and_gpt2_width_equals_the_channels_zeroed_and_reloads(tiny_dirs, text_file, tmp_path, family, compensate):
    """The MLP's producers and consumer (OPT: fc1 -> fc2 in the block itself; GPT-2: Conv1D c_fc -> c_proj):
    the removed channels give the outputs of the dense model with those consumer columns zeroed (``none``),
    and the folder reloads with stock code either way, its config stating the kept width."""
    from wanda_pl.core.layers import weight_matrix

    _, _, blocks, consumer, field, width = IMPLIED_HEADS[family]
    report, back = _structured_cli(tiny_dirs, text_file, tmp_path / "out", family, "--pruning.structure", "width",
                                   "--pruning.width_mlp", "0.5", "--pruning.width_heads", "0",
                                   "--pruning.compensate", compensate)
    assert getattr(back.config, field) == width // 2
    assert report["parameters"] == sum(p.numel() for p in back.parameters())
    zeroed, ids = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval(), _ids()
    for i, block in enumerate(zeroed.get_submodule(blocks)):
        kept = report["structure_result"]["kept"][f"{blocks}.{i}"]["channels"]
        drop = torch.ones(width, dtype=torch.bool)
        drop[kept] = False
        with torch.no_grad():
            weight_matrix(block.get_submodule(consumer))[:, drop] = 0  # (out, in): GPT-2's Conv1D stores (in, out)
    if compensate == "none":
        torch.testing.assert_close(_logits(back, ids), _logits(zeroed, ids), rtol=1e-4, atol=1e-4)
    else:  # the removed channels' mean went into the consumer's bias: the same weights, another bias
        bias = lambda m: m.get_submodule(f"{blocks}.0.{consumer}").bias  # noqa: E731
        assert not torch.equal(bias(back), bias(zeroed))


def test_the_report_table_names_gpt2_s_two_c_proj_apart():
    """GPT-2 calls attention's output and the MLP's consumer both ``c_proj``: one column each, named apart."""
    from wanda_pl.commands.report import sparsity_table

    layers = {f"transformer.h.{i}.{t}": 0.1 * i for i in range(2)
              for t in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    head = sparsity_table(layers).splitlines()[0].split()
    assert head == ["block", "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    llama = sparsity_table({f"model.layers.0.{t}": 0.5 for t in ("self_attn.q_proj", "mlp.down_proj")})
    assert llama.splitlines()[0].split() == ["block", "q_proj", "down_proj"]


@pytest.mark.parametrize("family", IMPLIED_HEADS)
def test_opt_and_gpt2_depth_equals_the_blocks_skipped_and_reloads(tiny_dirs, text_file, tmp_path, family):
    _, _, blocks, _, _, _ = IMPLIED_HEADS[family]
    report, back = _structured_cli(tiny_dirs, text_file, tmp_path / "out", family, "--pruning.structure", "depth",
                                   "--pruning.blocks_removed", "1")
    assert back.config.num_hidden_layers == len(back.get_submodule(blocks)) == 1
    assert report["parameters"] == sum(p.numel() for p in back.parameters())
    skipped, ids = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval(), _ids()
    (removed,) = report["structure_result"]["removed"]
    skipped.get_submodule(removed).register_forward_hook(
        lambda mod, args, kwargs, out: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
    torch.testing.assert_close(_logits(back, ids), _logits(skipped, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", IMPLIED_HEADS)
def test_opt_and_gpt2_refuse_width_heads_before_any_work(tiny_dirs, text_file, tmp_path, count_validations, family):
    from conftest import run_cli
    from test_cli import base_args

    error, _ = run_cli(base_args(tiny_dirs[family], text_file, tmp_path / "sub" / "out", "--pruning.structure", "width",
                                 "--pruning.width_mlp", "0.25", "--pruning.width_heads", "0.25"))
    assert error is not None and IMPLIED_HEADS[family][1] in error and "set pruning.width_heads 0" in error, error
    # left unset, width_heads is the ratio: the message says where the value came from
    error, _ = run_cli(base_args(tiny_dirs[family], text_file, tmp_path / "sub" / "out", "--pruning.structure", "width"))
    assert error is not None and "width_heads 0.5" in error and "left unset, width_heads is sparsity_ratio" in error
    assert count_validations == [] and not (tmp_path / "sub").exists()


def test_a_family_of_another_layout_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="'mixtral'.*laid out otherwise"):
        st.layout_of(tiny_config("mixtral"))
    assert st.layout_of(tiny_config("llama")) is st.LLAMA


# --------------------------------------------------------------------------- through the prune command
def _prune_cli(tiny_dirs, text_file, out, *extra):
    from conftest import run_cli
    from test_cli import base_args

    return run_cli(base_args(tiny_dirs["llama"], text_file, out, "--save_model", "true", *extra))


def test_width_prunes_to_a_smaller_model_that_stock_code_reloads(tiny_dirs, text_file, tmp_path):
    import json

    out = tmp_path / "out"
    error, _ = _prune_cli(tiny_dirs, text_file, out, "--pruning.structure", "width", "--pruning.sparsity_ratio", "0.5")
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    back = AutoModelForCausalLM.from_pretrained(out / "model")
    assert back.config.intermediate_size == 64 and back.config.num_key_value_heads == 1
    assert back.config.num_attention_heads == 2 and back.config.head_dim == 16
    assert report["parameters"] == sum(p.numel() for p in back.parameters()) < report["parameters_dense"]
    dense = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    assert report["parameters_dense"] == sum(p.numel() for p in dense.parameters())
    assert report["structure"] == "width" and report["method"] == "wanda" and report["actual_sparsity"] == 0.0
    kept = report["structure_result"]["kept"]["model.layers.0"]
    assert len(kept["channels"]) == 64 and len(kept["kv_groups"]) == 1
    # block 0's channels are Wanda-sp's top half, from the dense model on the run's own calibration windows
    ids = torch.load(out / "calibration_ids.pt")
    mlp, sums = dense.model.layers[0].mlp, {}
    hooks = [getattr(mlp, n).register_forward_hook(
        lambda m, a, o, n=n: sums.__setitem__(n, sums.get(n, 0) + a[0].reshape(-1, a[0].shape[-1]).double().pow(2).sum(0)))
        for n in ("gate_proj", "down_proj")]
    with torch.no_grad():
        for row in ids.split(1):
            dense(row)
    for h in hooks:
        h.remove()
    scores = _slow_scores("wanda", [mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()],
                          mlp.down_proj.weight.detach(), sums["gate_proj"], sums["down_proj"], None)
    assert kept["channels"] == sorted(torch.sort(scores, descending=True, stable=True).indices[:64].tolist())
    # the reloaded model computes what the run measured
    assert report["metrics"]["ppl"]["pruned"] > 1
    # the card says what was removed and the parameters before and after, not a weight sparsity
    from wanda_pl.commands.card import front_matter

    card = (out / "model" / "README.md").read_text()
    assert {"structured", "width"} <= set(front_matter(card)["tags"]) and "sparse" not in front_matter(card)["tags"]
    assert f"{report['parameters_dense']:,} -> {report['parameters']:,}" in card and "zeros in dense" not in card


@pytest.mark.parametrize("score", ["magnitude", "flap"])
def test_every_width_score_runs_and_chooses_its_own_channels(tiny_dirs, text_file, tmp_path, score):
    import json

    runs = {}
    for method in ("wanda", score):
        out = tmp_path / method
        error, _ = _prune_cli(tiny_dirs, text_file, out, "--pruning.structure", "width", "--pruning.method", method,
                              "--pruning.width_mlp", "0.25", "--pruning.width_heads", "0")
        assert error is None, error
        runs[method] = json.loads((out / "report.json").read_text())
    kept = {m: r["structure_result"]["kept"]["model.layers.0"] for m, r in runs.items()}
    assert runs[score]["method"] == score and len(kept[score]["channels"]) == 96 and "kv_groups" not in kept[score]
    assert kept[score]["channels"] != kept["wanda"]["channels"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / score / "model").config.num_attention_heads == 4


# family -> (what its width run removes, its first block): GPT-2's heads are refused, so MLP channels only
COMPENSATED = {"llama": (("--pruning.sparsity_ratio", "0.5"), "model.layers.0"),
               "gpt2": (("--pruning.width_mlp", "0.5", "--pruning.width_heads", "0"), "transformer.h.0")}


@pytest.mark.parametrize("compensate", ["lsq", "bias"])
@pytest.mark.parametrize("family", COMPENSATED)
def test_compensation_brings_the_model_closer_to_the_dense_one(tiny_dirs, text_file, tmp_path, family, compensate):
    """The width run with a compensation against the same run without (the default): the last hidden state
    on the calibration windows is closer to the dense model's; the saved folder (biases and the config's
    bias flags included) reloads with stock code to the model the run measured."""
    removes, first = COMPENSATED[family]
    outs = {c: _structured_cli(tiny_dirs, text_file, tmp_path / c, family, "--pruning.structure", "width", *removes,
                               "--pruning.compensate", c) for c in ("none", compensate)}
    ids = torch.load(tmp_path / "none" / "calibration_ids.pt")
    dense = AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
    with torch.no_grad():
        want = dense(ids, output_hidden_states=True).hidden_states[-1]
        err = {c: float((m(ids, output_hidden_states=True).hidden_states[-1] - want).pow(2).mean())
               for c, (_, m) in outs.items()}
    assert err[compensate] < err["none"], err
    report, model = outs[compensate]
    assert report["compensate"] == compensate and outs["none"][0]["compensate"] == "none"
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    if compensate == "bias" and family == "llama":
        assert model.config.mlp_bias and model.config.attention_bias
        assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
        assert float(model.model.layers[0].mlp.gate_proj.bias.abs().sum()) == 0.0
    if compensate == "bias" and family == "gpt2":  # the shift went into c_proj's own bias; c_fc's kept as they were
        mlp, dense_mlp = model.transformer.h[0].mlp, dense.transformer.h[0].mlp
        kept = report["structure_result"]["kept"][first]["channels"]
        torch.testing.assert_close(mlp.c_fc.bias, dense_mlp.c_fc.bias[kept])
        assert not torch.equal(mlp.c_proj.bias, dense_mlp.c_proj.bias)
    # block 0 keeps the same channels either way (compensation changes the kept weights, not the choice;
    # later blocks see other inputs, so they may choose others)
    kept = {c: r["structure_result"]["kept"][first] for c, (r, _) in outs.items()}
    assert kept["none"] == kept[compensate]


def test_the_bias_compensation_is_the_removed_channels_mean_contribution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) + torch.tensor([0.0, 3.0, 0.0, -2.0, 0.0, 1.0])
    w = torch.randn(4, 6, generator=g)
    keep, removed = torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])
    shift = st.mean_shift(w, x.mean(0), removed)
    torch.testing.assert_close(shift.float(), (x[:, removed] @ w[:, removed].T).mean(0), rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(6, 4, bias=False)
    lin.weight.data.copy_(w)
    cut = st.with_bias(st.sliced(lin, cols=keep), shift)
    # on average over these inputs the cut layer gives what the whole layer gave
    torch.testing.assert_close(cut(x[:, keep]).mean(0), lin(x).mean(0), rtol=1e-4, atol=1e-4)


def test_fit_refuses_to_reshape_the_model_it_trains(tiny_dirs):
    from types import SimpleNamespace

    from wanda_pl.callbacks import Pruning
    from wanda_pl.modules.causal_lm import CausalLM

    pruning = Pruning(structure="depth", blocks_removed=1, enabled=True)
    trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    with pytest.raises(ValueError, match="prune with --save_model true, then fit the saved, smaller model"):
        pruning.obtain_masks(trainer, CausalLM(str(tiny_dirs["llama"])))


def test_rounded_width_is_the_nearest_multiple_that_removes_something():
    for channels in range(2, 40):
        for multiple in range(1, channels):
            for keep in range(1, channels):
                got = st.rounded_width(channels, keep, multiple)
                allowed = [m for m in range(multiple, channels, multiple)]  # multiples that remove something
                best = min(abs(m - keep) for m in allowed)
                assert got in allowed and abs(got - keep) == best, (channels, keep, multiple, got)


def test_width_multiple_rounds_the_kept_channels_and_keeps_the_best_scored(tiny_dirs, text_file, tmp_path):
    """0.3 of 128 channels keeps 90, rounded to 96 (a multiple of 32): the same 96 channels as
    removing exactly a quarter, in every block, and the saved config says 96."""
    import json

    runs = {}
    for name, extra in (("rounded", ("--pruning.width_mlp", "0.3", "--pruning.width_multiple", "32")),
                        ("quarter", ("--pruning.width_mlp", "0.25"))):
        error, _ = _prune_cli(tiny_dirs, text_file, tmp_path / name, "--pruning.structure", "width",
                              "--pruning.width_heads", "0", *extra)
        assert error is None, error
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())
    kept = {n: r["structure_result"]["kept"] for n, r in runs.items()}
    assert all(len(k["channels"]) == 96 for k in kept["rounded"].values()) and kept["rounded"] == kept["quarter"]
    assert runs["rounded"]["width_multiple"] == 32 and "width_multiple" not in runs["quarter"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "rounded" / "model").config.intermediate_size == 96
    assert "multiple of 32" in (tmp_path / "rounded" / "model" / "README.md").read_text()


def test_depth_removes_the_least_influential_blocks(tiny_dirs, text_file, tmp_path):
    import json

    out = tmp_path / "out"
    error, _ = _prune_cli(tiny_dirs, text_file, out, "--pruning.structure", "depth", "--pruning.blocks_removed", "1")
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    influence = report["structure_result"]["influence"]
    assert report["structure_result"]["removed"] == [min(influence, key=influence.get)]
    back = AutoModelForCausalLM.from_pretrained(out / "model")
    assert back.config.num_hidden_layers == 1 and len(back.model.layers) == 1
    assert report["parameters"] == sum(p.numel() for p in back.parameters())


BAD = [
    (["--pruning.structure", "width", "--pruning.width_mlp", "0.999"], "leaves no MLP channel of 128"),
    (["--pruning.structure", "width", "--pruning.width_heads", "0.9"], "leaves no attention head"),
    (["--pruning.structure", "depth", "--pruning.blocks_removed", "2"], "blocks_removed 2 must be below the model's 2"),
    (["--pruning.structure", "width", "--pruning.sparsity_type", "2:4"], "sparsity_type 2:4"),
    (["--pruning.structure", "width", "--pruning.update", "admm"], "pruning.update='admm'"),
    (["--pruning.structure", "width", "--pruning.method", "sparsegpt"], "magnitude, wanda, flap"),
    (["--pruning.structure", "sideways"], "pruning.structure must be one of none, width, depth"),
    (["--pruning.structure", "depth", "--pruning.blocks_removed", "1", "--model.offload", "disk"],
     "depth renumbers the blocks it keeps"),
    (["--pruning.compensate", "lsq"], "pruning.compensate lsq makes up for removed channels"),
    (["--pruning.structure", "width", "--pruning.compensate", "mean"], "pruning.compensate must be one of none, bias, lsq"),
    (["--pruning.structure", "width", "--pruning.width_multiple", "0"], "width_multiple must be an integer >= 1"),
    (["--pruning.width_multiple", "64"], "width_multiple 64 rounds the MLP channels a width pruning keeps"),
    (["--pruning.structure", "width", "--pruning.width_mlp", "0.3", "--pruning.width_multiple", "128"],
     "width_multiple 128 cannot cut 128 MLP channels"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_structure_settings_fail_before_any_work(tiny_dirs, text_file, tmp_path, count_validations, extra, message):
    error, _ = _prune_cli(tiny_dirs, text_file, tmp_path / "sub" / "out", *extra)
    assert error is not None and message in error, error
    assert count_validations == [] and not (tmp_path / "sub").exists()


# --------------------------------------------------------------------------- through the sweep command
def test_a_sweep_over_structures_starts_every_point_from_the_dense_model(tiny_dirs, text_file, tmp_path):
    """Width and depth points first and a weight-sparsity point last: each must equal its own prune
    run, so the last one saw the dense model again, not the cut one before it."""
    import json

    from conftest import run_cli
    from test_sweep import args as sweep_args

    out = tmp_path / "sweep"
    error, _ = run_cli(sweep_args("sweep", tiny_dirs["llama"], text_file, out, "--sweep.structures", "[width,depth,none]",
                                  "--sweep.methods", "[wanda,sparsegpt]", "--sweep.ratios", "[0.5]",
                                  "--sweep.blocks", "[1]"))
    assert error is None, error
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["point"] for r in rows] == ["wanda-width-0.5", "depth-1", "wanda-unstructured-0.5",
                                          "sparsegpt-unstructured-0.5"]  # sparsegpt scores no channels
    alone = {"wanda-width-0.5": ["--pruning.structure", "width", "--pruning.sparsity_ratio", "0.5"],
             "depth-1": ["--pruning.structure", "depth", "--pruning.blocks_removed", "1"],
             "wanda-unstructured-0.5": ["--pruning.sparsity_ratio", "0.5"]}
    for row in rows[:3]:
        error, _ = run_cli(sweep_args("prune", tiny_dirs["llama"], text_file, tmp_path / row["point"], *alone[row["point"]]))
        assert error is None, error
        report = json.loads((tmp_path / row["point"] / "report.json").read_text())
        assert row["ppl"] == pytest.approx(report["metrics"]["ppl"]["pruned"], rel=1e-5), row["point"]
        assert row.get("parameters") == report.get("parameters"), row["point"]
    width, depth = rows[0], rows[1]
    assert width["structure"] == "width" and 0 < width["parameters_removed"] < 0.5
    assert depth["structure"] == "depth" and depth["blocks_removed"] == 1 and depth["parameters"] < depth["parameters_dense"]
    assert "parameters_removed" in (out / "sweep.csv").read_text().splitlines()[0]


def test_a_structured_sweep_leaves_the_module_dense(tiny_dirs, text_file, tmp_path):
    import lightning as L

    from test_sweep import NSAMPLES, SEQLEN, WINDOWS
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.commands.sweep import Grid, sweep
    from wanda_pl.data.text_module import TextDataModule
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    dm = TextDataModule(str(text_file), str(text_file), NSAMPLES, SEQLEN, 0, WINDOWS)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Calibration(), Pruning()])
    summary = sweep(trainer, module, dm, Grid(["wanda"], [0.5], structures=["width"]), str(tmp_path / "sweep"))
    assert summary["rows"][0]["parameters_removed"] > 0
    assert module.model.config.intermediate_size == 128 and len(module.model.model.layers) == 2
    after = module.model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("compensate", ["none", "bias"])
def test_width_offloaded_to_disk_equals_the_resident_run(tiny_dirs, text_file, tmp_path, compensate):
    """Each block read from the checkpoint for its turn, cut, written as its shard in the cut shapes:
    the saved folder and the numbers equal the resident run's."""
    import json

    from test_resume import weights

    runs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        error, _ = _prune_cli(tiny_dirs, text_file, out, "--pruning.structure", "width", "--pruning.sparsity_ratio",
                              "0.5", "--pruning.compensate", compensate, "--model.offload", offload)
        assert error is None, error
        runs[offload] = json.loads((out / "report.json").read_text())
    assert runs["disk"]["offload"] == "disk" and runs["none"]["offload"] == "none"
    assert runs["disk"]["structure_result"] == runs["none"]["structure_result"]
    assert runs["disk"]["parameters"] == runs["none"]["parameters"]
    assert runs["disk"]["metrics"]["ppl"]["pruned"] == pytest.approx(runs["none"]["metrics"]["ppl"]["pruned"], rel=1e-5)
    resident, disk = weights(tmp_path / "none" / "model"), weights(tmp_path / "disk" / "model")
    assert set(resident) == set(disk)
    for key in resident:
        torch.testing.assert_close(disk[key], resident[key], rtol=1e-6, atol=1e-7, msg=key)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "disk" / "model")
    assert back.config.intermediate_size == 64 and back.config.num_key_value_heads == 1
    from wanda_pl.training.masks import load_masks  # disk's mask shards (one a block) read as one set

    masks = {offload: load_masks(tmp_path / offload) for offload in runs}
    assert list(masks["disk"]) == list(masks["none"]) and not any(m.any() for m in masks["disk"].values())
    assert all(masks["disk"][k].shape == masks["none"][k].shape for k in masks["none"])
