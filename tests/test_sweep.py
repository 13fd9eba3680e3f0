"""cli.py sweep (a grid of points, resumable), the plots, the loggers and the model card."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

import wanda_pl.commands.prune as prune_command
import wanda_pl.commands.sweep as sweep_command
from conftest import ROOT, run_cli
from test_vision import image_root  # noqa: F401  (the tiny image folder fixture)
from wanda_pl.commands.card import base_of, front_matter, model_card
from wanda_pl.commands.plots import DPI, METRIC_SIZE, layers_png, layers_size, metric_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEQLEN, NSAMPLES, WINDOWS = 32, 4, 4


def args(command, model_dir, text_file, out, *extra):
    return [command, "--model.name_or_path", str(model_dir), "--data.calibration", str(text_file),
            "--data.evaluation", str(text_file), "--data.nsamples", str(NSAMPLES), "--data.seqlen", str(SEQLEN),
            "--data.max_eval_windows", str(WINDOWS), "--trainer.enable_progress_bar", "false",
            "--output_dir", str(out), *extra]


GRID = ("--sweep.methods", "[magnitude,wanda]", "--sweep.ratios", "[0.3,0.6]", "--sweep.types", "[unstructured,2:4]")
POINTS = ["magnitude-unstructured-0.3", "wanda-unstructured-0.3", "magnitude-unstructured-0.6",
          "wanda-unstructured-0.6", "magnitude-2of4", "wanda-2of4"]


@pytest.fixture
def prune_calls(monkeypatch):
    """The points that really ran (prune called), by output folder name."""
    calls = []
    real = sweep_command.prune

    def spy(trainer, model, datamodule, output_dir, *a, **k):
        calls.append(Path(output_dir).name)
        return real(trainer, model, datamodule, output_dir, *a, **k)

    monkeypatch.setattr(sweep_command, "prune", spy)
    return calls


@pytest.fixture
def validations(monkeypatch):
    calls = []
    import lightning.pytorch as pl

    real = pl.Trainer.validate

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(pl.Trainer, "validate", spy)
    return calls


def _png(path):
    with Image.open(path) as im:
        im.load()
        return im.size, im.tobytes()


def test_sweep_writes_rows_equal_to_each_points_report(tiny_dirs, text_file, tmp_path, prune_calls, validations):
    out = tmp_path / "sweep"
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *GRID))
    assert err is None, err
    assert prune_calls == POINTS  # "2:4" unquoted: YAML's base-60 124 read back as 2:4
    assert len(validations) == 1 + len(POINTS)  # the dense baseline once, then each pruned model
    with open(out / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["point"] for r in rows] == [r["point"] for r in summary["rows"]] == POINTS
    dense = json.loads((out / "dense.json").read_text())["metrics"]["ppl"]
    for row, jrow in zip(rows, summary["rows"]):
        report = json.loads((out / row["point"] / "report.json").read_text())
        for key in ("method", "sparsity_type", "allocation"):
            assert row[key] == jrow[key] == report[key]
        for key in ("sparsity_ratio", "actual_sparsity"):
            assert float(row[key]) == jrow[key] == report[key], key  # repr round-trips a float exactly
        for key, side in (("ppl", "pruned"), ("ppl_dense", "dense")):  # the CSV's columns as before
            assert float(row[key]) == jrow[key] == report["metrics"]["ppl"][side], key
        assert float(row["time_total_s"]) == report["time_s"]["total"]
        assert report["metrics"]["ppl"]["dense"] == dense
        assert report["sweep"]["point"] == row["point"]
        assert (out / row["point"] / "layers.png").is_file()
    assert {r["sparsity_type"] for r in rows} == {"unstructured", "2:4"}
    assert summary["grid"]["types"] == ["unstructured", "2:4"]  # recorded as meant, not as YAML's 124
    assert summary["dense"]["ppl"] == dense
    size, _ = _png(out / "ppl_vs_sparsity.png")
    assert size == (int(METRIC_SIZE[0] * DPI), int(METRIC_SIZE[1] * DPI))
    w, h = layers_size(2, 7)  # tiny Llama: 2 blocks, q k v o gate up down
    assert _png(out / POINTS[0] / "layers.png")[0] == (round(w * DPI), round(h * DPI))
    # The folder is ours as a whole: a second identical sweep runs nothing and is not refused.
    prune_calls.clear()
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *GRID))
    assert err is None, err
    assert prune_calls == []
    assert all(r["resumed"] for r in json.loads((out / "sweep.json").read_text())["rows"])


def test_interrupted_sweep_resumes_without_recomputing(tiny_dirs, text_file, tmp_path, prune_calls, monkeypatch):
    out = tmp_path / "sweep"
    real = prune_command.prune
    ran = []

    def second_point_interrupted(trainer, model, datamodule, output_dir, *a, **k):
        if ran:
            raise KeyboardInterrupt  # Ctrl-C during the second point
        ran.append(1)
        return real(trainer, model, datamodule, output_dir, *a, **k)

    monkeypatch.setattr(sweep_command, "prune", second_point_interrupted)
    grid = ("--sweep.methods", "[magnitude,wanda]", "--sweep.ratios", "[0.5]")
    with pytest.raises(KeyboardInterrupt):
        run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid))
    first = out / "magnitude-unstructured-0.5" / "report.json"
    before = first.read_bytes()
    assert not (out / "wanda-unstructured-0.5").exists()
    monkeypatch.setattr(sweep_command, "prune", real)
    calls = []

    def spy(trainer, model, datamodule, output_dir, *a, **k):
        calls.append(Path(output_dir).name)
        return real(trainer, model, datamodule, output_dir, *a, **k)

    monkeypatch.setattr(sweep_command, "prune", spy)
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid))
    assert err is None, err
    assert calls == ["wanda-unstructured-0.5"]
    assert first.read_bytes() == before
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["point"], r["resumed"]) for r in rows] == [("magnitude-unstructured-0.5", True),
                                                          ("wanda-unstructured-0.5", False)]
    # Other settings for the same point names: run again, not kept.
    calls.clear()
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid, "--seed_everything", "1"))
    assert err is None, err
    assert calls == ["magnitude-unstructured-0.5", "wanda-unstructured-0.5"]


def test_sweep_point_of_a_model_changed_on_disk_runs_again(tiny_dirs, text_file, tmp_path, prune_calls):
    """The same path, other weights (another revision saved over it): a finished point is not kept,
    and the output says which file changed; the untouched model keeps it."""
    import shutil

    from conftest import tiny_model

    model, out = tmp_path / "model", tmp_path / "sweep"
    shutil.copytree(tiny_dirs["llama"], model)
    grid = ("--sweep.methods", "[wanda]", "--sweep.ratios", "[0.5]")
    assert run_cli(args("sweep", model, text_file, out, *grid))[0] is None
    report = out / "wanda-unstructured-0.5" / "report.json"
    before = json.loads(report.read_text())
    assert run_cli(args("sweep", model, text_file, out, *grid))[0] is None
    assert prune_calls == ["wanda-unstructured-0.5"]  # the same files: kept
    tiny_model("llama", seed=1).save_pretrained(model)
    err, printed = run_cli(args("sweep", model, text_file, out, *grid))
    assert err is None, err
    assert prune_calls == ["wanda-unstructured-0.5"] * 2
    line = next(line for line in printed.splitlines() if line.startswith("wanda-unstructured-0.5: run again"))
    assert line.startswith("wanda-unstructured-0.5: run again: the model changed since it ran (")
    assert "'model.safetensors' (its content differs)" in line
    after = json.loads(report.read_text())
    assert after["sweep"]["model_files"]["model.safetensors"] != before["sweep"]["model_files"]["model.safetensors"]
    assert after["metrics"]["ppl"]["dense"] != before["metrics"]["ppl"]["dense"]


def test_sweep_resumes_from_a_point_report_written_before_metrics_were_declared(tiny_dirs, text_file, tmp_path,
                                                                                prune_calls):
    """A point report of the old shape (``ppl`` / ``ppl_dense`` flat) is kept and tabled as before."""
    out = tmp_path / "sweep"
    assert run_cli(args("sweep", tiny_dirs["llama"], text_file, out, "--sweep.methods", "[wanda]",
                        "--sweep.ratios", "[0.5]"))[0] is None
    path = out / "wanda-unstructured-0.5" / "report.json"
    new = json.loads(path.read_text())
    old = {k: v for k, v in new.items() if k != "metrics"}
    old.update(ppl_dense=new["metrics"]["ppl"]["dense"], ppl=new["metrics"]["ppl"]["pruned"])
    old["sections"]["results"] = [k for k in new["sections"]["results"] if k != "metrics"] + ["ppl_dense", "ppl"]
    path.write_text(json.dumps(old))
    assert run_cli(args("sweep", tiny_dirs["llama"], text_file, out, "--sweep.methods", "[wanda]",
                        "--sweep.ratios", "[0.5,0.6]"))[0] is None
    assert prune_calls == ["wanda-unstructured-0.5", "wanda-unstructured-0.6"]  # the old point kept
    with open(out / "sweep.csv", newline="") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert rows["wanda-unstructured-0.5"]["resumed"] == "True"
    assert float(rows["wanda-unstructured-0.5"]["ppl"]) == old["ppl"]
    assert float(rows["wanda-unstructured-0.5"]["ppl_dense"]) == old["ppl_dense"]
    assert float(rows["wanda-unstructured-0.6"]["ppl_dense"]) == old["ppl_dense"]


def test_sweep_killed_between_a_points_commit_and_its_claim_resumes(tiny_dirs, text_file, tmp_path, prune_calls):
    """The window a SIGKILL can hit: the point's folder is in place, the sweep's marker does not
    list it yet. The rerun takes the point back (its own marker lists all it holds) and keeps it."""
    from wanda_pl.commands.outputs import MARKER

    out = tmp_path / "sweep"
    grid = ("--sweep.methods", "[magnitude]", "--sweep.ratios", "[0.5]")
    assert run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid))[0] is None
    marker = json.loads((out / MARKER).read_text())
    marker["entries"] = [e for e in marker["entries"] if not e.startswith("magnitude-unstructured-0.5")]
    (out / MARKER).write_text(json.dumps(marker))
    before = (out / "magnitude-unstructured-0.5" / "report.json").read_bytes()
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid))
    assert err is None, err
    assert prune_calls == ["magnitude-unstructured-0.5"]  # run once, then kept
    assert (out / "magnitude-unstructured-0.5" / "report.json").read_bytes() == before
    # a file a user put into the point meanwhile is not taken: the folder is still refused
    marker["entries"] = [e for e in marker["entries"] if not e.startswith("magnitude-unstructured-0.5")]
    (out / MARKER).write_text(json.dumps(marker))
    (out / "magnitude-unstructured-0.5" / "notes.txt").write_text("mine")
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *grid))
    assert err is not None and "holds files this program did not write" in err
    assert (out / "magnitude-unstructured-0.5" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_sweep_killed_outright_resumes(tiny_dirs, text_file, tmp_path):
    """SIGKILL after the first point (no cleanup at all): the rerun keeps that point, removes the
    second point's stage left behind, and runs only the rest."""
    out = tmp_path / "sweep"
    grid = ("--sweep.methods", "[magnitude,wanda]", "--sweep.ratios", "[0.5]")
    cmd = [sys.executable, str(ROOT / "cli.py"), *args("sweep", tiny_dirs["llama"], text_file, out, *grid)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "magnitude-unstructured-0.5" / "report.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists()
    before = first.read_bytes()
    (out / ".wanda-unstructured-0.5.partial.abc12345").mkdir(exist_ok=True)  # as a kill mid-point leaves it
    err, stdout = run_cli(cmd[2:])  # the rerun: the same command, in this process (only the kill needs one)
    assert err is None, err
    assert first.read_bytes() == before
    assert "magnitude-unstructured-0.5: finished before with the same settings, kept" in stdout
    assert not list(out.glob(".*.partial.*"))
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["point"] for r in rows] == ["magnitude-unstructured-0.5", "wanda-unstructured-0.5"]


@pytest.mark.parametrize("extra, expected", [
    (("--sweep.methods", "[]"), "sweep.methods is empty"),
    (("--sweep.ratios", "[0.3,1.5]"), "sweep point wanda-unstructured-1.5"),
    (("--sweep.types", "[unstructured,2:4]", "--pruning.use_variant", "true"), "sweep point wanda-2of4"),
    (("--sweep.methods", "[wanda,nonsense]"), "sweep point nonsense-unstructured-0.5"),
    (("--sweep.methods", "[wanda+admm,sparsegpt+admm]"), "sweep point sparsegpt+admm-unstructured-0.5"),
    (("--sweep.methods", "[magnitude,wanda]", "--pruning.bias_correction", "true"), "sweep point magnitude-unstructured-0.5"),
    (("--sweep.structures", "[none,sideways]"), "sweep.structures: 'sideways' is none of none, width, depth"),
    (("--sweep.structures", "[width]", "--sweep.methods", "[sparsegpt]"), "none of the methods ['sparsegpt'] scores"),
    (("--sweep.structures", "[depth]"), "sweep.structures has depth: give sweep.blocks"),
    (("--sweep.structures", "[depth]", "--sweep.blocks", "[1,2]"), "sweep point depth-2"),
    (("--sweep.structures", "[width]", "--sweep.ratios", "[0.2,0.4]", "--pruning.width_mlp", "0.1",
      "--pruning.width_heads", "0"), "leaves the ratios nothing"),
])
def test_bad_grid_refused_before_any_point(tiny_dirs, text_file, tmp_path, validations, extra, expected):
    out = tmp_path / "sweep"
    err, _ = run_cli(args("sweep", tiny_dirs["llama"], text_file, out, *extra))
    assert err is not None and expected in err, err
    assert validations == []
    assert not out.exists()


def test_plots_differ_when_data_differ(tmp_path):
    rows = [{"point": f"wanda-{r}", "method": "wanda", "allocation": "uniform", "sparsity_type": "unstructured",
             "actual_sparsity": r, "ppl": 20 + 100 * r ** 3} for r in (0.3, 0.5, 0.7)]
    rows.append({"point": "wanda-2of4", "method": "wanda", "allocation": "uniform", "sparsity_type": "2:4",
                 "actual_sparsity": 0.5, "ppl": 60.0})
    a = _png(metric_png(tmp_path / "a.png", rows, "ppl", "perplexity", 19.0, log=True))
    b = _png(metric_png(tmp_path / "b.png", [{**r, "ppl": r["ppl"] * 1.5} for r in rows], "ppl", "perplexity", 19.0,
                        log=True))
    a2 = _png(metric_png(tmp_path / "a2.png", rows, "ppl", "perplexity", 19.0, log=True))
    assert a[0] == b[0] == (800, 500)
    assert a[1] != b[1]
    assert a[1] == a2[1]  # the same data draw the same picture
    layers = {f"model.layers.{i}.{t}": 0.5 + 0.01 * i for i in range(4) for t in ("q", "k", "mlp.up")}
    la = _png(layers_png(tmp_path / "la.png", layers, layers))
    lb = _png(layers_png(tmp_path / "lb.png", {**layers, "model.layers.2.q": 0.9}, layers))
    w, h = layers_size(4, 3)
    assert la[0] == lb[0] == (round(w * DPI), round(h * DPI))
    assert la[1] != lb[1]


def test_prune_logs_to_the_users_logger(tiny_dirs, text_file, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    err, _ = run_cli(args("prune", tiny_dirs["llama"], text_file, out, "--trainer.logger",
                          "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs)))
    assert err is None, err
    report = json.loads((out / "report.json").read_text())
    (metrics_file,) = logs.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics_file, newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("actual_sparsity")]
    assert len(logged) == 1
    row = logged[0]
    assert float(row["ppl"]) == pytest.approx(report["metrics"]["ppl"]["pruned"], rel=1e-12)
    assert float(row["ppl_dense"]) == pytest.approx(report["metrics"]["ppl"]["dense"], rel=1e-12)
    assert float(row["actual_sparsity"]) == pytest.approx(report["actual_sparsity"], rel=1e-12)
    assert float(row["time_s/prune"]) == report["time_s"]["prune"]
    for name, value in report["layers"].items():
        assert float(row[f"sparsity/{name}"]) == pytest.approx(value, rel=1e-12)
    hparams = yaml.safe_load(next(logs.glob("lightning_logs/version_*/hparams.yaml")).read_text())
    assert hparams["method"] == "wanda" and hparams["nsamples"] == NSAMPLES


def test_saved_model_has_a_card_with_the_reports_numbers(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "run"
    err, _ = run_cli(args("prune", tiny_dirs["llama"], text_file, out, "--save_model", "true",
                          "--pruning.sparsity_type", "2:4"))
    assert err is None, err
    report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "model" / "report.json").read_text()) == report
    card = (out / "model" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(tiny_dirs["llama"])
    assert {"pruned", "wanda", "2-4-sparsity", "sparsity-50"} <= set(meta["tags"])
    metrics = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    ppl = report["metrics"]["ppl"]
    assert metrics == {"perplexity (pruned)": ppl["pruned"], "perplexity (dense)": ppl["dense"]}
    assert f"{ppl['pruned']:.3f}" in card and str(out / "model") in card
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # the card and report beside the weights do not hurt


def test_card_names_the_original_base_and_its_license(tmp_path):
    embedded = {"model": "smollm2-135m", "model_path": "/nowhere", "method": "wanda", "sparsity_type": "unstructured",
                "actual_sparsity": 0.5, "ppl": 40.0, "ppl_dense": 20.0}
    assert base_of(embedded) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    first = tmp_path / "pruned"
    first.mkdir()
    (first / "README.md").write_text(model_card(embedded, str(first)))
    again = {**embedded, "model": str(first), "model_path": str(first)}  # e.g. fine-tuning the pruned folder
    assert base_of(again) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    foreign = tmp_path / "hub"
    foreign.mkdir()
    (foreign / "README.md").write_text("---\nlicense: llama2\n---\n# Llama\n")
    assert base_of({**embedded, "model": "meta-llama/Llama-2-7b-hf", "model_path": str(foreign)}) == \
        ("meta-llama/Llama-2-7b-hf", "llama2")
    fit = {**embedded, "metrics_before": {"ppl": 40.0}, "metrics_after": {"ppl": 30.0}, "sparsity_after": 0.5,
           "finetune": "lora", "steps": 10}
    meta = front_matter(model_card(fit, "x/model"))
    assert "fine-tuned" in meta["tags"]
    values = {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert values == {"perplexity (after)": 30.0, "perplexity (before fine-tuning)": 40.0}


def test_classifier_sweep_plots_top1_and_agreement(image_root, tmp_path):
    """A vision sweep through the API: the rows' top-1 and agreement are the points' reports', the
    agreement is against the one dense pass (1.0 for a point that prunes nothing)."""
    from test_vision import _tiny_vit, _trainer

    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.commands.sweep import Grid, sweep
    from wanda_pl.data.images import ImageFolderDataModule

    module = _tiny_vit(num_classes=3)
    dm = ImageFolderDataModule(root=str(image_root), nsamples=4, batch_size=4)
    trainer = _trainer(callbacks=[Pruning(), Calibration()])
    summary = sweep(trainer, module, dm, Grid(methods=["magnitude", "wanda"], ratios=[0.0, 0.6]), str(tmp_path / "s"))
    rows = {r["point"]: r for r in summary["rows"]}
    assert set(rows) == {"magnitude-unstructured-0", "wanda-unstructured-0", "magnitude-unstructured-0.6",
                         "wanda-unstructured-0.6"}
    for name, row in rows.items():
        report = json.loads((tmp_path / "s" / name / "report.json").read_text())
        assert row["top1"] == report["metrics"]["top1"]["pruned"]
        assert row["agreement"] == report["metrics"]["agreement"]["pruned"]
        assert row["top1_dense"] == summary["dense"]["top1"]
    assert rows["wanda-unstructured-0"]["agreement"] == 1.0 and rows["wanda-unstructured-0"]["actual_sparsity"] == 0
    assert rows["wanda-unstructured-0.6"]["actual_sparsity"] > 0.5
    for name in ("top1_vs_sparsity.png", "agreement_vs_sparsity.png"):
        assert _png(tmp_path / "s" / name)[0] == (800, 500)
    assert not (tmp_path / "s" / "ppl_vs_sparsity.png").exists()


def test_sweep_leaves_the_module_dense(tiny_dirs, text_file, tmp_path):
    """Called on a loaded module (as the benchmarks do), a second sweep must start from the dense
    weights again, not from the first sweep's last point."""
    import lightning as L
    import torch

    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.data.text_module import TextDataModule
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    dm = TextDataModule(str(text_file), str(text_file), NSAMPLES, SEQLEN, 0, WINDOWS)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Calibration(), Pruning()])
    summary = sweep_command.sweep(trainer, module, dm, sweep_command.Grid(["wanda"], [0.5], ["unstructured"]),
                                  str(tmp_path / "sweep"))
    assert summary["rows"][0]["actual_sparsity"] > 0.4
    after = module.model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
