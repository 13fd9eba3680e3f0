"""Image classifiers: conv statistics, layer selection, accuracy / agreement, DDP, the embedded model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanda_pl.core.engine import PruneResult, prune_layers
from wanda_pl.core.hooks import collect_stats
from wanda_pl.methods import PruneOptions, get_method
from wanda_pl.core.sparsity import SparsitySpec

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pretrained=False)


def _trainer(**kw):
    import lightning as L

    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    return L.Trainer(**{**defaults, **kw})


def _write_png(path: Path, rng: np.random.Generator, size=(40, 36)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """val/<0,1,2>/ 7 labelled PNGs, train/ 5 calibration PNGs, extra/ 3 unlabelled PNGs."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, cls in enumerate([0, 0, 1, 1, 2, 2, 2]):
        _write_png(root / "val" / str(cls) / f"img{i}.png", rng)
    for i in range(5):
        _write_png(root / "train" / f"cal{i}.png", rng, size=(48, 40))
    for i in range(3):
        _write_png(root / "extra" / "sub" / f"u{i}.png", rng)
    return root


def _tiny_vit(num_classes=6, seed=0):
    from wanda_pl.modules.classifier import Classifier

    torch.manual_seed(seed)
    return Classifier(name="vit_tiny_patch16_224", num_classes=num_classes, calibration_batch_size=4,
                      model_kwargs={k: v for k, v in TINY_VIT.items() if k != "pretrained"})


# --------------------------------------------------------------------------- conv = unfolded linear


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_wanda_score_equals_linear_on_unfolded_patches(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, bias=False)
    linear = nn.Linear(4 * 9, 6, bias=False)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(6, -1))
    x = torch.randn(3, 4, 9, 9) * torch.linspace(0.1, 3.0, 4).view(1, 4, 1, 1)  # uneven input norms
    patches = F.unfold(x, 3, dilation, padding, stride).transpose(1, 2)  # (batch, positions, in * k * k)

    # The two layers are the same map ...
    out_conv = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out_conv, linear(patches), rtol=1e-5, atol=1e-5)
    # ... so their statistics, Wanda scores and masks must be equal.
    with torch.no_grad(), collect_stats({"conv": conv, "linear": linear}) as stats:
        conv(x)
        linear(patches)
    assert stats["conv"].nsamples == stats["linear"].nsamples == 3
    torch.testing.assert_close(stats["conv"].scaler_row, stats["linear"].scaler_row, rtol=1e-5, atol=1e-6)
    expected = (patches.reshape(-1, 36) ** 2).sum(0) / 3
    torch.testing.assert_close(stats["conv"].scaler_row, expected, rtol=1e-5, atol=1e-6)

    wanda, spec = get_method("wanda"), SparsitySpec.parse("unstructured", 0.5)
    res_conv, res_lin = PruneResult(), PruneResult()
    prune_layers({"conv": conv}, {"conv": stats["conv"]}, wanda, spec, PruneOptions(), res_conv)
    prune_layers({"linear": linear}, {"linear": stats["linear"]}, wanda, spec, PruneOptions(), res_lin)
    assert res_conv.masks["conv"].shape == conv.weight.shape
    assert torch.equal(res_conv.masks["conv"].reshape(6, -1), res_lin.masks["linear"])
    assert torch.equal(conv.weight.reshape(6, -1), linear.weight)
    assert float((conv.weight == 0).float().mean()) == pytest.approx(0.5, abs=1 / 36)


# --------------------------------------------------------------------------- layer selection


def _classifier(name, **kw):
    from wanda_pl.modules.classifier import Classifier

    return Classifier(name=name, **kw)


def _block_linears(depth):
    return {f"blocks.{i}.{n}" for i in range(depth) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


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
        Pruning().check(plain)


def test_explicit_targets_and_ignore():
    kwargs = {k: v for k, v in TINY_VIT.items() if k != "pretrained"}
    module = _classifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=kwargs,
                         targets=[r"^head$", r"mlp\.fc1"], ignore=[r"^blocks\.1\."])
    assert set(module.all_targets()) == {"head", "blocks.0.mlp.fc1"}
    convs = _classifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=kwargs, targets=[r"patch_embed\.proj"])
    assert set(convs.all_targets()) == {"patch_embed.proj"}  # a conv named explicitly is allowed


# --------------------------------------------------------------------------- data


def test_class_folder_rules():
    from wanda_pl.data.images import class_indices

    assert class_indices(["10", "2"]) == ({"10": 10, "2": 2}, "integer class indices")
    mapping, rule = class_indices(["n01443537", "n01440764"])
    assert mapping == {"n01440764": 0, "n01443537": 1} and rule.startswith("ImageNet")
    mapping, rule = class_indices(["n09999999", "n01440764"])  # not all ImageNet ids: sorted order
    assert mapping == {"n01440764": 0, "n09999999": 1} and rule == "sorted folder names"
    assert class_indices(["dog", "cat"])[0] == {"cat": 0, "dog": 1}


def test_datamodule_calibration_and_errors(image_root, tmp_path):
    from wanda_pl.data.images import ImageFolderDataModule

    module = _tiny_vit()
    dm = ImageFolderDataModule(root=str(image_root), nsamples=12, seed=3, batch_size=4, unlabelled=str(image_root / "extra"))
    dm.prepare_for(module)
    calib = dm.calibration_data()
    assert calib.dtype == torch.uint8 and tuple(calib.shape) == (12, 3, 32, 32)
    again = ImageFolderDataModule(root=str(image_root), nsamples=12, seed=3)
    again.prepare_for(module)
    assert torch.equal(again.calibration_data(), calib)  # seeded draw
    assert len(torch.unique(dm.calibration_draw())) <= 5  # drawn with replacement from 5 files
    items = dm.evaluation_items()
    assert [label for _, label in items] == [0, 0, 1, 1, 2, 2, 2, -1, -1, -1]
    info = dm.describe()
    assert info["eval_images"] == 7 and info["unlabelled_images"] == 3 and info["class_folders"] == "integer class indices"

    with pytest.raises(FileNotFoundError, match="neither an existing folder nor an embedded"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).prepare_for(module)
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders"):
        ImageFolderDataModule(root=str(tmp_path)).prepare_for(module)
    small = _tiny_vit(num_classes=2)
    with pytest.raises(ValueError, match="only 2 classes"):
        ImageFolderDataModule(root=str(image_root)).prepare_for(small)


def test_val_shards_cover_every_image_once(image_root):
    from types import SimpleNamespace

    from wanda_pl.data.images import ImageFolderDataModule

    dm = ImageFolderDataModule(root=str(image_root), batch_size=3, unlabelled=str(image_root / "extra"))
    dm.prepare_for(_tiny_vit())
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=3)
        seen += [int(i) for _, _, idx in dm.val_dataloader() for i in idx]
    assert sorted(seen) == list(range(10))  # no padding, no duplicates


# --------------------------------------------------------------------------- metrics


def _hand_predictions(module, dm):
    from wanda_pl.data.images import load_image

    items = dm.evaluation_items()
    images = torch.stack([load_image(p, dm.transform) for p, _ in items])
    with torch.no_grad():
        logits = module(images)
    return logits, torch.tensor([label for _, label in items])


def test_accuracy_and_agreement_equal_a_hand_count(image_root):
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule

    module = _tiny_vit(num_classes=6, seed=2)  # a seed whose random predictions are not all one class
    dm = ImageFolderDataModule(root=str(image_root), nsamples=8, batch_size=3, unlabelled=str(image_root / "extra"))
    dm.prepare_for(module)
    pruning = Pruning(method="wanda", sparsity_ratio=0.6)
    trainer = _trainer(callbacks=[pruning, Calibration(propagate=False)])

    logits, labels = _hand_predictions(module, dm)
    dense_top1 = logits.argmax(-1)
    lab = labels >= 0
    trainer.validate(module, datamodule=dm, verbose=False)
    dense = dict(module.last_metrics)
    assert dense["images"] == 10 and dense["labelled"] == 7
    assert len(set(dense_top1.tolist())) > 1  # a non-degenerate count
    assert dense["top1_correct"] == int((dense_top1[lab] == labels[lab]).sum())
    assert dense["top1"] == pytest.approx(float((dense_top1[lab] == labels[lab]).float().mean()), abs=1e-6)
    top5 = (logits.topk(5, -1).indices[lab] == labels[lab, None]).any(-1).float().mean()
    assert dense["top5"] == pytest.approx(float(top5), abs=1e-6)
    assert dense["agreement"] == 1.0

    pruning.enabled = True
    trainer.validate(module, datamodule=dm, verbose=False)
    pruned = dict(module.last_metrics)
    assert pruning.masks and set(pruning.masks) == _block_linears(2)
    logits2, _ = _hand_predictions(module, dm)
    top1 = logits2.argmax(-1)
    assert pruned["top1"] == pytest.approx(float((top1[lab] == labels[lab]).float().mean()), abs=1e-6)
    assert pruned["agreement"] == pytest.approx(float((top1 == dense_top1).float().mean()), abs=1e-6)
    assert pruned["agreement_unlabelled"] == pytest.approx(float((top1[~lab] == dense_top1[~lab]).float().mean()), abs=1e-6)
    assert 0.0 < pruned["agreement"] < 1.0  # 60% of every block linear is gone: some predictions moved

    report = module.metrics_report(dense, pruned)
    assert report["accuracy"]["top1"] == {"dense": dense["top1"], "pruned": pruned["top1"]}
    assert set(report["accuracy"]) >= {"top1", "top5", "agreement"}
    assert "agreement" in module.metrics_line(dense, pruned)


def test_pruning_callback_bias_correction_moves_batchnorm_means_only(image_root):
    """The callback passes bias_correction to the engine: on an EfficientNet-class net the running mean
    of exactly the BatchNorms fed by pruned 1x1 convs moves, and the state-dict keys stay the same."""
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule

    torch.manual_seed(0)
    module = _classifier("mobilenetv2_035", num_classes=3, convs=True, calibration_batch_size=4)
    keys = set(module.model.state_dict())
    before = {n: m.running_mean.clone() for n, m in module.model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    dm = ImageFolderDataModule(root=str(image_root), nsamples=6, batch_size=4)
    dm.prepare_for(module)
    pruning = Pruning(method="magnitude", sparsity_ratio=0.5, bias_correction=True, enabled=True)
    _trainer(callbacks=[pruning, Calibration(propagate=False)]).validate(module, datamodule=dm, verbose=False)
    moved = {n for n, m in module.model.named_modules()
             if isinstance(m, nn.BatchNorm2d) and not torch.equal(m.running_mean, before[n])}
    fed = {n.rsplit(".", 1)[0] + ("." + {"conv_pw": "bn1", "conv_pwl": "bn3"}[n.rsplit(".", 1)[1]]
                                  if not n.startswith("blocks.0.") else ".bn2") for n in pruning.masks}
    assert moved == fed and len(fed) == len(pruning.masks) > 10
    assert set(module.model.state_dict()) == keys
    assert all(m.float().mean() == pytest.approx(0.5, abs=0.01) for m in pruning.masks.values())


def test_save_and_reload_keeps_the_pruned_weights(tmp_path):
    from wanda_pl.modules.classifier import Classifier

    module = _tiny_vit(num_classes=4, seed=2)
    with torch.no_grad():
        module.model.blocks[0].mlp.fc1.weight[:, ::2] = 0
    module.save(tmp_path / "m")
    again = Classifier(checkpoint_path=str(tmp_path / "m"))
    assert again.timm_name == "vit_tiny_patch16_224" and again.num_classes == 4
    for (k, a), (_, b) in zip(module.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(module(x), again(x))


def test_data_config_override_reaches_the_transform_and_survives_save(tmp_path):
    from wanda_pl.data.images import pixel_transform
    from wanda_pl.modules.classifier import Classifier

    def resize_of(module):
        steps = pixel_transform(module.data_config).transforms
        return next(s.size for s in steps if type(s).__name__ == "Resize")

    plain = _tiny_vit(num_classes=3)
    assert plain.data_config["crop_pct"] == 0.9 and resize_of(plain) in (35, [35])  # 32 / 0.9: a crop
    module = Classifier(name="vit_tiny_patch16_224", num_classes=3, model_kwargs=dict(img_size=32, patch_size=8,
                        embed_dim=32, depth=2, num_heads=2), data_config={"crop_pct": 1.0, "mean": [0.5] * 3})
    assert module.data_config["crop_pct"] == 1.0 and resize_of(module) in (32, [32])
    assert module.pixel_mean.tolist() == [0.5] * 3 and module.describe()["data_config"]["crop_pct"] == 1.0
    module.save(tmp_path / "m")
    again = Classifier(checkpoint_path=str(tmp_path / "m"))
    assert again.data_config == module.data_config  # the folder brings its transform back
    assert Classifier(checkpoint_path=str(tmp_path / "m"), data_config={"crop_pct": 0.875}).data_config["crop_pct"] == 0.875
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['crop'\].*crop_pct"):
        Classifier(name="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1,
                   num_heads=2), data_config={"crop": 1.0})
    with pytest.raises(ValueError, match=r"mean must be a list of 3"):
        Classifier(name="vit_tiny_patch16_224", model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=1,
                   num_heads=2), data_config={"mean": [0.5]})


def test_lukemelas_mapping_checks_every_shape():
    import timm

    from wanda_pl.data.assets import AssetError
    from wanda_pl.data.vision_assets import convert_lukemelas_state_dict

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    src = {f"_renamed_{i}" + (".num_batches_tracked" if k.endswith("num_batches_tracked") else ""): v.clone()
           for i, (k, v) in enumerate(model.state_dict().items())}
    out = convert_lukemelas_state_dict(src, model)
    assert list(out) == [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    first = next(iter(src))
    src[first] = src[first][:1]
    with pytest.raises(AssetError, match="shape mismatch"):
        convert_lukemelas_state_dict(src, model)


# --------------------------------------------------------------------------- slow: DDP and the real model

DDP_SCRIPT = textwrap.dedent("""
    import json, sys
    import lightning as L
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule
    from wanda_pl.modules.classifier import Classifier

    ckpt, root, devices, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    module = Classifier(checkpoint_path=ckpt, calibration_batch_size=4)
    dm = ImageFolderDataModule(root=root, nsamples=8, batch_size=2, unlabelled=root + "/extra")
    pruning = Pruning(method="wanda", sparsity_ratio=0.6)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[pruning, Calibration(propagate=False)])
    trainer.validate(module, datamodule=dm, verbose=False)
    dense = dict(module.last_metrics)
    pruning.enabled = True
    trainer.validate(module, datamodule=dm, verbose=False)
    if trainer.is_global_zero:
        json.dump({"dense": dense, "pruned": module.last_metrics, "world": trainer.world_size}, open(out, "w"))
""")


@pytest.mark.slow
def test_one_and_two_devices_give_equal_metrics(image_root, tmp_path):
    _tiny_vit(num_classes=6, seed=2).save(tmp_path / "ckpt")
    script = tmp_path / "ddp_validate.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"metrics{devices}.json"
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt"), str(image_root), str(devices), str(out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = json.loads(out.read_text())
    assert results[2]["world"] == 2
    for phase in ("dense", "pruned"):
        one, two = results[1][phase], results[2][phase]
        assert one["images"] == two["images"] == 10  # 10 images over 2 ranks: no padding, none lost
        for key in ("top1", "top5", "agreement", "agreement_unlabelled", "top1_correct"):
            assert one[key] == pytest.approx(two[key], abs=1e-6), (phase, key, one, two)
    assert 0.0 < results[1]["pruned"]["agreement"] < 1.0  # a non-trivial agreement was compared


@pytest.mark.slow
def test_embedded_efficientnet_lite0_validates_at_least_17_of_20():
    from wanda_pl.data.images import ImageFolderDataModule
    from wanda_pl.modules.classifier import Classifier

    module = Classifier(embedded="efficientnet-lite0", convs=True)
    assert module.timm_name == "tf_efficientnet_lite0"
    assert sum(p.numel() for p in module.model.parameters()) == 4_652_008
    targets = module.all_targets()
    assert len(targets) == 31 and all(n.endswith(("conv_pw", "conv_pwl")) for n in targets)
    dm = ImageFolderDataModule(root="imagenet-photos", nsamples=4, batch_size=10)
    _trainer().validate(module, datamodule=dm, verbose=False)
    metrics = module.last_metrics
    assert metrics["labelled"] == 20
    assert metrics["top1_correct"] >= 17, metrics
    assert metrics["top5"] >= 0.9, metrics


def test_fit_trains_in_train_mode_and_keeps_the_masks(tmp_path):
    """Fine-tuning a pruned conv net: BatchNorm and dropout train (the module is built in eval mode),
    every pruned weight stays zero through AdamW with weight decay, and the losses are recorded."""
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.images import ImageFolderDataModule

    rng = np.random.default_rng(3)
    for split, n in (("train", 4), ("val", 2)):
        for cls in range(3):
            for i in range(n):
                _write_png(tmp_path / "img" / split / str(cls) / f"{i}.png", rng)
    torch.manual_seed(0)
    module = _classifier("mobilenetv2_035", num_classes=3, convs=True, learning_rate=1e-2, weight_decay=0.1,
                         calibration_batch_size=4)
    dm = ImageFolderDataModule(root=str(tmp_path / "img"), nsamples=8, batch_size=4, seed=0)
    dm.prepare_for(module)
    modes = []
    step = module.training_step
    module.training_step = lambda batch, batch_idx: (modes.append(module.model.training), step(batch, batch_idx))[1]
    bn = next(m for m in module.model.modules() if isinstance(m, nn.BatchNorm2d))
    bn_before = bn.running_mean.clone()
    pruning = Pruning(method="wanda", sparsity_ratio=0.5, enabled=True)
    trainer = _trainer(max_steps=4, max_epochs=-1, callbacks=[pruning, Calibration()])
    trainer.fit(module, datamodule=dm)

    assert modes == [True] * 4 and not module.model.training  # trained in train mode, left in eval mode
    assert not torch.equal(bn.running_mean, bn_before)  # BatchNorm statistics followed the training batches
    assert len(module.train_losses) == 4
    assert pruning.masks and set(pruning.masks) == set(module.all_targets())
    for name, mask in pruning.masks.items():
        w = module.model.get_submodule(name).weight
        assert bool((w[mask] == 0).all()) and bool((w[~mask] != 0).any()), name
