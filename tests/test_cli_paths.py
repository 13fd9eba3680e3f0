"""Command-line paths end to end on tiny models: every method through the engine and the CLI against
slow references written here, granularity, targets/ignore, dtypes, validate on a saved folder,
zero-shot in the prune report (one process and Lightning DDP), ``cli.py assets``, natural-images."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_cli
from test_cli import base_args, load_saved, simple_ppl
from test_sparsegpt import rel_err, slow_lowest, slow_nm_mask, slow_obs, slow_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEQLEN, WINDOWS = 32, 4  # those of test_cli.base_args


def prune(model_dir, text_file, out, *extra):
    error, stdout = run_cli(base_args(model_dir, text_file, out, "--save_model", "true", *extra))
    assert error is None, error
    return json.loads((out / "report.json").read_text()), stdout


def block_of(name: str) -> int:
    return int(name.split("model.layers.", 1)[1].split(".", 1)[0])


# --------------------------------------------------------------------------- an independent replay
def replay_layer_inputs(dense, pruned, ids, b):
    """The inputs every linear of block ``b`` saw during pruning: blocks < b as pruned (the saved
    model's), block b and later still dense, each calibration window run on its own."""
    hybrid, _ = load_saved(dense)
    pstate = pruned.state_dict()
    with torch.no_grad():
        for name, p in hybrid.named_parameters():
            if name.startswith("model.layers.") and block_of(name) < b:
                p.copy_(pstate[name])
    seen = {}
    linears = {n: m for n, m in hybrid.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(f"model.layers.{b}.")}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
             for n, m in linears.items()]
    with torch.no_grad():
        for row in ids:
            hybrid(input_ids=row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: (linears[n].weight.detach().clone(), xs) for n, xs in seen.items()}


def scaler_row(xs):
    """Mean over windows of the squared input norm per column, fp32 like the statistics."""
    sq = torch.zeros(xs[0].shape[1])
    for x in xs:
        sq += (x.float() * x.float()).sum(0)
    return sq / len(xs)


def hessian64(xs):
    X = torch.cat(xs).double()
    return 2.0 * X.t() @ X / len(xs)


def slow_row(score, k):
    return torch.stack([slow_lowest(score[r:r + 1], k)[0] for r in range(score.shape[0])])


def expected_layer(method, spec, W, xs):
    """(mask, new weight) of one layer as the method's definition says, slowly."""
    rows, cols = W.shape
    if method == "wanda-layer":
        score = W.abs() * scaler_row(xs).sqrt().unsqueeze(0)
        return slow_lowest(score, int(W.numel() * spec.ratio)), None
    H = hessian64(xs)
    if method == "sparsegpt":
        return slow_select(W, H, spec, 128)
    if method in ("ablate_mag_seq", "ablate_wanda_seq"):
        if spec.structured:
            score = W.abs() if method == "ablate_mag_seq" else W.abs() * scaler_row(xs).sqrt().unsqueeze(0)
            mask = slow_nm_mask(score, spec.n, spec.m)
        elif method == "ablate_mag_seq":  # magnitude: one threshold per layer
            mask = slow_lowest(W.abs(), int(W.numel() * spec.ratio))
        else:  # wanda: per output row
            mask = slow_row(W.abs() * scaler_row(xs).sqrt().unsqueeze(0), int(cols * spec.ratio))
        return mask, slow_obs(W, H, mask)
    norm = scaler_row(xs).double().sqrt()
    crit = (lambda w, c: w.abs()) if method == "ablate_mag_iter" else (lambda w, c: w.abs() * norm[c])
    return slow_select(W, H, spec, 128, score=crit)


METHODS = [
    ("wanda-layer", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4"),
    ("ablate_mag_seq", "unstructured"), ("ablate_wanda_seq", "unstructured"), ("ablate_wanda_seq", "2:4"),
    ("ablate_mag_iter", "unstructured"), ("ablate_wanda_iter", "unstructured"), ("ablate_mag_iter", "4:8"),
]


@pytest.mark.parametrize("method,sparsity_type", METHODS, ids=[f"{m}-{t}" for m, t in METHODS])
def test_method_through_the_cli_equals_its_slow_definition(tiny_dirs, text_file, tmp_path, method, sparsity_type):
    from wanda_pl.core.sparsity import SparsitySpec

    out = tmp_path / "out"
    extra = ["--pruning.method", "wanda", "--pruning.granularity", "layer"] if method == "wanda-layer" else \
        ["--pruning.method", method]
    report, _ = prune(tiny_dirs["llama"], text_file, out, *extra, "--pruning.sparsity_type", sparsity_type)
    spec = SparsitySpec.parse(sparsity_type, None if ":" in sparsity_type else 0.5)
    assert report["method"] == extra[1] and report["sparsity_type"] == sparsity_type
    if method == "wanda-layer":
        assert report["granularity"] == "layer" and report["method_options"]["granularity"] == "layer"
    else:
        assert report["blocksize"] == 128 and report["percdamp"] == 0.01
    assert report["actual_sparsity"] == 0.5 and set(report["layers"].values()) == {0.5}

    ids = torch.load(out / "calibration_ids.pt", weights_only=True)
    masks = torch.load(out / "masks.pt", weights_only=True)
    pruned, _ = load_saved(out / "model")
    assert len(masks) == 14
    rows_differ = False
    for b in (0, 1):
        for name, (W, xs) in replay_layer_inputs(tiny_dirs["llama"], pruned, ids, b).items():
            got_w = pruned.get_submodule(name).weight.detach()
            assert torch.equal(got_w == 0, masks[name]), name
            want_mask, want_w = expected_layer(method, spec, W, xs)
            assert torch.equal(masks[name], want_mask), name
            if want_w is None:  # Wanda: the kept weights untouched
                assert torch.equal(got_w[~want_mask], W[~want_mask]), name
                rows_differ |= masks[name].sum(1).unique().numel() > 1
            else:  # OBS: the kept weights updated as the reference says
                assert rel_err(got_w, want_w) < 1e-4, (name, rel_err(got_w, want_w))
                assert rel_err(got_w[~want_mask], W[~want_mask]) > 1e-3, name
    if method == "wanda-layer":
        assert rows_differ  # one threshold per layer: rows lose different counts (not row granularity)
    # and the report's perplexity is the saved model's, recomputed from its logits
    assert simple_ppl(pruned, load_saved(out / "model")[1], text_file.read_text(), SEQLEN, WINDOWS) == \
        pytest.approx(report["metrics"]["ppl"]["pruned"], rel=1e-6)


# --------------------------------------------------------------------------- targets / ignore
def test_targets_and_ignore_prune_only_the_selected_layers(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    report, _ = prune(tiny_dirs["llama"], text_file, out, "--model.targets", "[q_proj, mlp\\.down_proj]",
                      "--model.ignore", "[layers\\.1\\.self_attn]")
    want = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert set(report["layers"]) == want and set(report["layers"].values()) == {0.5}
    assert set(torch.load(out / "masks.pt", weights_only=True)) == want
    pruned, _ = load_saved(out / "model")
    dense, _ = load_saved(tiny_dirs["llama"])
    ps, ds = pruned.state_dict(), dense.state_dict()
    for key in ds:
        name = key.rsplit(".", 1)[0]
        if name in want and key.endswith("weight"):
            assert int((ps[key] == 0).sum()) == ps[key].numel() // 2, key
        else:  # every other tensor (the ignored q_proj of block 1 too) exactly dense
            assert torch.equal(ps[key], ds[key]), key
    assert report["actual_sparsity"] == 0.5  # over the targeted layers only


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype,st_name", [("bfloat16", "BF16"), ("float16", "F16")])
def test_half_dtypes_prune_with_fp32_statistics_and_save_as_asked(tiny_dirs, text_file, tmp_path, monkeypatch,
                                                                   dtype, st_name):
    from safetensors import safe_open

    from wanda_pl.core.stats import LayerStats

    seen = []
    real = LayerStats.update

    def spy(self, x, nsamples):
        seen.append(x.dtype)
        real(self, x, nsamples)
        seen.extend([self.sq_sum.dtype, self.col_sum.dtype])

    monkeypatch.setattr(LayerStats, "update", spy)
    out = tmp_path / "out"
    report, _ = prune(tiny_dirs["llama"], text_file, out, "--model.dtype", dtype)
    assert seen and set(seen) == {torch.float32}  # activations and accumulators in fp32
    assert report["dtype"] == dtype and report["actual_sparsity"] == 0.5
    assert all(math.isfinite(v) for v in report["metrics"]["ppl"].values())
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        masks = torch.load(out / "masks.pt", weights_only=True)
        for name, mask in masks.items():
            assert torch.equal(f.get_tensor(f"{name}.weight") == 0, mask), name
    assert set(dtypes.values()) == {st_name}, dtypes
    assert json.loads((out / "model" / "config.json").read_text()).get("dtype", dtype) == dtype


# --------------------------------------------------------------------------- validate
def test_validate_on_the_saved_folders_gives_the_reports_perplexities(tiny_dirs, text_file, tmp_path, monkeypatch):
    import cli

    out = tmp_path / "out"
    report, _ = prune(tiny_dirs["llama"], text_file, out)
    results = []
    real = cli.WandaTrainer.validate

    def spy(self, *args, **kwargs):
        results.append(real(self, *args, **kwargs))
        return results[-1]

    monkeypatch.setattr(cli.WandaTrainer, "validate", spy)
    ppl = report["metrics"]["ppl"]
    for folder, key in ((out / "model", "pruned"), (tiny_dirs["llama"], "dense")):
        error, stdout = run_cli(["validate", "--model.name_or_path", str(folder), "--data.calibration", str(text_file),
                                 "--data.evaluation", str(text_file), "--data.seqlen", str(SEQLEN),
                                 "--data.max_eval_windows", str(WINDOWS), "--trainer.enable_progress_bar", "false"])
        assert error is None, error
        assert results[-1] == [{"ppl": ppl[key]}]  # exactly, not to float32
        assert repr(ppl[key]) in stdout  # and printed so
    assert ppl["pruned"] != ppl["dense"]


# --------------------------------------------------------------------------- zero-shot in the report
def zero_shot_args(task, limit):
    return ["--zero_shot.enabled", "true", "--zero_shot.limit", str(limit), "--zero_shot.tasks", f"[{task}]"]


def hand_accuracy(model, tok, limit):
    from test_zero_shot import DOCS, hand_loglikelihoods

    hits = []
    for q, choices, gold in DOCS[:limit]:
        lls = [hand_loglikelihoods(model, tok, q, c) for c in choices]
        hits.append(max(range(len(lls)), key=lls.__getitem__) == gold)
    return sum(hits) / len(hits)


def test_prune_with_zero_shot_reports_dense_and_pruned(tiny_dirs, text_file, tmp_path):
    from test_zero_shot import write_tiny_task

    task = write_tiny_task(tmp_path)
    out = tmp_path / "out"
    # magnitude 50% changes the answer to the eighth question: dense and pruned differ within the limit
    report, stdout = prune(tiny_dirs["llama"], text_file, out, *zero_shot_args(task, 8),
                           "--pruning.method", "magnitude")
    zs = report["zero_shot"]
    assert set(zs) == {"dense", "pruned"}
    assert zs["dense"]["tasks"]["tiny_mc"]["acc"] != zs["pruned"]["tasks"]["tiny_mc"]["acc"]
    dense, tok = load_saved(tiny_dirs["llama"])
    pruned, _ = load_saved(out / "model")
    for phase, model in (("dense", dense), ("pruned", pruned)):
        res = zs[phase]
        assert res["limit"] == 8 and res["tasks"]["tiny_mc"]["n"] == 8 and res["world_size"] == 1
        assert res["tasks"]["tiny_mc"]["acc"] == pytest.approx(hand_accuracy(model, tok, 8), abs=1e-12), phase
        assert res["mean_acc"] == res["tasks"]["tiny_mc"]["acc"] == report["metrics"]["zero_shot_mean_acc"][phase]
    # the console table: one row per task with both accuracies and the difference, then the mean
    assert "zero-shot accuracy (%):" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("tiny_mc"))
    d, p = (100 * zs[k]["tasks"]["tiny_mc"]["acc"] for k in ("dense", "pruned"))
    assert row.split()[1] == "8" and f"{d:.2f} ±" in row and f"{p:.2f} ±" in row and row.endswith(f"{p - d:+.2f}")
    assert any(line.startswith("mean (acc)") and f"{d:.2f}" in line for line in stdout.splitlines())


def _subprocess_prune(model_dir, text_file, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *base_args(model_dir, text_file, out, *extra)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text()), proc.stdout


@pytest.mark.slow
def test_zero_shot_under_lightning_ddp_equals_one_process(tiny_dirs, text_file, tmp_path):
    """Two CPU processes launched by Lightning (strategy ddp): every rank scores its share of the
    documents, the report holds the one-process accuracies, rank 0 alone prints and writes."""
    from test_zero_shot import write_tiny_task

    task = write_tiny_task(tmp_path)
    common = [*zero_shot_args(task, 9), "--trainer.accelerator", "cpu", "--data.max_eval_windows", "4"]
    one, _ = prune(tiny_dirs["llama"], text_file, tmp_path / "one", *common)
    two, stdout = _subprocess_prune(tiny_dirs["llama"], text_file, tmp_path / "two", *common,
                                    "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert one["devices"] == 1 and two["devices"] == 2
    for phase in ("dense", "pruned"):
        a, b = dict(one["zero_shot"][phase]), dict(two["zero_shot"][phase])
        assert (a.pop("world_size"), b.pop("world_size")) == (1, 2)
        assert a["tasks"]["tiny_mc"]["n"] == 9
        assert a == b, phase
    ppl_one, ppl_two = (r["metrics"]["ppl"]["pruned"] for r in (one, two))
    assert abs(ppl_one - ppl_two) <= 1e-5 * ppl_one
    assert stdout.count("zero-shot accuracy (%):") == 1  # rank 0 only


# --------------------------------------------------------------------------- cli.py assets
def test_assets_command_exit_codes(monkeypatch):
    import contextlib
    import io

    from cli import main
    from wanda_pl.assets import registry

    monkeypatch.setattr(registry, "ensure_all", lambda: {"stub": "/nowhere"})
    error, stdout = run_cli(["assets"])
    assert error is None and json.loads(stdout) == {"stub": "/nowhere"}  # exit code 0
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(args=["assets", "extra"])
    assert exit_info.value.code == 2  # a usage error, as every other; nothing fetched or printed
    assert "usage: python cli.py assets" in f"{exit_info.value.code}{err.getvalue()}" and out.getvalue() == ""


@pytest.mark.slow
def test_assets_command_in_a_process_lists_every_cached_asset():
    from wanda_pl.assets.registry import REGISTRY

    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "assets"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    paths = json.loads(proc.stdout)
    assert sorted(paths) == sorted(REGISTRY)
    assert all(Path(p).is_dir() and (Path(p) / "wanda_pl_manifest.json").is_file() for p in paths.values())
    # (its usage error, exit 2 with nothing printed, is checked in process above)


# --------------------------------------------------------------------------- natural-images
@pytest.mark.slow
def test_natural_images_asset():
    import hashlib

    from wanda_pl.assets import registry
    from wanda_pl.assets.vision_files import CIFAR10, MVTB_PHOTOS
    from wanda_pl.data.image_files import list_images, load_image, pixel_transform
    from wanda_pl.data.images import ImageFolderDataModule

    folder = registry.ensure("natural-images")
    info = json.loads((folder / "dataset.json").read_text())
    files = list_images(folder)
    assert len(files) == info["images"] == 5 * len(MVTB_PHOTOS) + len(CIFAR10) == 305
    assert sum(f.name.startswith("mvtb_") for f in files) == 5 * len(MVTB_PHOTOS)
    digest = {hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert len(digest) == len(files)  # every view is a different image
    photos = registry.ensure("imagenet-photos")
    other = {hashlib.sha256(f.read_bytes()).hexdigest() for f in list_images(photos)}
    assert not digest & other  # disjoint from the calibration and labelled photos
    # it serves as data.unlabelled by its embedded name: 305 images labelled -1 after the 20 photos
    config = {"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
              "mean": (0.5,) * 3, "std": (0.5,) * 3}
    transform = pixel_transform(config)
    dm = ImageFolderDataModule(root="imagenet-photos", unlabelled="natural-images")
    dm.connect(config, num_classes=1000)
    items = dm.evaluation_items()
    assert [label for _, label in items[20:]] == [-1] * 305 and all(label >= 0 for _, label in items[:20])
    assert {p for p, _ in items[20:]} == set(files)
    for f in files[:: 61]:
        img = load_image(f, transform)
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32)


def test_classifier_validate_on_the_saved_folder_gives_the_reports_accuracies(tmp_path, monkeypatch):
    import numpy as np

    import cli
    from test_vision import TINY_VIT, _write_png

    rng = np.random.default_rng(1)
    for i, cls in enumerate([0, 0, 1, 1, 2, 2, 2]):  # 7 labelled images: top-1 in sevenths, not exact in fp32
        _write_png(tmp_path / "img" / "val" / str(cls) / f"{i}.png", rng)
    for i in range(4):
        _write_png(tmp_path / "img" / "train" / f"c{i}.png", rng)
    kwargs = json.dumps({k: v for k, v in TINY_VIT.items() if k != "pretrained"})
    data = ["--data.class_path", "wanda_pl.data.images.ImageFolderDataModule", "--data.root", str(tmp_path / "img"),
            "--data.nsamples", "4", "--data.batch_size", "4", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false"]
    out = tmp_path / "out"
    torch.manual_seed(0)
    error, _ = run_cli(["prune", "--model.class_path", "wanda_pl.modules.classifier.Classifier",
                        "--model.name", "vit_tiny_patch16_224", "--model.num_classes", "6",
                        "--model.model_kwargs", kwargs, "--model.data_config", '{"crop_pct": 1.0}', *data,
                        "--pruning.sparsity_ratio", "0.7", "--save_model", "true", "--output_dir", str(out)])
    assert error is None, error
    report = json.loads((out / "report.json").read_text())
    results = []
    real = cli.WandaTrainer.validate
    monkeypatch.setattr(cli.WandaTrainer, "validate", lambda self, *a, **k: results.append(real(self, *a, **k)) or results[-1])
    error, stdout = run_cli(["validate", "--model.class_path", "wanda_pl.modules.classifier.Classifier",
                             "--model.checkpoint_path", str(out / "model"), *data])
    assert error is None, error
    got = results[-1][0]
    for key in ("top1", "top5"):
        assert got[key] == report["metrics"][key]["pruned"], key  # exactly, not to float32
        assert repr(got[key]) in stdout
    assert any(report["metrics"][k]["pruned"] not in (0.0, 1.0) for k in ("top1", "top5"))  # a fraction to round
