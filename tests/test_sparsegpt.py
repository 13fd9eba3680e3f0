"""SparseGPT against a slow, explicit-inverse OBS implementation, plus sparsity and robustness checks."""
import logging

import pytest
import torch

from wanda_pl.methods import get_method
from wanda_pl.methods.base import SolverOptions
from wanda_pl.methods.sparsegpt import sparsegpt_prune
from wanda_pl.core.sparsity import SparsitySpec, nm_mask, select_mask
from wanda_pl.core.stats import LayerStats

OUT, IN, TOKENS, NSAMPLES = 16, 64, 512, 4


def correlated_layer(seed=0, out=OUT, inp=IN, tokens=TOKENS, rank=None):
    g = torch.Generator().manual_seed(seed)
    rank = rank or inp
    Z = torch.randn(tokens, rank, generator=g)
    A = torch.randn(rank, inp, generator=g) / rank ** 0.5
    # A shared component makes neighbouring inputs strongly correlated, where OBS updates pay off.
    X = Z @ A + 1.5 * torch.randn(tokens, 1, generator=g) * torch.linspace(0.5, 1.5, inp)
    W = torch.randn(out, inp, generator=g)
    return W, X


def hessian(X, nsamples=NSAMPLES):
    return 2.0 * X.t() @ X / nsamples


def stats_of(X, nsamples=NSAMPLES):
    st = LayerStats(X.shape[1], with_hessian=True)
    st.update(X, nsamples)
    return st


def damped_inverse(H, percdamp):
    """float64 (H + damp I)^-1 with the same dead-column treatment as SparseGPT."""
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H.diagonal()[dead] = 1.0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    return torch.linalg.inv(H), dead


def downdate(Hinv, i):
    """Remove variable i from an inverse Hessian (explicit rank-1 OBS downdate)."""
    return Hinv - torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]


def slow_obs(W, H, mask, percdamp=0.01):
    """Sequential OBS for a fixed mask, one column at a time, float64, explicit inverse."""
    Hinv, dead = damped_inverse(H, percdamp)
    W = W.double().clone()
    W[:, dead] = 0
    for i in range(W.shape[1]):
        err = torch.where(mask[:, i], W[:, i], torch.zeros_like(W[:, i])) / Hinv[i, i]
        W[:, i + 1:] -= err.unsqueeze(1) * Hinv[i, i + 1:].unsqueeze(0)
        W[mask[:, i], i] = 0
        Hinv = downdate(Hinv, i)
    return W


def slow_select(W, H, spec, blocksize, percdamp=0.01, score=None):
    """Sequential OBS that also chooses the mask the way SparseGPT specifies, float64.

    ``score(w, cols)``: another criterion on the *current* (already updated) weights of the columns
    being chosen, as the iterative ablations; None: SparseGPT's own ``w^2 / [H^-1]_jj^2``."""
    Hinv, dead = damped_inverse(H, percdamp)
    rows, cols = W.shape
    # [H^-1]_jj once columns < j are eliminated; the eliminations do not depend on W.
    d2 = torch.empty(cols, dtype=torch.float64)
    Hi = Hinv.clone()
    for j in range(cols):
        d2[j] = Hi[j, j]
        Hi = downdate(Hi, j)
    W = W.double().clone()
    W[:, dead] = 0
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(cols):
        if spec.structured and i % spec.m == 0:
            g = slice(i, i + spec.m)
            s = W[:, g] ** 2 / d2[g] if score is None else score(W[:, g], g)
            mask[:, g] = slow_nm_mask(s, spec.n, spec.m)
        elif not spec.structured and i % blocksize == 0:
            i2 = min(i + blocksize, cols)
            k = int(rows * i2 * spec.ratio) - int(rows * i * spec.ratio)
            s = W[:, i:i2] ** 2 / d2[i:i2] if score is None else score(W[:, i:i2], slice(i, i2))
            mask[:, i:i2] = slow_lowest(s, k)
        err = torch.where(mask[:, i], W[:, i], torch.zeros_like(W[:, i])) / Hinv[i, i]
        W[:, i + 1:] -= err.unsqueeze(1) * Hinv[i, i + 1:].unsqueeze(0)
        W[mask[:, i], i] = 0
        Hinv = downdate(Hinv, i)
    return mask, W


def slow_lowest(score, k):
    """The k lowest entries of a matrix (ties: the lower flat index), by a Python sort."""
    vals = score.flatten().tolist()
    out = torch.zeros(len(vals), dtype=torch.bool)
    for j in sorted(range(len(vals)), key=lambda j: (vals[j], j))[:k]:
        out[j] = True
    return out.reshape(score.shape)


def slow_nm_mask(score, n, m):
    """In every row and group of m consecutive columns, the n lowest (ties: the lower column)."""
    out = torch.zeros(score.shape, dtype=torch.bool)
    for r in range(score.shape[0]):
        vals = score[r].tolist()
        for g in range(0, len(vals), m):
            for j in sorted(range(g, g + m), key=lambda j: (vals[j], j))[:n]:
                out[r, j] = True
    return out


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def out_err(W, W2, X):
    return float((W @ X.t() - W2 @ X.t()).norm())


@pytest.mark.parametrize("spec", [SparsitySpec(0.5), SparsitySpec.parse("2:4"), SparsitySpec.parse("4:8")], ids=str)
def test_output_error_well_below_plain_zeroing(spec):
    W, X = correlated_layer(1)
    mask, W2 = sparsegpt_prune(W, hessian(X), spec, blocksize=32)
    zeroed = W.masked_fill(mask, 0)
    assert out_err(W, W2, X) < 0.7 * out_err(W, zeroed, X)


@pytest.mark.parametrize("blocksize", [1, 16, 24, 128])
@pytest.mark.parametrize("kind", ["random", "2:4"])
def test_fixed_mask_matches_slow_obs(kind, blocksize):
    W, X = correlated_layer(2)
    H = hessian(X)
    g = torch.Generator().manual_seed(3)
    score = torch.rand(W.shape, generator=g)
    mask = score < 0.5 if kind == "random" else nm_mask(score, 2, 4)
    got_mask, got = sparsegpt_prune(W, H, SparsitySpec(0.5), blocksize=blocksize, mask=mask)
    want = slow_obs(W, H, mask)
    assert torch.equal(got_mask, mask)
    assert rel_err(got, want) < 1e-4
    assert torch.all(got[mask] == 0)
    # The OBS updates did move the kept weights.
    assert rel_err(got[~mask], W[~mask]) > 1e-2


@pytest.mark.parametrize(
    "spec,blocksize",
    [(SparsitySpec(0.5), 16), (SparsitySpec(0.5), 64), (SparsitySpec(0.3), 24), (SparsitySpec.parse("2:4"), 16), (SparsitySpec.parse("4:8"), 32)],
    ids=str,
)
def test_selection_matches_slow(spec, blocksize):
    W, X = correlated_layer(4)
    H = hessian(X)
    got_mask, got = sparsegpt_prune(W, H, spec, blocksize=blocksize)
    want_mask, want = slow_select(W, H, spec, blocksize)
    assert torch.equal(got_mask, want_mask)
    assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize(
    "spec,inp,blocksize",
    [(SparsitySpec(0.5), 64, 16), (SparsitySpec(0.5), 64, 128), (SparsitySpec(0.3), 72, 32), (SparsitySpec(0.7), 100, 128)],
    ids=str,
)
def test_unstructured_count_is_exact(spec, inp, blocksize):
    W, X = correlated_layer(5, inp=inp)
    mask, W2 = sparsegpt_prune(W, hessian(X), spec, blocksize=blocksize)
    k = int(W.numel() * spec.ratio)
    assert int(mask.sum()) == k
    assert int((W2 == 0).sum()) == k
    assert torch.equal(W2 == 0, mask)


def test_unstructured_blocks_get_equal_shares_when_divisible():
    W, X = correlated_layer(6)
    mask, _ = sparsegpt_prune(W, hessian(X), SparsitySpec(0.5), blocksize=16)
    assert mask.reshape(OUT, IN // 16, 16).sum(dim=(0, 2)).tolist() == [OUT * 8] * (IN // 16)


@pytest.mark.parametrize("nm", ["2:4", "4:8"])
@pytest.mark.parametrize("blocksize", [128, 16, 6])  # 6 is not a multiple of M: rounded down
def test_nm_every_group_exact(nm, blocksize):
    spec = SparsitySpec.parse(nm)
    W, X = correlated_layer(7)
    mask, W2 = sparsegpt_prune(W, hessian(X), spec, blocksize=blocksize)
    groups = (W2 == 0).reshape(OUT, IN // spec.m, spec.m).sum(-1)
    assert torch.all(groups >= spec.n)
    assert torch.all(mask.reshape(OUT, IN // spec.m, spec.m).sum(-1) == spec.n)
    assert torch.equal(W2 == 0, mask)


def test_nm_width_must_divide():
    W, X = correlated_layer(0, inp=66)
    with pytest.raises(ValueError, match="does not divide"):
        sparsegpt_prune(W, hessian(X), SparsitySpec.parse("2:4"))


def test_dead_columns(caplog):
    W, X = correlated_layer(8)
    dead = [3, 10, 40]
    X[:, dead] = 0
    H = hessian(X)
    assert torch.all(torch.diagonal(H)[dead] == 0)
    for spec in (SparsitySpec(0.5), SparsitySpec.parse("2:4")):
        # Without damping the dead columns alone make H singular: they must be fixed up, not retried.
        with caplog.at_level(logging.WARNING, logger="wanda_pl.methods.sparsegpt"):
            mask, W2 = sparsegpt_prune(W, H, spec, blocksize=16, percdamp=0.0)
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        assert torch.isfinite(W2).all()
        assert torch.all(W2[:, dead] == 0)
        assert torch.all(mask[:, dead])
        assert torch.equal(W2 == 0, mask)
    # Dead weights never reach the output, so the live part must still match the slow OBS.
    fixed = torch.rand(W.shape, generator=torch.Generator().manual_seed(9)) < 0.5
    mask, W2 = sparsegpt_prune(W, H, SparsitySpec(0.5), blocksize=16, mask=fixed)
    assert torch.equal(mask, fixed | (torch.arange(IN) == torch.tensor(dead)[:, None]).any(0))
    assert rel_err(W2, slow_obs(W, H, fixed)) < 1e-4
    mask, W2 = sparsegpt_prune(W, H, SparsitySpec(0.5), blocksize=16, percdamp=0.0, mask=fixed)
    assert rel_err(W2, slow_obs(W, H, fixed, percdamp=0.0)) < 1e-4


def test_inputs_not_modified():
    W, X = correlated_layer(10)
    X[:, 5] = 0
    H = hessian(X)
    W0, H0 = W.clone(), H.clone()
    sparsegpt_prune(W, H, SparsitySpec(0.5))
    assert torch.equal(W, W0) and torch.equal(H, H0)


def test_singular_hessian_retries_with_warning(caplog):
    W, X = correlated_layer(11, rank=8)  # 64 inputs spanned by 9 directions: H is singular
    H = hessian(X)
    with caplog.at_level(logging.WARNING, logger="wanda_pl.methods.sparsegpt"):
        mask, W2 = sparsegpt_prune(W, H, SparsitySpec(0.5), blocksize=16, percdamp=0.0)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not positive definite" in m and "damping" in m for m in msgs), msgs
    assert torch.isfinite(W2).all()
    assert int(mask.sum()) == W.numel() // 2


def test_indefinite_hessian_retries_until_positive(caplog):
    W, X = correlated_layer(12)
    H = hessian(X)
    # A negative eigenvalue larger than the default damping: percdamp 0.01 fails, 0.1 must succeed.
    evals, evecs = torch.linalg.eigh(H.double())
    evals[0] = -0.05 * float(torch.diagonal(H).mean())
    H_bad = (evecs @ torch.diag(evals) @ evecs.t()).float()
    with caplog.at_level(logging.WARNING, logger="wanda_pl.methods.sparsegpt"):
        _, W2 = sparsegpt_prune(W, H_bad, SparsitySpec(0.5), blocksize=16)
    assert any("not positive definite" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(W2).all()


def test_hopeless_hessian_raises_clearly(caplog):
    W, _ = correlated_layer(13)
    with caplog.at_level(logging.WARNING, logger="wanda_pl.methods.sparsegpt"):
        with pytest.raises(RuntimeError, match="not positive definite"):
            sparsegpt_prune(W, -torch.eye(IN), SparsitySpec(0.5))
    H = torch.eye(IN)
    H[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(W, H, SparsitySpec(0.5))


@pytest.mark.parametrize("name,gran", [("ablate_mag_seq", "layer"), ("ablate_wanda_seq", "row")])
@pytest.mark.parametrize("nm", ["unstructured", "2:4"])
def test_seq_ablations_keep_their_mask(name, gran, nm):
    W, X = correlated_layer(14)
    st = stats_of(X)
    spec = SparsitySpec.parse(nm, 0.5 if nm == "unstructured" else None)
    method = get_method(name)
    assert method.needs_hessian
    mask, W2 = method(W.clone(), st, spec)
    score = W.abs() if name == "ablate_mag_seq" else W.abs() * st.scaler_row.sqrt()
    want = select_mask(score, spec, gran)
    assert torch.equal(mask, want)
    assert torch.equal(W2 == 0, want)
    assert rel_err(W2, slow_obs(W, st.hessian, want)) < 1e-4
    # Same mask, better output than plain zeroing.
    assert out_err(W, W2, X) < out_err(W, W.masked_fill(want, 0), X)


@pytest.mark.parametrize("name", ["ablate_mag_iter", "ablate_wanda_iter"])
@pytest.mark.parametrize("nm", ["unstructured", "2:4", "4:8"])
def test_iter_ablations_match_a_slow_rescoring_obs(name, nm):
    W, X = correlated_layer(15)
    st = stats_of(X)
    spec = SparsitySpec.parse(nm, 0.5 if nm == "unstructured" else None)
    opts = SolverOptions(blocksize=16)
    mask, W2 = get_method(name)(W.clone(), st, spec, opts)
    assert torch.isfinite(W2).all()
    assert torch.equal(W2 == 0, mask)
    if spec.structured:
        assert torch.all(mask.reshape(OUT, -1, spec.m).sum(-1) == spec.n)
    else:
        assert int(mask.sum()) == W.numel() // 2
    # Every block (N:M: every group of M columns) is chosen by the method's own criterion on the
    # weights as the OBS updates of the earlier columns left them: the slow float64 reference
    # rescores column by column with an explicit inverse Hessian.
    norm = st.scaler_row.double().sqrt()
    crit = (lambda w, cols: w.abs()) if name == "ablate_mag_iter" else (lambda w, cols: w.abs() * norm[cols])
    want_mask, want = slow_select(W, st.hessian, spec, 16, score=crit)
    assert torch.equal(mask, want_mask)
    assert rel_err(W2, want) < 1e-4
    # the later blocks really were rescored: on the original weights they would be chosen otherwise
    first = spec.m if spec.structured else 16
    orig = crit(W.double(), slice(0, IN))
    static = slow_nm_mask(orig, spec.n, spec.m) if spec.structured else torch.cat(
        [slow_lowest(orig[:, i:i + 16], OUT * 8) for i in range(0, IN, 16)], dim=1)
    assert torch.equal(mask[:, :first], static[:, :first])
    assert not torch.equal(mask[:, first:], static[:, first:])


def test_iter_rescoring_uses_updated_weights():
    """Later blocks must be scored on the OBS-updated weights, not the original ones."""
    W, X = correlated_layer(16)
    H = hessian(X)
    seen = []

    def score(w, cols):
        seen.append((cols, w.clone()))
        return w.abs()

    _, W2 = sparsegpt_prune(W, H, SparsitySpec(0.5), blocksize=16, iter_score=score)
    assert [c for c, _ in seen] == [slice(i, i + 16) for i in range(0, IN, 16)]
    assert torch.equal(seen[0][1], W[:, :16])
    assert not torch.allclose(seen[1][1], W[:, 16:32])


def test_registered_sparsegpt_uses_stats_and_options():
    W, X = correlated_layer(17)
    st = stats_of(X)
    spec = SparsitySpec(0.5)
    m = get_method("sparsegpt")
    assert m.needs_hessian and m.needs_activations
    mask, W2 = m(W.clone(), st, spec, SolverOptions(blocksize=32, percdamp=0.05))
    want_mask, want = sparsegpt_prune(W, st.hessian, spec, blocksize=32, percdamp=0.05)
    assert torch.equal(mask, want_mask) and torch.equal(W2, want)
    with pytest.raises(ValueError, match="statistics"):
        m(W, None, spec)
