"""A run owns only what it writes: output folders are replaced only when empty or ours, inputs and
special folders never, and every refusal comes before any model is loaded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from wanda_pl.commands import outputs
from wanda_pl.commands.outputs import MARKER, OutputDirError, check_output_dir, config_inputs, staged_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(folder: Path):
    """Every entry under ``folder``: files with their bytes, folders and links by name."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = ("link", os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


def user_files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_bytes(b"precious\x00\xff")
    (folder / "earlier_run").mkdir()
    (folder / "earlier_run" / "report.json").write_text('{"mine": true}')
    return folder


def write_ours(folder: Path, files=("report.json", "model/weights.bin")) -> Path:
    with staged_dir(folder, command="prune") as stage:
        for f in files:
            (stage / f).parent.mkdir(parents=True, exist_ok=True)
            (stage / f).write_text(f"old {f}")
    return folder


# --------------------------------------------------------------------------- the mechanism
def test_new_and_empty_folders_are_written_with_a_marker_listing_every_entry(tmp_path):
    for out in (tmp_path / "a" / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        write_ours(out)
        marker = json.loads((out / MARKER).read_text())
        assert marker["written_by"] == "wanda_pl" and marker["command"] == "prune"
        assert sorted(marker["entries"]) == ["model", "model/weights.bin", "report.json"]
        assert (out / "model" / "weights.bin").read_text() == "old model/weights.bin"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # nothing staged left behind
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["new"]


def test_an_earlier_output_of_ours_is_replaced_whole(tmp_path):
    out = write_ours(tmp_path / "run", files=("report.json", "model/weights.bin", "masks.pt"))
    with staged_dir(out, command="prune") as stage:
        (stage / "report.json").write_text("new")
    assert sorted(snapshot(out)) == [MARKER, "report.json"] and (out / "report.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


FOREIGN = {
    "user folder": lambda d: user_files(d),
    "a report.json alone is not our marker": lambda d: (d.mkdir(), (d / "report.json").write_text("{}")),
    "a forged marker": lambda d: (d.mkdir(), (d / MARKER).write_text('{"written_by": "someone"}'),
                                  (d / "data.bin").write_bytes(b"\x01")),
    "ours, with a file added": lambda d: (write_ours(d), (d / "notes.txt").write_text("mine")),
    "ours, with a file added inside a folder of ours": lambda d: (write_ours(d), (d / "model" / "mine.txt").write_text("m")),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_folder_with_files_we_did_not_write_is_refused_and_kept_byte_for_byte(tmp_path, case):
    out = tmp_path / "runs"
    FOREIGN[case](out)
    before = snapshot(out)
    with pytest.raises(OutputDirError) as err:
        with staged_dir(out, command="prune"):
            raise AssertionError("the body must not run")  # pragma: no cover
    message = str(err.value)
    assert str(out) in message and "choose a new folder" in message and "remove" in message
    first = {"user folder": "earlier_run", "ours, with a file added": "notes.txt",
             "ours, with a file added inside a folder of ours": "model/mine.txt"}.get(case)
    if first:
        assert first in message
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_a_file_or_a_link_as_output_dir_is_refused(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    target = user_files(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "empty_target", target_is_directory=True)
    (tmp_path / "empty_target").mkdir()
    for out in (f, link):
        with pytest.raises(OutputDirError, match="not a folder of ours"):
            check_output_dir(out)
    assert f.read_text() == "mine" and link.is_symlink() and snapshot(target)


def test_the_refusal_names_the_first_entries_and_counts_the_rest(tmp_path):
    out = tmp_path / "many"
    out.mkdir()
    for i in range(9):
        (out / f"f{i}.txt").write_text(str(i))
    (out / "deep").mkdir()
    for i in range(50):
        (out / "deep" / f"x{i}").write_text("x")
    with pytest.raises(OutputDirError) as err:
        check_output_dir(out)
    message = str(err.value)
    assert "deep, f0.txt, f1.txt, f2.txt, f3.txt (and 5 more)" in message  # a foreign folder is named once
    assert "x0" not in message


@pytest.mark.parametrize("which", ["cwd", "parent of cwd", "home", "root"])
def test_special_folders_are_refused_whatever_they_hold(tmp_path, monkeypatch, which):
    home, work = tmp_path / "home", tmp_path / "home" / "projects" / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    # Even an empty folder, or one that is an earlier output of ours, is refused: replacing it
    # would pull the working directory or home folder from under the user.
    write_ours(tmp_path / "ours")
    given = {"cwd": ".", "parent of cwd": "..", "home": "~", "root": "/"}[which]
    before = snapshot(tmp_path)
    with pytest.raises(OutputDirError) as err:
        with staged_dir(given, command="prune"):
            raise AssertionError("the body must not run")  # pragma: no cover
    expected = {"cwd": "is the current working directory", "parent of cwd": "holds the current working directory",
                "home": "is the home folder", "root": "filesystem root"}[which]
    assert expected in str(err.value) and repr(given) in str(err.value)
    assert snapshot(tmp_path) == before


def test_cwd_is_refused_even_when_it_is_an_earlier_output_of_ours(tmp_path, monkeypatch):
    out = write_ours(tmp_path / "run")
    monkeypatch.chdir(out)
    with pytest.raises(OutputDirError, match="current working directory"):
        check_output_dir(out)


def test_a_folder_holding_an_input_is_refused_even_when_it_is_ours(tmp_path):
    out = write_ours(tmp_path / "pruned", files=("report.json", "model/config.json", "masks.pt"))
    before = snapshot(out)
    for name, path in {"model.init_args.name_or_path": out / "model", "pruning.masks_from": out / "masks.pt",
                       "data.init_args.calibration": out / "report.json"}.items():
        with pytest.raises(OutputDirError) as err:
            check_output_dir(out, {name: str(path)})
        assert "would overwrite the input" in str(err.value) and name in str(err.value)
    link = tmp_path / "model-link"  # an input reached through a link still counts
    link.symlink_to(out / "model", target_is_directory=True)
    with pytest.raises(OutputDirError, match="would overwrite the input"):
        check_output_dir(out, {"model": str(link)})
    assert snapshot(out) == before
    check_output_dir(out, {"model": str(tmp_path / "missing")})  # a path that does not exist reads nothing


def test_lightning_writing_inside_the_output_is_refused(tmp_path):
    with pytest.raises(OutputDirError, match="trainer.default_root_dir"):
        check_output_dir(tmp_path / "out", writes={"trainer.default_root_dir": tmp_path / "out" / "logs"})
    check_output_dir(tmp_path / "out", writes={"trainer.default_root_dir": tmp_path / "logs"})


def test_files_added_during_the_run_are_kept_and_so_is_the_result(tmp_path):
    out = write_ours(tmp_path / "run")
    with pytest.raises(OutputDirError) as err:
        with staged_dir(out, command="prune") as stage:
            (stage / "report.json").write_text("new")
            (out / "notes.txt").write_text("written by the user while the run went on")
    assert (out / "notes.txt").read_text().startswith("written by the user")
    assert (out / "report.json").read_text() == "old report.json"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.wanda_pl-")]
    assert len(kept) == 1 and (kept[0] / "report.json").read_text() == "new" and str(kept[0]) in str(err.value)


def test_a_replaced_folder_loses_only_the_entries_its_marker_lists(tmp_path, monkeypatch):
    """Should a file appear between the last check and the swap, it is kept (the old folder stays)."""
    out = write_ours(tmp_path / "run")
    real = outputs._remove_owned

    def late_file(folder, owned):
        (folder / "late.txt").write_text("late")
        real(folder, owned)

    monkeypatch.setattr(outputs, "_remove_owned", late_file)
    with staged_dir(out, command="prune") as stage:
        (stage / "report.json").write_text("new")
    left = [p for p in tmp_path.iterdir() if p.name != "run"]
    assert len(left) == 1 and sorted(snapshot(left[0])) == ["late.txt"]


def test_config_inputs_finds_every_existing_path_in_a_nested_config(tmp_path):
    (tmp_path / "text.txt").write_text("t")
    config = {"model": {"init_args": {"name_or_path": str(tmp_path)}}, "output_dir": str(tmp_path),
              "data": {"init_args": {"calibration": str(tmp_path / "text.txt"), "evaluation": "wikipedia"}},
              "callbacks": [{"path": str(tmp_path / "text.txt")}], "seed": 0}
    assert config_inputs(config) == {"model.init_args.name_or_path": str(tmp_path),
                                     "data.init_args.calibration": str(tmp_path / "text.txt"),
                                     "callbacks.0.path": str(tmp_path / "text.txt")}


# --------------------------------------------------------------------------- through the CLI
@pytest.fixture
def model_loads(monkeypatch):
    """Every model load, recorded: a refusal must come before the first."""
    import wanda_pl.modules.causal_lm as causal_lm

    calls = []
    real = causal_lm.load_causal_lm

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(causal_lm, "load_causal_lm", spy)
    return calls


def prune_args(model, text, out, *extra):
    return ["prune", "--model.name_or_path", str(model), "--data.calibration", str(text),
            "--data.evaluation", str(text), "--data.nsamples", "2", "--data.seqlen", "16",
            "--data.max_eval_windows", "2", "--trainer.enable_progress_bar", "false",
            "--output_dir", str(out), *extra]


def test_cli_prune_refuses_a_user_folder_before_loading_the_model(tiny_dirs, text_file, tmp_path, model_loads):
    runs = user_files(tmp_path / "runs")
    before = snapshot(runs)
    error, _ = run_cli(prune_args(tiny_dirs["llama"], text_file, runs))
    assert error is not None and "did not write" in error and "earlier_run, notes.txt" in error
    assert model_loads == [] and snapshot(runs) == before


@pytest.mark.parametrize("which", ["cwd", "home", "text folder", "model folder"])
def test_cli_prune_refuses_special_and_input_folders_before_loading(tiny_dirs, text_file, tmp_path, monkeypatch,
                                                                    model_loads, which):
    import shutil

    home = tmp_path / "home"
    model = shutil.copytree(tiny_dirs["llama"], tmp_path / "models" / "tiny")
    text = tmp_path / "texts" / "calib.txt"
    text.parent.mkdir()
    text.write_bytes(text_file.read_bytes())
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    (home / "work" / "keep.txt").write_text("keep")
    out = {"cwd": ".", "home": "~", "text folder": text.parent, "model folder": model.parent}[which]
    before = snapshot(tmp_path)
    error, _ = run_cli(prune_args(model, text, out))
    expected = {"cwd": "current working directory", "home": "home folder", "text folder": "data.init_args.calibration",
                "model folder": "model.init_args.name_or_path"}[which]
    assert error is not None and expected in error, error
    assert model_loads == [] and snapshot(tmp_path) == before


def test_cli_prune_replaces_its_own_earlier_output_but_not_one_with_user_files(tiny_dirs, text_file, tmp_path,
                                                                              model_loads):
    out = tmp_path / "run"
    assert run_cli(prune_args(tiny_dirs["llama"], text_file, out))[0] is None
    first = snapshot(out)
    assert {MARKER, "report.json", "calibration_ids.pt"} <= set(first)
    error, _ = run_cli(prune_args(tiny_dirs["llama"], text_file, out, "--pruning.method", "magnitude"))
    assert error is None, error
    assert json.loads((out / "report.json").read_text())["method"] == "magnitude"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    (out / "analysis.ipynb").write_text("the user's notebook")
    before, loads = snapshot(out), len(model_loads)
    error, _ = run_cli(prune_args(tiny_dirs["llama"], text_file, out))
    assert error is not None and "analysis.ipynb" in error and "earlier run" in error
    assert snapshot(out) == before and len(model_loads) == loads


def test_cli_fit_refuses_a_user_folder_and_the_masks_folder_before_loading(tiny_dirs, text_file, tmp_path,
                                                                           model_loads):
    common = ["--data.calibration", str(text_file), "--data.evaluation", str(text_file), "--data.nsamples", "2",
              "--data.seqlen", "16", "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]
    runs = user_files(tmp_path / "runs")
    masks = write_ours(tmp_path / "pruned", files=("report.json", "masks.pt"))
    before = snapshot(tmp_path)
    error, _ = run_cli(["fit", "--model.name_or_path", str(tiny_dirs["llama"]), *common, "--output_dir", str(runs)])
    assert error is not None and "notes.txt" in error
    error, _ = run_cli(["fit", "--model.name_or_path", str(tiny_dirs["llama"]), *common,
                        "--pruning.masks_from", str(masks / "masks.pt"), "--output_dir", str(masks)])
    assert error is not None and "pruning.masks_from" in error and "would overwrite the input" in error
    assert model_loads == [] and snapshot(tmp_path) == before


def test_output_dir_dot_in_a_subprocess_keeps_the_working_directory(tiny_dirs, text_file, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_bytes(b"keep me\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *prune_args(tiny_dirs["llama"], text_file, ".")],
                          capture_output=True, text=True, env=env, cwd=work, timeout=300)
    assert proc.returncode != 0
    assert "output_dir '.' is the current working directory" in proc.stderr, proc.stderr[-2000:]
    assert "Loading weights" not in proc.stderr and "dense baseline" not in proc.stdout  # refused before the load
    assert snapshot(work) == {"keep.txt": b"keep me\n"}
