"""Calibration statistics and input flattening, against direct computations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanda_pl.core.hooks import collect_stats
from wanda_pl.core.stats import LayerStats
from wanda_pl.core.layers import flatten_inputs, in_features, weight_matrix


def _chunks(seed=0, width=24):
    g = torch.Generator().manual_seed(seed)
    # (tokens, in) blocks from (nsamples) sequences, with very different column scales
    sizes = [(5, 1), (12, 3), (1, 1), (40, 4)]
    scale = torch.logspace(-2, 2, width)
    return [(torch.randn(t, width, generator=g) * scale, ns) for t, ns in sizes]


def test_layer_stats_match_concatenated_activations():
    width = 24
    chunks = _chunks(width=width)
    st = LayerStats(width, with_hessian=True)
    for x, ns in chunks:
        st.update(x, ns)
    X = torch.cat([x for x, _ in chunks]).double()
    n = sum(ns for _, ns in chunks)
    assert st.nsamples == n == 9
    assert st.sq_sum.dtype == torch.float32 and st.sq_sum.shape == (width,)
    torch.testing.assert_close(st.sq_sum.double(), (X ** 2).sum(0), rtol=1e-5, atol=0)
    # scaler_row[j] = mean over samples of ||X_j||^2 (column norms over all tokens / nsamples)
    expected_scaler = torch.stack([X[:, j].norm() ** 2 for j in range(width)]) / n
    torch.testing.assert_close(st.scaler_row.double(), expected_scaler, rtol=1e-5, atol=0)
    H = 2.0 * X.t() @ X / n
    assert st.hessian.dtype == torch.float32 and st.hessian.shape == (width, width)
    torch.testing.assert_close(st.hessian.double(), H, rtol=1e-4, atol=1e-4 * H.abs().max().item())
    # H is symmetric and its diagonal is 2 * scaler_row
    torch.testing.assert_close(st.hessian, st.hessian.t())
    torch.testing.assert_close(torch.diagonal(st.hessian), 2 * st.scaler_row, rtol=1e-5, atol=0)


def test_layer_stats_order_and_split_do_not_matter():
    chunks = _chunks(seed=3)
    a, b = LayerStats(24), LayerStats(24)
    for x, ns in chunks:
        a.update(x, ns)
    b.update(torch.cat([x for x, _ in reversed(chunks)]), sum(ns for _, ns in chunks))
    torch.testing.assert_close(a.scaler_row, b.scaler_row, rtol=1e-5, atol=0)


def test_no_hessian_unless_asked():
    st = LayerStats(4)
    st.update(torch.ones(3, 4), 1)
    assert st.xtx is None
    with pytest.raises(ValueError, match="Hessian"):
        st.hessian
    # fresh stats: scaler of zeros, no division by zero
    assert torch.equal(LayerStats(3).scaler_row, torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activations_raise(bad):
    st = LayerStats(8, with_hessian=True)
    st.update(torch.ones(2, 8), 1)
    x = torch.ones(3, 8)
    x[1, 2] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        st.update(x, 1)
    # nothing was accumulated from the bad block
    assert st.nsamples == 1 and torch.equal(st.sq_sum, torch.full((8,), 2.0))


def test_non_finite_activations_raise_through_hooks():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 5, 8)
    x[0, 0, 0] = float("nan")
    with collect_stats({"lin": lin}) as stats, pytest.raises(FloatingPointError):
        lin(x)
    assert not lin._forward_hooks  # hooks are removed even after the error


# --------------------------------------------------------------------------- flattening
def test_linear_3d_inputs():
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    for dtype, expected in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        flat = flatten_inputs(lin, x.to(dtype))  # the compute dtype: fp64 stays, the rest is fp32
        assert flat.dtype == expected and flat.shape == (10, 6)
        rows = [x[b, t].to(dtype).to(expected) for b in range(2) for t in range(5)]
        assert torch.equal(flat, torch.stack(rows))
    # 2-D and 4-D inputs too
    assert flatten_inputs(lin, x[0]).shape == (5, 6)
    assert flatten_inputs(lin, torch.randn(2, 3, 4, 6)).shape == (24, 6)
    assert weight_matrix(lin) is lin.weight and in_features(lin) == 6


def test_hf_conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(10, 6)  # nf=10 outputs, nx=6 inputs: weight is (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    assert conv.weight.shape == (6, 10)
    W = weight_matrix(conv)
    assert W.shape == (10, 6) and in_features(conv) == 6
    assert W.data_ptr() == conv.weight.data_ptr()  # a view: pruning it prunes the module
    x = torch.randn(3, 4, 6)
    flat = flatten_inputs(conv, x)
    assert torch.equal(flat, x.reshape(12, 6))
    # the (out, in) view really is the linear map of the flattened inputs
    torch.testing.assert_close(flat @ W.t() + conv.bias, conv(x).reshape(12, 10), rtol=1e-5, atol=1e-5)
    with collect_stats({"c": conv}) as stats:
        conv(x)
    assert stats["c"].nsamples == 3
    torch.testing.assert_close(stats["c"].sq_sum, (x ** 2).sum(dim=(0, 1)))


def test_conv2d_1x1():
    conv = nn.Conv2d(5, 7, 1)
    x = torch.randn(2, 5, 3, 4)
    flat = flatten_inputs(conv, x)
    assert flat.shape == (2 * 3 * 4, 5)
    rows = [x[b, :, h, w] for b in range(2) for h in range(3) for w in range(4)]
    assert torch.equal(flat, torch.stack(rows))
    W = weight_matrix(conv)
    assert W.shape == (7, 5) and in_features(conv) == 5
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 7)
    torch.testing.assert_close(flat @ W.t() + conv.bias, out, rtol=1e-5, atol=1e-5)


def manual_unfold(x, k, stride, padding, dilation):
    """Patches of a conv input, one row per output position (batch-major, then row-major
    positions), each patch ordered (channel, kh, kw) like ``weight.reshape(out, -1)``."""
    kh, kw = k
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    B, C, H, W = xp.shape
    oh = (H - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(B):
        for i in range(oh):
            for j in range(ow):
                patch = [xp[b, c, i * stride[0] + p * dilation[0], j * stride[1] + q * dilation[1]]
                         for c in range(C) for p in range(kh) for q in range(kw)]
                rows.append(torch.stack(patch))
    return torch.stack(rows)


@pytest.mark.parametrize("k,stride,padding,dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 3), (1, 2), (1, 0), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),  # 1x1 with stride: must not take the 1x1 shortcut
    ((1, 1), (1, 1), (1, 1), (1, 1)),  # 1x1 with padding: neither
])
def test_conv2d_kxk_vs_manual_unfold(k, stride, padding, dilation):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 7, 6)
    flat = flatten_inputs(conv, x)
    expected = manual_unfold(x, k, stride, padding, dilation)
    assert flat.shape == expected.shape == (expected.shape[0], 3 * k[0] * k[1])
    torch.testing.assert_close(flat, expected, rtol=0, atol=0)
    # the conv is the linear map weight_matrix(conv) of these patches
    out = conv(x)
    out = out.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(flat @ weight_matrix(conv).t() + conv.bias, out, rtol=1e-5, atol=1e-5)
    assert in_features(conv) == 3 * k[0] * k[1]
    with collect_stats({"c": conv}) as stats:
        conv(x)
    assert stats["c"].nsamples == 2
    torch.testing.assert_close(stats["c"].sq_sum, (expected ** 2).sum(0), rtol=1e-5, atol=1e-6)


def test_unsupported_convs_raise():
    with pytest.raises(ValueError, match="grouped"):
        flatten_inputs(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="padding"):
        flatten_inputs(nn.Conv2d(4, 4, 3, padding="same"), torch.randn(1, 4, 5, 5))


def test_collect_stats_counts_samples_and_removes_hooks():
    lin = nn.Linear(8, 2)
    xs = [torch.randn(3, 5, 8), torch.randn(1, 5, 8), torch.randn(5, 8)]  # a 2-D input counts as one sample
    with collect_stats({"lin": lin}, with_hessian=True) as stats:
        for x in xs:
            lin(x)
    assert stats["lin"].nsamples == 3 + 1 + 1
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(stats["lin"].sq_sum, (X ** 2).sum(0))
    torch.testing.assert_close(stats["lin"].hessian, 2 * X.t() @ X / 5, rtol=1e-5, atol=1e-5)
    assert not lin._forward_hooks
    lin(xs[0])  # outside the context nothing is accumulated
    assert stats["lin"].nsamples == 5


@pytest.mark.parametrize("dtype, expected", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                             (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_statistics_keep_fp64_and_never_go_below_fp32(dtype, expected):
    """An fp64 model's statistics stay fp64 end to end (its masks then do not depend on the CPU);
    every other model's are accumulated in fp32, never in half precision."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4).to(dtype)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with collect_stats({"l": lin}, with_hessian=True) as stats:
        lin(x.to(dtype))
    st = stats["l"]
    assert st.sq_sum.dtype == st.col_sum.dtype == st.xtx.dtype == st.scaler_row.dtype == expected
    flat = x.to(dtype).to(torch.float64).reshape(-1, 8)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(st.xtx.double(), flat.T @ flat, rtol=tol, atol=tol)
    if dtype == torch.float64:  # exact to the last bits an fp32 sum would lose
        assert torch.equal(st.sq_sum, (flat * flat).sum(0))


def test_layers_reading_one_input_share_one_accumulator_with_the_same_sums(tiny_dirs):
    """q/k/v (and gate/up) read the same tensor: one LayerStats, one X^T X, equal bit for bit to what
    each would have summed alone; o_proj and down_proj read their own."""
    from wanda_pl.core.hooks import collect_stats
    from wanda_pl.core.layers import select_targets
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    block = module.model.model.layers[1]
    targets = select_targets(block, "model.layers.1", None, ())
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    runs = {}
    for share in (True, False):
        with torch.no_grad(), collect_stats(targets, True, share=share) as stats:
            for window in ids:
                module.model(input_ids=window.unsqueeze(0))
        runs[share] = stats
    groups = {}
    for name, st in runs[True].items():
        groups.setdefault(id(st), []).append(name.rsplit(".", 1)[1])
    assert sorted(groups.values()) == [["down_proj"], ["gate_proj", "up_proj"], ["o_proj"],
                                       ["q_proj", "k_proj", "v_proj"]]
    assert len({id(st) for st in runs[False].values()}) == 7
    for name in targets:
        a, b = runs[True][name], runs[False][name]
        assert torch.equal(a.xtx, b.xtx) and torch.equal(a.sq_sum, b.sq_sum) and torch.equal(a.col_sum, b.col_sum)
        assert (a.tokens, a.nsamples) == (b.tokens, b.nsamples) == (48, 3)
