"""Sparsity allocation: OWL's per-block ratios against a slow transcription of its formula, exact
means, profiles, and every bad setting refused before work."""
import json

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.core.allocation import outlier_ratio, owl_ratios, profile_plan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def slow_owl(outliers, s, lam):
    """OWL's repository, step by step: min-max to [0, 2 lambda], centre, density 1 - s + that."""
    lo, hi = min(outliers), max(outliers)
    x = [(v - lo) * (1 / (hi - lo) * lam * 2) for v in outliers]
    mean = sum(x) / len(x)
    return [1 - (v - mean + (1 - s)) for v in x]


def test_owl_ratios_follow_the_formula_and_keep_the_mean_exact():
    d = [3.1, 0.4, 7.9, 2.2, 5.0]
    for s, lam in ((0.5, 0.08), (0.7, 0.2), (0.3, 0.0)):
        got = owl_ratios(d, s, lam)
        assert got == pytest.approx(slow_owl(d, s, lam), abs=1e-12)
        assert sum(got) / len(got) == pytest.approx(s, abs=1e-12)
        assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)  # the spread is 2 lambda
        assert got[2] == min(got) and got[1] == max(got)  # the most outliers: pruned least
    weights = [1, 1, 4, 2, 2]
    got = owl_ratios(d, 0.6, 0.1, weights)
    assert sum(r * w for r, w in zip(got, weights)) / sum(weights) == pytest.approx(0.6, abs=1e-12)
    assert owl_ratios([2.0, 2.0], 0.5, 0.08) == [0.5, 0.5]  # nothing stands out: uniform


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([[1.0, 1.0, 10.0]]), torch.tensor([1.0, 2.0, 1.0])]
    flat = [1.0, 1.0, 10.0, 1.0, 2.0, 1.0]
    mean = sum(flat) / len(flat)
    assert outlier_ratio(scores, 2.0) == pytest.approx(100 * sum(v > 2 * mean for v in flat) / len(flat))
    assert outlier_ratio(scores, 100.0) == 0


def dense_block_scores(model, calib):
    """Independent: the whole dense model on every window, hooks on each block's linears, Wanda's
    |W| * sqrt(mean over windows of ||x_j||^2), per block."""
    from wanda_pl.core.layers import select_targets
    from wanda_pl.families.hf_causal import find_blocks

    prefix, blocks = find_blocks(model)
    sq, handles = {}, []
    targets = {}
    for i, block in enumerate(blocks):
        for name, mod in select_targets(block, f"{prefix}.{i}").items():
            targets[name] = (i, mod)
            handles.append(mod.register_forward_hook(
                lambda m, inp, out, n=name: sq.__setitem__(n, sq.get(n, 0) + inp[0].double().pow(2).reshape(-1, inp[0].shape[-1]).sum(0))))
    with torch.no_grad():
        for w in range(calib.shape[0]):
            model(input_ids=calib[w:w + 1])
    for h in handles:
        h.remove()
    per_block = {}
    for name, (i, mod) in targets.items():
        per_block.setdefault(i, []).append(mod.weight.double().abs() * (sq[name] / calib.shape[0]).sqrt())
    return per_block, targets


def test_owl_through_the_callback_matches_a_slow_dense_computation(tiny_dirs):
    from types import SimpleNamespace

    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    torch.manual_seed(0)
    calib = torch.randint(0, 256, (6, 24))
    per_block, targets = dense_block_scores(module.model, calib)
    outliers = [outlier_ratio(per_block[i], 5.0) for i in sorted(per_block)]
    want = slow_owl(outliers, 0.5, 0.08)
    assert abs(want[0] - want[1]) == pytest.approx(0.16)  # two blocks: s - lambda and s + lambda

    calibration = Calibration()
    calibration.inputs = calib
    trainer = SimpleNamespace(callbacks=[calibration], is_global_zero=True, datamodule=None, global_rank=0, world_size=1)
    pruning = Pruning("wanda", sparsity_ratio=0.5, allocation="owl")
    result = pruning.prune(trainer, module)
    for name, (i, mod) in targets.items():
        assert result.plan[name].ratio == pytest.approx(want[i], abs=1e-9), name
        mask = result.masks[name]
        assert (mask.sum(1) == int(mask.shape[1] * result.plan[name].ratio)).all()  # per row, exact
    d = pruning.describe()
    assert d["allocation"] == "owl" and d["owl_m"] == 5.0 and d["owl_lambda"] == 0.08


BAD = [
    (dict(sparsity_type="2:4", allocation="owl"), "N:M"),
    (dict(sparsity_ratio=0.5, allocation="owl", owl_lambda=0.5), "owl_lambda"),
    (dict(sparsity_ratio=0.9, allocation="owl", owl_lambda=0.1), "[0, 0.1)"),
    (dict(sparsity_ratio=0.5, allocation="owl", owl_lambda=-0.01), "owl_lambda"),
    (dict(allocation="owl", owl_m=0), "owl_m"),
    (dict(allocation="outlier"), "'outlier'"),
    (dict(allocation="profile"), "pruning.profile"),
    (dict(profile=[0.5, 0.5]), "pruning.profile"),
]


@pytest.mark.parametrize("kwargs,expected", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_allocations_are_refused_at_construction(kwargs, expected):
    with pytest.raises(ValueError) as err:
        Pruning(**kwargs)
    assert expected in str(err.value)


def test_profiles_per_block_and_per_layer(tiny_dirs):
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    blocks = {name: module.block_targets(name, b) for name, b in module.prunable_blocks(None)[0]}
    plan = profile_plan([0.4, 0.6], blocks, 0.5)
    assert {plan[n].ratio for n in blocks["model.layers.0"]} == {0.4} and {plan[n].ratio for n in blocks["model.layers.1"]} == {0.6}
    sizes = {n: m.weight.numel() for t in blocks.values() for n, m in t.items()}
    mlp = sum(v for n, v in sizes.items() if "mlp" in n) / sum(sizes.values())
    r = 0.5 / (mlp + (1 - mlp) * 0.5)  # mlp at r, attention at r / 2: weighted mean 0.5
    plan = profile_plan({"mlp": r, ".": r / 2}, blocks, 0.5)
    assert sum(plan[n].ratio * v for n, v in sizes.items()) / sum(sizes.values()) == pytest.approx(0.5)
    for profile, expected in (([0.5], "2 blocks"), ([0.4, 0.5], "averages 0.45"), ([1.0, 0.0], "[0, 1)"),
                              ({"nothing_here": 0.5, ".": 0.5}, "'nothing_here' matches no"),
                              ({"mlp": 0.5}, "no entry matches the layer")):
        with pytest.raises(ValueError, match=None) as err:
            profile_plan(profile, blocks, 0.5)
        assert expected in str(err.value), (profile, str(err.value))


def cli_args(model, text, out, *extra):
    return ["prune", "--model.name_or_path", str(model), "--data.calibration", str(text), "--data.evaluation", str(text),
            "--data.nsamples", "4", "--data.seqlen", "32", "--data.max_eval_windows", "2",
            "--trainer.enable_progress_bar", "false", "--output_dir", str(out), *extra]


def exact_counts(model_dir, planned, granularity):
    """(overall, per layer) sparsity the plan gives exactly: a row-wise method prunes int(cols * r)
    of every row, a layer-wise one int(numel * r) of the layer."""
    from test_cli import block_linears, load_saved

    layers = block_linears(load_saved(model_dir)[0])
    zeros = {}
    for name, ratio in planned.items():
        rows, cols = layers[name].weight.shape
        zeros[name] = rows * int(cols * ratio) if granularity == "row" else int(rows * cols * ratio)
    sizes = {n: layers[n].weight.numel() for n in planned}
    return sum(zeros.values()) / sum(sizes.values()), {n: zeros[n] / sizes[n] for n in planned}


def test_cli_owl_and_profile_reports(tiny_dirs, text_file, tmp_path):
    error, _ = run_cli(cli_args(tiny_dirs["llama"], text_file, tmp_path / "owl", "--pruning.allocation", "owl",
                                "--pruning.owl_lambda", "0.1"))
    assert error is None, error
    report = json.loads((tmp_path / "owl" / "report.json").read_text())
    assert report["allocation"] == "owl" and report["owl_lambda"] == 0.1 and report["owl_m"] == 5.0
    planned = sorted(set(report["layers_planned"].values()))
    assert len(planned) == 2 and planned[1] - planned[0] == pytest.approx(0.2)
    overall, per_layer = exact_counts(tiny_dirs["llama"], report["layers_planned"], "row")
    assert report["actual_sparsity"] == overall and report["layers"] == per_layer
    assert abs(overall - 0.5) < 0.01  # the plan's mean is the ratio; rounding each row's count loses a little
    error, _ = run_cli(cli_args(tiny_dirs["llama"], text_file, tmp_path / "prof", "--pruning.allocation", "profile",
                                "--pruning.profile", "[0.3, 0.7]", "--pruning.method", "magnitude"))
    assert error is None, error
    report = json.loads((tmp_path / "prof" / "report.json").read_text())
    assert report["profile"] == [0.3, 0.7]
    assert all(v == (0.3 if ".layers.0." in n else 0.7) for n, v in report["layers_planned"].items())
    assert report["granularity"] == "layer"
    assert (report["actual_sparsity"], report["layers"]) == exact_counts(tiny_dirs["llama"], report["layers_planned"], "layer")
    # per layer: mlp (2/3 of the tiny llama's prunable weights) at 0.6, the rest at 0.3: mean 0.5
    error, _ = run_cli(cli_args(tiny_dirs["llama"], text_file, tmp_path / "regex", "--pruning.allocation", "profile",
                                "--pruning.profile", '{"mlp": 0.6, ".": 0.3}'))
    assert error is None, error
    report = json.loads((tmp_path / "regex" / "report.json").read_text())
    assert all(v == (0.6 if ".mlp." in n else 0.3) for n, v in report["layers_planned"].items())
    overall, per_layer = exact_counts(tiny_dirs["llama"], report["layers_planned"], "row")
    assert report["actual_sparsity"] == overall and report["layers"] == per_layer
    assert abs(overall - 0.5) < 0.01
    # a profile that does not fit the model fails before any work, and writes nothing
    error, _ = run_cli(cli_args(tiny_dirs["llama"], text_file, tmp_path / "bad", "--pruning.allocation", "profile",
                                "--pruning.profile", "[0.5, 0.5, 0.5]"))
    assert error is not None and "3 entries" in error and not (tmp_path / "bad").exists()
