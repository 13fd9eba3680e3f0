"""RIA: its score against the formula on a hand-made matrix, its mask, its options, the CLI."""
import json
import math

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Pruning
from wanda_pl.core.sparsity import SparsitySpec, select_mask
from wanda_pl.core.stats import LayerStats
from wanda_pl.methods import get_method
from wanda_pl.methods.ria import RIAOptions, ria_score


def test_score_equals_the_formula_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    scaler_row = torch.tensor([4.0, 9.0])  # input norms 2 and 3
    # column sums of |W|: 4, 6; row sums: 3, 7
    want = torch.tensor([[(1 / 4 + 1 / 3) * math.sqrt(2), (2 / 6 + 2 / 3) * math.sqrt(3)],
                         [(3 / 4 + 3 / 7) * math.sqrt(2), (4 / 6 + 4 / 7) * math.sqrt(3)]])
    torch.testing.assert_close(ria_score(W, scaler_row, 0.5), want, rtol=1e-6, atol=0)
    want_a1 = torch.tensor([[(1 / 4 + 1 / 3) * 2, (2 / 6 + 2 / 3) * 3], [(3 / 4 + 3 / 7) * 2, (4 / 6 + 4 / 7) * 3]])
    torch.testing.assert_close(ria_score(W, scaler_row, 1.0), want_a1, rtol=1e-6, atol=0)
    torch.testing.assert_close(ria_score(W, scaler_row, 0.0), want_a1 / torch.tensor([2.0, 3.0]), rtol=1e-6, atol=0)
    dead = torch.tensor([[0.0, 1.0], [0.0, 2.0]])  # an all-zero input column scores 0, not NaN
    assert torch.isfinite(ria_score(dead, scaler_row)).all() and (ria_score(dead, scaler_row)[:, 0] == 0).all()


def test_method_selects_the_lowest_scores_over_the_layer_by_default():
    torch.manual_seed(0)
    W, X = torch.randn(8, 16), torch.randn(40, 16)
    st = LayerStats(16)
    st.update(X, 4)
    method = get_method("ria")
    assert method.default_granularity == "layer" and method.needs_activations
    mask, new_w = method(W, st, SparsitySpec(0.5))
    assert new_w is None and int(mask.sum()) == 64
    assert torch.equal(mask, select_mask(ria_score(W, st.scaler_row), SparsitySpec(0.5), "layer"))
    row = method(W, st, SparsitySpec(0.5), method.make_options(granularity="row", ria_alpha=1.0))[0]
    assert torch.equal(row, select_mask(ria_score(W, st.scaler_row, 1.0), SparsitySpec(0.5), "row"))
    nm = method(W, st, SparsitySpec.parse("2:4"))[0]
    assert (nm.reshape(8, 4, 4).sum(-1) == 2).all()


def test_a_negative_exponent_is_refused_for_every_method():
    with pytest.raises(ValueError, match="ria_alpha"):
        RIAOptions(ria_alpha=-0.5)
    for method in ("ria", "wanda"):
        with pytest.raises(ValueError, match="pruning.ria_alpha must be a number >= 0, got -1"):
            Pruning(method, ria_alpha=-1)


def test_cli_prunes_with_ria_and_records_its_options(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "ria"
    error, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                        "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
                        "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false",
                        "--pruning.method", "ria", "--pruning.ria_alpha", "0.25", "--output_dir", str(out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ria" and report["granularity"] == "layer"
    assert report["method_options"] == {"granularity": None, "ria_alpha": 0.25}
    assert report["actual_sparsity"] == 0.5 and set(report["layers"].values()) == {0.5}  # per layer, exact
