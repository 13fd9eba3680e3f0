"""ADMM reconstruction (--pruning.update admm) and the gradual ADMM method, against slow references."""
import json

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Pruning
from wanda_pl.core.sparsity import SparsitySpec, row_mask
from wanda_pl.core.stats import LayerStats
from wanda_pl.methods import get_method, get_step
from wanda_pl.methods.admm import ADMMOptions, admm, admm_update
from wanda_pl.methods.compose import compose
from wanda_pl.methods.sparsegpt import sparsegpt_prune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layer(out=48, inn=96, tokens=768, seed=0):
    """A weight and well-conditioned inputs with columns of very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inn) + 0.3 * torch.randn(inn, inn, generator=g) / inn ** 0.5
    X = (torch.randn(tokens, inn, generator=g) @ mix) * torch.linspace(0.2, 3.0, inn)
    return torch.randn(out, inn, generator=g), X


def rel_error(W, W2, X):
    return float(((X @ (W - W2).T) ** 2).sum() / ((X @ W.T) ** 2).sum())


def exact_on_support(W, xtx, mask, percdamp):
    """Row by row, the minimiser of (w - v)^T G (w - v) with v zero on the row's mask, G the damped
    scaled second moment ADMM works with: v_S = w_S + G_SS^-1 G_SP w_P (written out, one solve per row)."""
    d = xtx.diagonal().sqrt() + 1e-8
    G = xtx / d / d.unsqueeze(1)
    G = G + percdamp * G.diagonal().mean() * torch.eye(len(d))
    Ws = (W * d).double()
    G = G.double()
    out = torch.zeros_like(Ws)
    for i in range(W.shape[0]):
        keep, drop = ~mask[i], mask[i]
        out[i, keep] = Ws[i, keep] + torch.linalg.solve(G[keep][:, keep], G[keep][:, drop] @ Ws[i, drop])
    return (out / d.double()).float()


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_admm_on_a_fixed_mask_beats_sparsegpt_and_keeps_the_mask(ratio):
    W, X = layer()
    xtx = X.T @ X
    mask = row_mask(W.abs() * xtx.diagonal().sqrt(), ratio)  # Wanda's mask
    new = admm_update(W, xtx, mask, ADMMOptions())
    assert torch.equal(new == 0, mask) or bool((new[mask] == 0).all())
    assert bool((new[mask] == 0).all()) and bool((new[~mask] != 0).all())
    _, obs = sparsegpt_prune(W, 2 * xtx / 8, SparsitySpec(ratio), mask=mask)
    plain = W.masked_fill(mask, 0)
    assert rel_error(W, new, X) < rel_error(W, obs, X) < rel_error(W, plain, X)


def test_admm_converges_to_the_exact_least_squares_on_the_support():
    W, X = layer(out=12, inn=40, tokens=400, seed=1)
    xtx = X.T @ X
    mask = row_mask(W.abs(), 0.6)
    options = ADMMOptions(admm_iterations=400, admm_gradual=1)
    got = admm_update(W, xtx, mask, options)
    want = exact_on_support(W, xtx, mask, options.admm_percdamp)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_nothing_pruned_gives_the_dense_weights_back():
    W, X = layer(out=8, inn=24, tokens=200)
    got = admm_update(W, X.T @ X, torch.zeros_like(W, dtype=torch.bool), ADMMOptions())
    assert torch.allclose(got, W, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity_type, ratio", [("unstructured", 0.6), ("2:4", None), ("4:8", None)])
def test_gradual_admm_reaches_the_exact_sparsity(sparsity_type, ratio):
    W, X = layer()
    stats = LayerStats(W.shape[1], with_hessian=True)
    stats.update(X, 8)
    spec = SparsitySpec.parse(sparsity_type, ratio)
    mask, new = admm(W, stats, spec, ADMMOptions())
    assert bool((new[mask] == 0).all())
    if spec.structured:
        groups = mask.reshape(W.shape[0], -1, spec.m).sum(-1)
        assert bool((groups == spec.n).all())
    else:
        assert (mask.sum(1) == int(W.shape[1] * ratio)).all()
    _, obs = sparsegpt_prune(W, stats.hessian, spec)
    assert rel_error(W, new, X) < rel_error(W, obs, X)  # this layer: gradual ADMM beats SparseGPT


def test_update_none_is_the_method_itself_and_admm_keeps_its_mask():
    wanda = get_method("wanda")
    assert compose(wanda, get_step("refine", "none"), get_step("update", "none")) is wanda
    composed = compose(wanda, update=get_step("update", "admm"))
    W, X = layer(out=16, inn=32, tokens=256)
    stats = LayerStats(32, with_hessian=True)
    stats.update(X, 4)
    opts = composed.make_options(granularity=None, use_variant=False, admm_iterations=5, ria_alpha=0.5)
    mask, new = composed(W, stats, SparsitySpec(0.5), opts)
    plain, _ = wanda(W, stats, SparsitySpec(0.5))
    assert torch.equal(mask, plain) and composed.needs_hessian and opts.admm_iterations == 5
    assert torch.equal(new, admm_update(W, stats.xtx, mask, ADMMOptions(admm_iterations=5)))


@pytest.mark.parametrize("kwargs, expected", [
    (dict(update="admm", admm_iterations=0), "pruning.admm_iterations must be an integer >= 1"),
    (dict(admm_iterations=0), "pruning.admm_iterations must be an integer >= 1"),  # checked for every method
    (dict(method="admm", admm_gradual=0), "pruning.admm_gradual must be an integer >= 1"),
    (dict(update="admm", admm_rho=0.0), "pruning.admm_rho must be > 0"),
    (dict(update="admm", method="sparsegpt"), "sparsegpt updates its weights itself"),
    (dict(update="admm", method="ablate_mag_seq"), "ablate_mag_seq updates its weights itself"),
    (dict(update="obs"), "pruning.update must be one of ('none', 'admm')"),
])
def test_bad_admm_settings_are_refused(kwargs, expected):
    with pytest.raises(ValueError, match=__import__("re").escape(expected)):
        Pruning(**kwargs)


@pytest.mark.parametrize("method, update", [("wanda", "admm"), ("admm", "none")])
def test_cli_prunes_with_admm_and_reports_it(tiny_dirs, text_file, tmp_path, method, update):
    outs = {}
    for name, m, u in (("plain", "wanda", "none"), ("run", method, update)):
        outs[name] = tmp_path / name
        err, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration",
                          str(text_file), "--data.evaluation", str(text_file), "--data.nsamples", "4",
                          "--data.seqlen", "32", "--data.max_eval_windows", "4", "--trainer.enable_progress_bar",
                          "false", "--calibration.propagate", "false", "--pruning.method", m, "--pruning.update", u,
                          "--save_model", "true", "--output_dir", str(outs[name])])
        assert err is None, err
    report = json.loads((outs["run"] / "report.json").read_text())
    assert report["method"] == method and report["update"] == update
    assert report["method_options"]["admm_iterations"] == 20
    assert all(abs(v - 0.5) < 1e-9 for v in report["layers"].values())  # row granularity: exact per layer
    plain = torch.load(outs["plain"] / "masks.pt")
    masks = torch.load(outs["run"] / "masks.pt")
    same = [torch.equal(plain[k], masks[k]) for k in plain]
    # wanda + admm: Wanda's masks exactly (dense statistics, no propagation); gradual admm: its own
    assert all(same) if method == "wanda" else not all(same)
