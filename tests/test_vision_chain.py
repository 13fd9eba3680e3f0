"""The timm family: which layers are targets, the chain of blocks, and the block-sequential engine
on it, checked against slow full-network implementations written here (no engine, one full forward
per block)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from wanda_pl.core.engine import prune_sequential
from wanda_pl.core.hooks import collect_stats
from wanda_pl.methods import get_method
from wanda_pl.core.sparsity import SparsitySpec

from test_vision import TINY_VIT, _block_linears, _classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2), False),
    "convnext": ("convnext_atto", dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32)), False),
    "efficientnet": ("mobilenetv2_035", dict(), True),  # timm's EfficientNet class, as Lite0 (0.4M parameters)
    "resnet": ("resnet10t", dict(channels=(8, 16, 24, 32), stem_width=8), True),
}


# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("timm_name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("convs", [False, True])
def test_vit_deit_default_targets_are_the_block_linears(timm_name, convs):
    kwargs = {k: v for k, v in TINY_VIT.items() if k != "pretrained"}
    module = _classifier(timm_name, num_classes=5, convs=convs, model_kwargs=kwargs)
    targets = module.all_targets()
    assert set(targets) == _block_linears(2)
    assert not any(n.startswith(("patch_embed", "head", "norm", "pos")) for n in targets)
    for name in targets:  # names are relative to the timm model (what the Pruning callback resolves)
        assert module.model.get_submodule(name) is targets[name]


@pytest.mark.parametrize("convs", [False, True])
@pytest.mark.parametrize("conv_mlp", [False, True])  # ConvNeXt-B: Linear pointwise layers; atto: 1x1 convs
def test_convnext_default_targets_skip_stem_downsample_depthwise_and_head(convs, conv_mlp):
    module = _classifier("convnext_atto", num_classes=5, convs=convs,
                         model_kwargs=dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), conv_mlp=conv_mlp))
    expected = {f"stages.{s}.blocks.{b}.mlp.{fc}" for s, n in enumerate((1, 2, 1, 1)) for b in range(n)
                for fc in ("fc1", "fc2")}
    assert set(module.all_targets()) == expected
    names = dict(module.model.named_modules())
    assert names["stages.0.blocks.0.conv_dw"].groups > 1  # depthwise: never a target
    assert isinstance(names["stages.1.downsample.1"], nn.Conv2d) and names["stages.1.downsample.1"].groups == 1


def test_efficientnet_convs_selects_pointwise_convs_only():
    module = _classifier("efficientnet_b0", num_classes=5, convs=True)
    targets = set(module.all_targets())
    assert targets and all(n.startswith("blocks.") and n.rsplit(".", 1)[1] in ("conv_pw", "conv_pwl") for n in targets)
    every_pw = {n for n, m in module.model.named_modules() if n.endswith((".conv_pw", ".conv_pwl"))}
    assert targets == every_pw
    assert "conv_stem" not in targets and "conv_head" not in targets and "classifier" not in targets
    assert not any(".se." in n or "conv_dw" in n for n in targets)  # SE and depthwise convs stay dense
    # Without convs there is nothing to prune in an EfficientNet, and the check says so.
    from wanda_pl.callbacks import Pruning

    plain = _classifier("efficientnet_b0", num_classes=5, convs=False)
    assert plain.all_targets() == {}
    with pytest.raises(ValueError, match="no prunable layers"):
        Pruning().settings.check(plain)


def test_explicit_targets_and_ignore():
    kwargs = {k: v for k, v in TINY_VIT.items() if k != "pretrained"}
    module = _classifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=kwargs,
                         targets=[r"^head$", r"mlp\.fc1"], ignore=[r"^blocks\.1\."])
    assert set(module.all_targets()) == {"head", "blocks.0.mlp.fc1"}
    convs = _classifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=kwargs, targets=[r"patch_embed\.proj"])
    assert set(convs.all_targets()) == {"patch_embed.proj"}  # a conv named explicitly is allowed


def test_convs_that_pad_at_run_time_are_skipped_unless_1x1():
    """timm's TF-"same" ``Conv2dSame`` (and a string padding) pads each input by its size: a k x k
    one cannot be unfolded from its static padding, a 1x1 one can (it pads nothing)."""
    from timm.layers import Conv2dSame

    from wanda_pl.families.timm import pads_at_run_time, select

    block = nn.Module()
    block.same3, block.same1 = Conv2dSame(4, 4, 3, stride=2), Conv2dSame(4, 4, 1)
    block.string = nn.Conv2d(4, 4, 3, padding="same")
    block.plain = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Module()
    net.blocks = nn.Sequential(block)
    assert [pads_at_run_time(m) for m in (block.same3, block.same1, block.string, block.plain)] == [True, True, True, False]
    assert set(select(net, "", None, (), True)) == {"blocks.0.same1", "blocks.0.plain"}
    assert set(select(net, "", [r"same3", r"plain"], (), False)) == {"blocks.0.plain"}  # asked for: still skipped
    assert select(net, "", None, (), False) == {}  # convs not asked for


# --------------------------------------------------------------------------- the chain


def _module(family, **kw):
    from wanda_pl.modules.classifier import Classifier

    name, model_kwargs, convs = TINY[family]
    torch.manual_seed(0)
    module = Classifier(name=name, num_classes=5, convs=convs, calibration_batch_size=3, model_kwargs=model_kwargs, **kw)
    with torch.no_grad():  # BatchNorm statistics of a trained net, not the identity of a fresh one
        for m in module.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


def _images(module, n=7, seed=1):
    size = [min(s, 64) for s in module.data_config["input_size"][1:]]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), generator=g, dtype=torch.uint8)


def slow_prune(module, images, method, spec, propagate):
    """Wanda the obvious way: for each block in order, a full forward of the network from the pixels
    with hooks on that block's targets (on the model pruned so far, or on a dense copy), then prune it."""
    import copy

    model = module.model.eval()
    dense = copy.deepcopy(model)
    m = get_method(method)
    masks = {}
    for unit_name, block in module.blocks(images[:1]):
        targets = module.block_targets(unit_name, block)
        source = model if propagate else dense
        with torch.no_grad(), collect_stats({n: source.get_submodule(n) for n in targets}) as stats:
            for batch in images.split(3):
                source(module_normalize(module, batch))
        for name, layer in targets.items():
            w = layer.weight.detach().reshape(layer.weight.shape[0], -1).float()
            mask, _ = m(w, stats[name], spec)
            with torch.no_grad():
                layer.weight.masked_fill_(mask.reshape(layer.weight.shape), 0)
            masks[name] = mask.reshape(layer.weight.shape)
    return masks


def module_normalize(module, batch):
    from wanda_pl.families.timm import normalize

    return normalize(batch, module.pixel_mean, module.pixel_std)


def engine_prune(module, images, method, spec, propagate):
    blocks, inputs = module.prunable_blocks(images)
    return prune_sequential(blocks, inputs, module.block_targets, get_method(method), spec,
                            propagate=propagate, progress=False).masks


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_chain_is_the_repeated_blocks_and_holds_every_target(family):
    module = _module(family)
    blocks = module.blocks(_images(module, 1))
    assert len(blocks) > 1 and all(u is not module.model for _, u in blocks)
    prefix = {"vit": "blocks.", "convnext": "stages.", "efficientnet": "blocks.", "resnet": "layer"}[family]
    assert all(name.startswith(prefix) for name, _ in blocks)
    covered = {n for name, block in blocks for n in module.block_targets(name, block)}
    assert covered == set(module.all_targets()) and covered


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("propagate", [True, False])
def test_engine_masks_equal_a_full_forward_per_block(family, propagate):
    spec = SparsitySpec.parse("unstructured", 0.5)
    images = _images(_module(family))
    expected = slow_prune(_module(family), images, "wanda", spec, propagate)
    got = engine_prune(_module(family), images, "wanda", spec, propagate)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_propagation_changes_the_masks_of_later_blocks():
    spec = SparsitySpec.parse("unstructured", 0.6)
    images = _images(_module("vit"))
    on = engine_prune(_module("vit"), images, "wanda", spec, True)
    off = engine_prune(_module("vit"), images, "wanda", spec, False)
    first = [n for n in on if n.startswith("blocks.0.")]
    assert all(torch.equal(on[n], off[n]) for n in first)  # block 0 sees the same input either way
    assert any(not torch.equal(on[n], off[n]) for n in on if not n.startswith("blocks.0."))


def test_targets_outside_the_chain_fall_back_to_one_dense_block():
    module = _module("vit", targets=[r"^head$", r"mlp\.fc1"])
    assert module.blocks(_images(module, 1)) == [("", module.model)]
    images = _images(module)
    spec = SparsitySpec.parse("unstructured", 0.5)
    expected = slow_prune(_module("vit", targets=[r"^head$", r"mlp\.fc1"]), images, "wanda", spec, False)
    got = engine_prune(module, images, "wanda", spec, True)
    assert set(got) == {"head", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.2.mlp.fc1"}
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_model_that_is_not_a_chain_is_detected():
    from wanda_pl.families.timm import chain_problem

    class Skip(nn.Module):  # block 1 takes the network input, not block 0's output
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            self.blocks[0](x)
            return self.blocks[1](x)

    model = Skip()
    chain = [("blocks.0", model.blocks[0]), ("blocks.1", model.blocks[1])]
    assert "does not take blocks.0's output" in chain_problem(model, chain, torch.randn(2, 4))
    plain = nn.Sequential()
    plain.blocks = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    chain = [(f"blocks.{i}", m) for i, m in enumerate(plain.blocks)]
    assert chain_problem(plain, chain, torch.randn(2, 4)) is None


def test_calibration_leaves_train_mode_and_batchnorm_statistics_alone():
    module = _module("efficientnet")
    module.model.train()
    bn = next(m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    engine_prune(module, _images(module), "wanda", SparsitySpec.parse("unstructured", 0.5), True)
    assert module.model.training and torch.equal(bn.running_mean, before)


def _bn_affine(bn, y):
    """timm's BatchNormAct2d without its activation (a ReLU6 does not keep means)."""
    return torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_bias_correction_restores_every_batchnorm_mean_in_an_efficientnet():
    """timm's EfficientNet class (mobilenetv2_035): with dense statistics, each pruned 1x1 conv's
    BatchNorm output keeps the dense mean over the calibration images, channel by channel; the
    BatchNorm each conv feeds is named by timm's block layout here, independently of the tracing."""
    import copy

    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    module = _module("efficientnet")
    images = _images(module)
    dense = copy.deepcopy(module.model).eval()
    feeds = {}
    for name, block in dense.named_modules():
        if isinstance(block, InvertedResidual):
            feeds[f"{name}.conv_pw"], feeds[f"{name}.conv_pwl"] = f"{name}.bn1", f"{name}.bn3"
        elif isinstance(block, DepthwiseSeparableConv):
            feeds[f"{name}.conv_pw"] = f"{name}.bn2"
    blocks, inputs = module.prunable_blocks(images)
    prune_sequential(blocks, inputs, module.block_targets, get_method("wanda"), SparsitySpec.parse("unstructured", 0.5),
                     bias_correction=True, propagate=False, progress=False)
    targets = module.all_targets()
    assert set(targets) == set(feeds)

    seen = {}
    hooks = [dense.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0]))
             for n in targets]
    with torch.no_grad():
        dense(module_normalize(module, images))
        for h in hooks:
            h.remove()
        for name, xs in seen.items():
            x = torch.cat(xs)
            bn_name = feeds[name]
            got = _bn_affine(module.model.get_submodule(bn_name), module.model.get_submodule(name)(x)).mean((0, 2, 3))
            want = _bn_affine(dense.get_submodule(bn_name), dense.get_submodule(name)(x)).mean((0, 2, 3))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
            w = module.model.get_submodule(name).weight
            assert int((w == 0).sum()) == w.shape[0] * int(w[0].numel() * 0.5), name  # Wanda: per row, exact
