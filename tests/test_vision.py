"""Image classifiers: conv statistics, image folders, the Classifier (bias correction, saving, data config,
fine-tuning), the embedded model. test_vision_chain (targets, chain) and test_vision_metrics use the helpers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wanda_pl.core.engine import PruneResult, prune_layers
from wanda_pl.core.hooks import collect_stats
from wanda_pl.methods import get_method
from wanda_pl.modules.protocol import PrunableModule, require
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


def _classifier(name, **kw):
    from wanda_pl.modules.classifier import Classifier

    return Classifier(name=name, **kw)


def _block_linears(depth):
    return {f"blocks.{i}.{n}" for i in range(depth) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


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
    prune_layers({"conv": conv}, {"conv": stats["conv"]}, wanda, spec, None, res_conv)
    prune_layers({"linear": linear}, {"linear": stats["linear"]}, wanda, spec, None, res_lin)
    assert res_conv.masks["conv"].shape == conv.weight.shape
    assert torch.equal(res_conv.masks["conv"].reshape(6, -1), res_lin.masks["linear"])
    assert torch.equal(conv.weight.reshape(6, -1), linear.weight)
    assert int((conv.weight == 0).sum()) == 6 * 18  # half of each row's 36 inputs, exactly


# --------------------------------------------------------------------------- data


def test_class_folder_rules():
    from wanda_pl.data.image_files import class_indices

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
    # drawn with replacement from the 5 files: the draw is exactly 12 independent uniform picks of
    # torch.randint under the seed (12 > 5: a sampler without replacement could not even make it),
    # and each calibration image is the pixels of the file it picked
    draw = dm.calibration_draw()
    assert torch.equal(draw, torch.randint(5, (12,), generator=torch.Generator().manual_seed(3)))
    assert len(torch.unique(draw)) < 12
    for i in range(12):
        for j in range(12):
            assert torch.equal(calib[i], calib[j]) == bool(draw[i] == draw[j]), (i, j)
    # as many files as draws: without replacement every seed would give a permutation; with it,
    # seeds 0..19 give repeats (each seed has a chance of 1 - 5!/5^5 = 96%)
    repeats = 0
    for seed in range(20):
        five = ImageFolderDataModule(root=str(image_root), nsamples=5, seed=seed)
        five.prepare_for(module)
        repeats += len(torch.unique(five.calibration_draw())) < 5
    assert repeats >= 15
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
    assert set(module.model.state_dict()) == keys and module.reference is None  # pruned before any dense run
    assert all(int(m.sum()) == int(m.numel() * 0.5) for m in pruning.masks.values())  # magnitude: per layer, exact


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
    given = {k: torch.full_like(v, 0.5) for k, v in module.model.state_dict().items()}  # e.g. gathered shards
    module.save(tmp_path / "given", state_dict=given)
    reloaded = Classifier(checkpoint_path=str(tmp_path / "given")).model.state_dict()
    assert all(torch.equal(v, given[k]) for k, v in reloaded.items())


def test_data_config_override_reaches_the_transform_and_survives_save(tmp_path):
    from wanda_pl.data.image_files import pixel_transform
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

    from wanda_pl.assets.registry import AssetError
    from wanda_pl.assets.vision import convert_lukemelas_state_dict

    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    src = {f"_renamed_{i}" + (".num_batches_tracked" if k.endswith("num_batches_tracked") else ""): v.clone()
           for i, (k, v) in enumerate(model.state_dict().items())}
    out = convert_lukemelas_state_dict(src, model)
    assert list(out) == [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    first = next(iter(src))
    src[first] = src[first][:1]
    with pytest.raises(AssetError, match="shape mismatch"):
        convert_lukemelas_state_dict(src, model)


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
    metrics = module.validation_metrics()
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
    assert isinstance(module, PrunableModule) and require(module) is module
    assert module.finetune_describe() == {"finetune": "full", "learning_rate": 1e-2, "weight_decay": 0.1,
                                          "trainable_params": sum(p.numel() for p in module.model.parameters())}
    module.model.requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        module.configure_optimizers()  # the shared AdamW refuses an empty selection
