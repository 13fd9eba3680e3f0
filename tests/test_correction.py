"""Bias correction: centred statistics against torch's own variance / covariance, the restored mean
output against a direct forward of dense and pruned layers, the BatchNorm sink found by tracing."""
import copy

import pytest
import torch
import torch.nn as nn

from wanda_pl.core import correction
from wanda_pl.core.engine import prune_sequential
from wanda_pl.core.hooks import BlockInput
from wanda_pl.methods import get_method
from wanda_pl.core.sparsity import SparsitySpec
from wanda_pl.core.stats import LayerStats
from wanda_pl.core.layers import flatten_inputs
from wanda_pl.methods.wanda import wanda_score


def test_centered_stats_are_variance_and_covariance():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 6, generator=g) * 3 + torch.arange(6.0) for n in (5, 9, 2)]
    st = LayerStats(6, with_hessian=True)
    for x in chunks:
        st.update(x, 1)
    X = torch.cat(chunks).double()
    c = st.centered()
    torch.testing.assert_close(st.mean.double(), X.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c.sq_sum.double() / len(X), X.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    Xc = X - X.mean(0)
    torch.testing.assert_close(c.xtx.double(), Xc.T @ Xc, rtol=1e-4, atol=1e-3)
    assert c.nsamples == st.nsamples == 3 and c.tokens == st.tokens == 16
    # the raw statistics are left as they were
    torch.testing.assert_close(st.sq_sum.double(), (X * X).sum(0), rtol=1e-5, atol=1e-4)


def test_mean_needs_activations():
    with pytest.raises(ValueError, match="no calibration activations"):
        LayerStats(3).mean


def _inputs(xs):
    return [BlockInput(x) for x in xs]


def _prune(model, xs, method, ratio=0.5, bias_correction=True, propagate=True):
    targets_fn = lambda _n, block: {  # noqa: E731
        n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "groups", 1) == 1
    }
    return prune_sequential([("all", model)], _inputs(xs), targets_fn, get_method(method), SparsitySpec.parse("unstructured", ratio),
                            None, bias_correction=bias_correction, propagate=propagate, progress=False)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_linear_bias_gets_back_the_mean_output(method):
    torch.manual_seed(0)
    dense = _MLP()
    xs = [torch.randn(4, 7, 16) + 1.5 for _ in range(3)]  # offset inputs: the mean matters
    pruned = copy.deepcopy(dense)
    _prune(pruned, xs, method)
    X = torch.cat([x.reshape(-1, 16) for x in xs])
    with torch.no_grad():
        # fc1 sees the same inputs: its mean output must match the dense one
        torch.testing.assert_close(pruned.fc1(X).mean(0), dense.fc1(X).mean(0), rtol=1e-4, atol=1e-4)
        # fc2 was calibrated in the same pass as fc1 (one block): on the dense fc1's outputs
        h = torch.relu(dense.fc1(X))
        torch.testing.assert_close(pruned.fc2(h).mean(0), dense.fc2(h).mean(0), rtol=1e-4, atol=1e-4)
    # without the correction the mean really moves (the test above can fail)
    plain = copy.deepcopy(dense)
    _prune(plain, xs, method, bias_correction=False)
    with torch.no_grad():
        assert (plain.fc1(X).mean(0) - dense.fc1(X).mean(0)).abs().max() > 1e-2
    assert int((pruned.fc1.weight == 0).sum()) == 12 * 16 // 2  # every method: exactly half of fc1


def test_wanda_with_correction_scores_the_fluctuation():
    torch.manual_seed(1)
    dense = _MLP()
    xs = [torch.randn(4, 7, 16) * torch.linspace(0.1, 2, 16) + torch.linspace(5, -5, 16) for _ in range(2)]
    pruned = copy.deepcopy(dense)
    _prune(pruned, xs, "wanda", propagate=False)
    X = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    score = wanda_score(dense.fc1.weight.detach().double(), X.var(0, unbiased=False))
    k = 8
    expected = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :k], True)
    assert torch.equal(pruned.fc1.weight == 0, expected)


class _ConvBN(nn.Module):
    """1x1 conv (no bias) -> BN -> ReLU6 -> 3x3 conv (no bias, padding) -> BN, as in EfficientNet."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(6, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(torch.nn.functional.relu6(self.bn1(self.pw(x)))))


def _bn_model():
    torch.manual_seed(2)
    m = _ConvBN()
    for bn in (m.bn1, m.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return m.eval()


def test_conv_shift_goes_into_the_following_batchnorm():
    dense = _bn_model()
    xs = [torch.randn(3, 6, 5, 5) + 1.0 for _ in range(2)]
    pruned = copy.deepcopy(dense)
    keys = set(dense.state_dict())
    _prune(pruned, xs, "magnitude", propagate=False)
    assert set(pruned.state_dict()) == keys and pruned.pw.bias is None  # architecture unchanged
    assert not torch.equal(pruned.bn1.running_mean, dense.bn1.running_mean)
    X = torch.cat(xs)
    with torch.no_grad():
        # per channel, over batch and pixels: BN outputs of pruned+corrected == dense (pw sees the same input)
        torch.testing.assert_close(pruned.bn1(pruned.pw(X)).mean((0, 2, 3)), dense.bn1(dense.pw(X)).mean((0, 2, 3)),
                                   rtol=1e-4, atol=1e-4)
        # the 3x3 conv: the mean over its unfolded (zero-padded) patches is restored too
        h = torch.nn.functional.relu6(dense.bn1(dense.pw(X)))
        torch.testing.assert_close(pruned.bn2(pruned.conv(h)).mean((0, 2, 3)), dense.bn2(dense.conv(h)).mean((0, 2, 3)),
                                   rtol=1e-4, atol=1e-4)


def test_find_sinks_traces_the_consumer():
    m = _bn_model()
    targets = {"pw": m.pw, "conv": m.conv}
    with correction.find_sinks(m, targets) as sinks:
        m(torch.randn(1, 6, 4, 4))
    assert sinks == {"pw": m.bn1, "conv": m.bn2}
    # hooks are gone afterwards
    assert not m.pw._forward_hooks and not m.bn1._forward_pre_hooks


def test_refused_without_bias_or_batchnorm():
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"bias_correction needs.*layers have no bias and feed no BatchNorm \(e\.g\. 0\)"):
        _prune(model, [torch.randn(2, 8)], "wanda")
    assert (model[0].weight != 0).all()  # refused before anything was pruned


def test_refused_when_the_conv_does_not_feed_a_batchnorm():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.b = nn.Conv2d(4, 4, 1, bias=False)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.bn(self.a(x)) * 0  # b's output feeds no BatchNorm

    with pytest.raises(ValueError, match=r"\bb\b.*BatchNorm"):
        _prune(M().eval(), [torch.randn(2, 3, 4, 4)], "magnitude")


def test_output_shift_is_the_mean_difference():
    g = torch.Generator().manual_seed(3)
    w, w2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    X = torch.randn(50, 5, generator=g) + 2
    torch.testing.assert_close(correction.output_shift(w, w2, X.mean(0)), (X @ w.T - X @ w2.T).mean(0), rtol=1e-5, atol=1e-5)


def test_flatten_inputs_used_for_conv_means():
    # the conv mean is over unfolded patches, which include the zero padding
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    x = torch.ones(1, 2, 3, 3)
    cols = flatten_inputs(conv, x)
    assert cols.shape == (9, 18) and 0 < cols.mean() < 1


def test_pruning_callback_option():
    from wanda_pl.callbacks import Pruning

    p = Pruning(method="magnitude", bias_correction=True)
    assert p.settings.needs_activations and p.describe()["bias_correction"] is True
    assert not Pruning(method="magnitude").settings.needs_activations
