"""Layer kinds: one place that says how a layer is a matrix, its inputs rows, a mask its parameter's."""
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from wanda_pl.core import layers
from wanda_pl.core.layers import flatten_inputs, is_prunable, kind_of, param_mask, select_targets, weight_matrix
from wanda_pl.core.layers.base import LayerKind, rows


def test_conv1d_is_a_linear_with_a_transposed_weight():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    conv = Conv1D(4, 6)  # (nf=out, nx=in): weight stored (in, out)
    conv.weight.data.copy_(lin.weight.data.t())
    conv.bias.data.copy_(lin.bias.data)
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(conv(x), lin(x))
    assert torch.equal(weight_matrix(conv), weight_matrix(lin)) and weight_matrix(conv).shape == (4, 6)
    assert weight_matrix(conv).data_ptr() == conv.weight.data_ptr()  # a view: edits reach the parameter
    assert torch.equal(flatten_inputs(conv, x), flatten_inputs(lin, x))
    mask = torch.rand(4, 6) < 0.5
    assert torch.equal(param_mask(conv, mask), mask.t()) and torch.equal(param_mask(lin, mask), mask)
    assert kind_of(conv).name == "Conv1D" and kind_of(lin).name == "Linear"


def test_conv2d_matrix_is_the_linear_map_of_unfolded_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 3, 8, 8)
    out = conv(x)  # (2, 5, 4, 4)
    cols = flatten_inputs(conv, x)  # (2 * 4 * 4, 3 * 3 * 3)
    assert cols.shape == (32, 27)
    ref = (cols @ weight_matrix(conv).t()).reshape(2, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(ref, out, atol=1e-5, rtol=0)
    mask = torch.rand(5, 27) < 0.5
    assert param_mask(conv, mask).shape == conv.weight.shape
    assert torch.equal(param_mask(conv, mask).reshape(5, -1), mask)


def test_prunability_by_kind():
    assert is_prunable(nn.Linear(2, 2)) and is_prunable(Conv1D(2, 2))
    assert not is_prunable(nn.Conv2d(2, 2, 1)) and is_prunable(nn.Conv2d(2, 2, 1), convs=True)
    assert not is_prunable(nn.Conv2d(4, 4, 3, groups=4), convs=True)  # depthwise: never
    assert not is_prunable(nn.LayerNorm(2)) and kind_of(nn.Embedding(3, 2)) is None
    with pytest.raises(TypeError, match="not a prunable layer kind"):
        weight_matrix(nn.Embedding(3, 2))
    with pytest.raises(ValueError, match="grouped"):
        flatten_inputs(nn.Conv2d(4, 4, 3, groups=4), torch.zeros(1, 4, 5, 5))


class Scaled(nn.Module):
    """A layer type the package does not know: ``y = (W x) * s``."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.scale = 2.0

    def forward(self, x):
        return (x @ self.weight.t()) * self.scale


def test_a_new_layer_kind_is_one_entry_and_the_engine_prunes_it(monkeypatch):
    from wanda_pl.core.engine import prune_sequential
    from wanda_pl.core.hooks import BlockInput
    from wanda_pl.core.sparsity import SparsitySpec
    from wanda_pl.methods import get_method

    scaled = LayerKind("Scaled", lambda m: isinstance(m, Scaled), lambda m: m.weight, lambda m, x: rows(x),
                       lambda m, mask: mask.reshape(m.weight.shape))
    monkeypatch.setattr(layers, "KINDS", (*layers.KINDS, scaled))
    torch.manual_seed(0)
    block = nn.Sequential(Scaled(8, 8), nn.ReLU(), nn.Linear(8, 8))
    assert list(select_targets(block, "b")) == ["b.0", "b.2"]
    x = torch.randn(4, 3, 8)
    result = prune_sequential([("b", block)], [BlockInput(x)], lambda n, b: select_targets(b, n),
                              get_method("wanda"), SparsitySpec(0.5), progress=False)
    w = block[0].weight.detach()
    score = w.abs() * x.reshape(-1, 8).pow(2).sum(0).div(4).sqrt()  # Wanda by hand, 4 samples
    want = torch.zeros_like(w, dtype=torch.bool).scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :4], True)
    assert torch.equal(result.masks["b.0"], want) and bool((w[want] == 0).all())
    assert int((block[2].weight == 0).sum(1).min()) == 4
