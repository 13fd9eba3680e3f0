"""DSnoT mask refinement (--pruning.refine dsnot): against a row-by-row transcription of its rules."""
import json
import re

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Pruning
from wanda_pl.core.sparsity import SparsitySpec, nm_mask, row_mask
from wanda_pl.core.stats import LayerStats
from wanda_pl.methods.dsnot import DSnoTOptions, dsnot_refine, expected_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer(out=24, inn=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inn, generator=g) * torch.linspace(0.3, 2.0, inn) + torch.randn(inn, generator=g)
    stats = LayerStats(inn)
    stats.update(X, 4)
    return torch.randn(out, inn, generator=g), stats


def slow_dsnot(W, stats, spec, mask, cycles=50, threshold=0.1, power=1.0):
    """One row at a time, with Python lists: grow the pruned weight with the largest (e > 0) or
    smallest (e < 0) W E[X] / Var^p, prune the lowest-Wanda kept weight of the opposite sign
    (N:M: the lowest-Wanda kept weight of the grown one's group); stop when |e| <= threshold, when
    the swap would flip e's sign or not shrink |e|, when a list runs out, or after ``cycles``."""
    mean = stats.mean
    var = (stats.sq_sum / stats.tokens - mean * mean).clamp_min(1e-12)
    wanda = W.abs() * torch.sqrt(stats.scaler_row)
    metric = W * mean
    out = mask.clone()
    for i in range(W.shape[0]):
        e = expected_error(W, mean, mask)[i]
        sign0 = torch.sign(e)
        if not e.abs() > threshold:
            continue
        score = metric[i] / var.pow(power)
        pruned = [j for j in range(W.shape[1]) if mask[i, j]]
        up = sorted(pruned, key=lambda j: (-float(score[j]), j))
        down = sorted(pruned, key=lambda j: (float(score[j]), j))
        kept = [j for j in range(W.shape[1]) if not mask[i, j]]
        neg = sorted([j for j in kept if metric[i, j] < 0], key=lambda j: (float(wanda[i, j]), j))
        pos = sorted([j for j in kept if metric[i, j] >= 0], key=lambda j: (float(wanda[i, j]), j))
        free = set(kept)
        for _ in range(cycles):
            grow_list, cut_list = (up, neg) if e > 0 else (down, pos)
            if not grow_list:
                break
            grow = grow_list.pop(0)
            if spec.structured:
                start = grow - grow % spec.m
                group = [j for j in range(start, start + spec.m) if j in free]
                if not group:
                    break
                cut = min(group, key=lambda j: (float(wanda[i, j]), j))
            else:
                if not cut_list:
                    break
                cut = cut_list.pop(0)
            after = e + metric[i, cut] - metric[i, grow]
            if torch.sign(after) != sign0 or not after.abs() < e.abs():
                break
            out[i, grow], out[i, cut] = False, True
            free.discard(cut)
            e = after
            if not e.abs() > threshold:
                break
    return out


@pytest.mark.parametrize("sparsity_type, ratio, threshold", [("unstructured", 0.5, 0.1), ("unstructured", 0.7, 0.0),
                                                             ("2:4", None, 0.1), ("4:8", None, 0.0)])
def test_dsnot_equals_the_slow_rules_keeps_counts_and_never_grows_its_objective(sparsity_type, ratio, threshold):
    W, stats = layer()
    spec = SparsitySpec.parse(sparsity_type, ratio)
    score = W.abs() * torch.sqrt(stats.scaler_row)
    start = nm_mask(score, spec.n, spec.m) if spec.structured else row_mask(score, spec.ratio)
    options = DSnoTOptions(dsnot_threshold=threshold)
    refined = dsnot_refine(W, stats, spec, start, options)
    assert torch.equal(refined, slow_dsnot(W, stats, spec, start, threshold=threshold))
    assert torch.equal(refined.sum(1), start.sum(1))
    if spec.structured:
        assert bool((refined.reshape(W.shape[0], -1, spec.m).sum(-1) == spec.n).all())
    before, after = expected_error(W, stats.mean, start).abs(), expected_error(W, stats.mean, refined).abs()
    assert bool((after <= before).all())
    assert bool((after < before).sum() >= 3)  # it does refine rows, not only keep the mask
    assert not torch.equal(refined, start)


def test_zero_cycles_is_the_initial_mask():
    W, stats = layer(seed=3)
    start = row_mask(W.abs(), 0.5)
    assert torch.equal(dsnot_refine(W, stats, SparsitySpec(0.5), start, DSnoTOptions(dsnot_cycles=0)), start)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(refine="dsnot", dsnot_cycles=-1), "pruning.dsnot_cycles must be an integer >= 0"),
    (dict(dsnot_threshold=-0.5), "pruning.dsnot_threshold must be >= 0"),  # checked for every method
    (dict(refine="dsnot", method="sparsegpt"), "sparsegpt updates its weights itself"),
    (dict(refine="dsnot", bias_correction=True), "bias_correction restores exactly"),
    (dict(refine="grow"), "pruning.refine must be one of ('none', 'dsnot', 'swaps')"),
])
def test_bad_dsnot_settings_are_refused(kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        Pruning(**kwargs)


def test_cli_refines_and_reports_it(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "run"
    err, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                      "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
                      "--data.max_eval_windows", "4", "--trainer.enable_progress_bar", "false", "--pruning.refine",
                      "dsnot", "--pruning.update", "admm", "--pruning.sparsity_type", "2:4", "--output_dir", str(out)])
    assert err is None, err
    report = json.loads((out / "report.json").read_text())
    assert (report["method"], report["refine"], report["update"]) == ("wanda", "dsnot", "admm")
    assert report["method_options"]["dsnot_cycles"] == 50 and report["method_options"]["admm_iterations"] == 20
    assert report["actual_sparsity"] == 0.5
