"""RIA: its score against the formula on a hand-made matrix, its mask, its options, the CLI; its
channel permutation for N:M against the identity and a brute force, on a tiny model's layers."""
import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from wanda_pl.callbacks import Calibration, Pruning
from wanda_pl.core.sparsity import SparsitySpec, select_mask
from wanda_pl.core.stats import LayerStats
from wanda_pl.methods import get_method
from wanda_pl.methods.permute import kept_score, nm_permutation, permuted_nm_mask
from wanda_pl.methods.ria import RIAOptions, ria_score
from wanda_pl.modules.causal_lm import CausalLM
from wanda_pl.training.masks import load_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert report["method_options"] == {"granularity": None, "ria_alpha": 0.25, "ria_permute": False}
    assert report["actual_sparsity"] == 0.5 and set(report["layers"].values()) == {0.5}  # per layer, exact


# --- the channel permutation for N:M ---
def brute_force_best(score, n, m):
    """The most score N:M can keep over every split of the columns into groups of m (tiny widths only)."""
    def best(cols):
        if not cols:
            return 0.0
        first, rest = cols[0], cols[1:]
        return max(kept_score(score, torch.tensor((first,) + other), n, m) + best([c for c in rest if c not in other])
                   for other in itertools.combinations(rest, m - 1))
    return best(list(range(score.shape[1])))


def clustered(rows=8, groups=4, m=4, seed=0):
    """Important channels side by side: the identity's groups of m are all-important or all-unimportant."""
    g = torch.Generator().manual_seed(seed)
    col = torch.cat([torch.full((groups * m // 2,), 10.0), torch.ones(groups * m // 2)])
    return torch.rand(rows, groups * m, generator=g) * col


def test_permutation_is_a_deterministic_permutation():
    score = torch.rand(16, 64, generator=torch.Generator().manual_seed(1))
    perm = nm_permutation(score, 2, 4)
    assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(64))
    assert torch.equal(perm, nm_permutation(score.clone(), 2, 4))
    assert torch.equal(nm_permutation(score[:, :4], 2, 4), torch.arange(4))  # one group: nothing to move
    with pytest.raises(ValueError, match="does not divide"):
        nm_permutation(score[:, :6], 2, 4)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_permutation_keeps_at_least_the_identity_score(n, m):
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        for score in (torch.rand(32, 64, generator=g), torch.rand(32, 64, generator=g) * torch.randn(64, generator=g).exp()):
            identity = kept_score(score, torch.arange(64), n, m)
            assert kept_score(score, nm_permutation(score, n, m), n, m) >= identity
    score = clustered(m=m)
    assert kept_score(score, nm_permutation(score, n, m), n, m) > kept_score(score, torch.arange(score.shape[1]), n, m)


def test_permutation_is_near_the_brute_force_optimum():
    for seed in range(4):
        score = clustered(rows=6, groups=2, seed=seed) if seed % 2 else torch.rand(6, 8, generator=torch.Generator().manual_seed(seed))
        got, best = kept_score(score, nm_permutation(score, 2, 4), 2, 4), brute_force_best(score, 2, 4)
        assert kept_score(score, torch.arange(8), 2, 4) <= got <= best + 1e-9 and got >= 0.95 * best, seed
    score = clustered(rows=6, groups=3, seed=0)  # 12 columns, 2:4: 5775 splits
    got, best = kept_score(score, nm_permutation(score, 2, 4), 2, 4), brute_force_best(score, 2, 4)
    assert got >= 0.95 * best and got > kept_score(score, torch.arange(12), 2, 4)


def test_a_permutation_that_cannot_gain_is_the_identity():
    score = torch.ones(4, 16)  # every order keeps the same
    assert torch.equal(nm_permutation(score, 2, 4), torch.arange(16))


def test_permuted_mask_is_n_to_m_in_the_permuted_order_and_maps_back():
    score = clustered(rows=16, groups=8)
    spec = SparsitySpec.parse("2:4")
    mask, perm = permuted_nm_mask(score, spec)
    assert (mask[:, perm].reshape(16, 8, 4).sum(-1) == 2).all()
    assert int(mask.sum()) == int(select_mask(score, spec).sum())
    assert torch.equal(mask[:, perm], select_mask(score[:, perm], spec))
    assert float(score[~mask].sum()) == pytest.approx(kept_score(score, perm, 2, 4))
    assert float(score[~mask].sum()) > float(score[~select_mask(score, spec)].sum())
    with pytest.raises(ValueError, match="N:M"):
        permuted_nm_mask(score, SparsitySpec(0.5))
    with pytest.raises(ValueError, match="non-finite"):
        permuted_nm_mask(torch.full((4, 8), float("nan")), spec)


def test_method_uses_the_permutation_only_when_asked():
    torch.manual_seed(0)
    W, X = torch.randn(8, 32), torch.randn(40, 32) * torch.linspace(0.1, 3, 32)
    st = LayerStats(32)
    st.update(X, 4)
    method, spec = get_method("ria"), SparsitySpec.parse("2:4")
    score = ria_score(W, st.scaler_row)
    plain = method(W, st, spec, method.make_options(ria_permute=False))[0]
    assert len(method(W, st, spec, method.make_options(ria_permute=False))) == 2  # no permutation to keep
    permuted, new_w, perm = method(W, st, spec, method.make_options(ria_permute=True))
    assert new_w is None and torch.equal(plain, select_mask(score, spec, "layer"))
    expected_mask, expected_perm = permuted_nm_mask(score, spec, "layer")
    assert torch.equal(permuted, expected_mask) and torch.equal(perm, expected_perm)
    assert torch.equal(perm.sort().values, torch.arange(32)) and not torch.equal(perm, torch.arange(32))
    assert (permuted[:, perm].reshape(8, 8, 4).sum(-1) == 2).all()
    assert float(score[~permuted].sum()) >= float(score[~plain].sum())
    with pytest.raises(ValueError, match="pruning.ria_permute .* N:M"):
        method(W, st, SparsitySpec(0.5), method.make_options(ria_permute=True))


def test_permute_option_is_checked_and_reported():
    with pytest.raises(ValueError, match="pruning.ria_permute permutes input channels for N:M sparsity only"):
        Pruning("ria", ria_permute=True)  # unstructured
    with pytest.raises(ValueError, match="pruning.ria_permute .*refine"):
        Pruning("ria", sparsity_type="2:4", ria_permute=True, refine="dsnot")
    for method in ("ria", "wanda"):  # a knob of one method is checked for all, read by its own
        with pytest.raises(ValueError, match="pruning.ria_permute must be true or false, got 'yes'"):
            Pruning(method, sparsity_type="2:4", ria_permute="yes")
    assert "ria_permute" not in Pruning("wanda", ria_permute=True).describe()["method_options"]
    assert Pruning("ria", sparsity_type="2:4", ria_permute=True).describe()["method_options"] == {
        "granularity": None, "ria_alpha": 0.5, "ria_permute": True}
    assert Pruning("ria", sparsity_type="2:4", ria_permute=True, update="admm").settings.options.ria_permute


def prune(module, **kwargs):
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    trainer = SimpleNamespace(callbacks=[Calibration()], is_global_zero=False, global_rank=0, world_size=1,
                              datamodule=SimpleNamespace(calibration_data=lambda: ids))
    pruning = Pruning("ria", sparsity_type="2:4", **kwargs)
    pruning.prune(trainer, module)
    return pruning, ids


def test_permuted_masks_leave_the_model_in_place(tiny_dirs):
    dense = CausalLM(str(tiny_dirs["llama"]))
    before = {k: v.detach().clone() for k, v in dense.model.state_dict().items()}
    plain, ids = prune(CausalLM(str(tiny_dirs["llama"])))
    module = CausalLM(str(tiny_dirs["llama"]))
    permuted, _ = prune(module, ria_permute=True)
    after = module.model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert set(permuted.masks) == set(plain.masks)
    for name, mask in permuted.masks.items():
        # the weights are only masked where they are: no column moved
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"] * ~mask), name
        assert (mask.sum(1) == mask.shape[1] // 2).all(), name
    assert any(not torch.equal(permuted.masks[k], plain.masks[k]) for k in plain.masks)
    # the first block's q_proj sees the dense model's inputs in both runs: the permuted mask keeps more RIA score
    name = next(k for k in plain.masks if k.endswith("layers.0.self_attn.q_proj"))
    layer, st = dense.model.get_submodule(name), LayerStats(before[f"{name}.weight"].shape[1])
    handle = layer.register_forward_hook(lambda mod, inp, out: st.update(inp[0].reshape(-1, inp[0].shape[-1]), 1))
    with torch.no_grad():
        dense.model(ids)
    handle.remove()
    score = ria_score(before[f"{name}.weight"], st.scaler_row)
    assert float(score[~permuted.masks[name]].sum()) > float(score[~plain.masks[name]].sum())


def test_cli_takes_the_permutation_for_n_to_m(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "ria24"
    error, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                        "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
                        "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false",
                        "--pruning.method", "ria", "--pruning.sparsity_type", "2:4", "--pruning.ria_permute", "true",
                        "--save_model", "true", "--output_dir", str(out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    assert report["method_options"]["ria_permute"] is True and report["sparsity_type"] == "2:4"
    assert report["actual_sparsity"] == 0.5
    # The order under which each mask is 2:4 comes with the run (a 2:4 kernel needs it), for every layer.
    assert report["permutations"] == "permutations.pt"
    perms = torch.load(out / "permutations.pt", weights_only=True)
    masks = load_masks(out / "masks.pt")
    assert set(perms) == set(masks) and masks
    moved = 0
    for name, mask in masks.items():
        perm = perms[name]
        assert torch.equal(perm.sort().values, torch.arange(mask.shape[1])), name
        groups = mask[:, perm].reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all(), name
        moved += not torch.equal(perm, torch.arange(mask.shape[1]))
    assert moved > 0
    # Without the permutation there is none to write.
    plain = tmp_path / "ria24_plain"
    error, _ = run_cli(["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                        "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
                        "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false",
                        "--pruning.method", "ria", "--pruning.sparsity_type", "2:4", "--output_dir", str(plain)])
    assert error is None, error
    assert not (plain / "permutations.pt").exists()
    assert "permutations" not in json.loads((plain / "report.json").read_text())
