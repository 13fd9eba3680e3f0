"""Faults during a run: a user error is one ``error:`` line and exit 2, a crash keeps its traceback;
bad files are refused by name; signals, a full disk, a read-only folder and a second run on the same
output_dir leave nothing half-written, the previous output intact and no staging folder behind."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, plain_argv, run_cli
from test_outputs import prune_args, snapshot, write_ours
from wanda_pl.commands import outputs
from wanda_pl.commands.lock import lock_file, output_lock
from wanda_pl.commands.outputs import staged_dir
from wanda_pl.errors import Interrupted, UserError, interruptible, signals_deferred, user_message

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 256  # rows of the tiny models' embedding


def cli_main(args):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from cli import main

    with plain_argv():
        main(args=list(args))


def refusal(error) -> str:
    """The one ``error:`` line of a run that ``run_cli`` saw exit with 2."""
    assert error is not None and error.startswith("exit 2: "), error
    line = error[len("exit 2: "):].strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in error, error
    return line


def left_beside(parent: Path):
    """What a run left in the output's parent: only the output itself may be there."""
    return sorted(p.name for p in parent.iterdir())


# --------------------------------------------------------------------------- user errors and crashes
def test_a_refusal_is_one_error_line_and_exit_2(tiny_dirs, text_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(prune_args(tiny_dirs["llama"], text_file, tmp_path / "out", "--pruning.sparsity_ratio", "1.0"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.strip().splitlines()[-1] == "error: sparsity ratio must be in [0, 1), got 1.0"
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_the_debug_switch_shows_the_traceback_of_a_user_error(tiny_dirs, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDA_PL_DEBUG", "1")
    with pytest.raises(ValueError, match="sparsity ratio"):
        cli_main(prune_args(tiny_dirs["llama"], text_file, tmp_path / "out", "--pruning.sparsity_ratio", "1.0"))


def test_a_crash_keeps_its_traceback(tiny_dirs, text_file, tmp_path, monkeypatch):
    import wanda_pl.commands.prune as commands

    def broken(*args, **kwargs):
        return {}["a bug"]

    monkeypatch.setattr(commands, "evaluate", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli_main(prune_args(tiny_dirs["llama"], text_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_value_error_from_a_library_is_a_crash_and_ours_a_refusal():
    def library_code():
        return int("not a number")  # raised outside wanda_pl

    with pytest.raises(ValueError) as theirs:
        library_code()
    with pytest.raises(ValueError) as ours:
        staged_dir("").__enter__()
    assert user_message(theirs.value) is None
    assert user_message(ours.value) == "output_dir is empty; give a folder for the run's outputs"
    assert user_message(UserError("anywhere")) == "anywhere"


def test_a_jsonargparse_usage_error_still_exits_2_with_its_message(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["prune", "--trainer.max_epochs", "many"])
    assert exit_.value.code == 2 and "many" in capsys.readouterr().err


@pytest.mark.slow
def test_in_a_subprocess_a_user_error_has_no_traceback_and_debug_brings_it(tiny_dirs, text_file, tmp_path):
    args = [sys.executable, str(ROOT / "cli.py"), *prune_args(tiny_dirs["llama"], text_file, tmp_path / "o",
                                                              "--data.calibration", str(tmp_path))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    plain = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    debug = subprocess.run(args, capture_output=True, text=True, env={**env, "WANDA_PL_DEBUG": "1"}, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr[-2000:]
    assert plain.stderr.strip().splitlines()[-1] == f"error: text file {str(tmp_path)!r} is a folder; give a .txt, .jsonl or .pt file"
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "is a folder" in debug.stderr
    assert left_beside(tmp_path) == []


# --------------------------------------------------------------------------- bad files, refused by name
def _ids(*shape, low=0, high=VOCAB):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(0))


TEXT_FILES = {
    # name -> (how to write it, substrings the refusal must hold besides the file's name)
    "negative.pt": (lambda p: torch.save(_ids(4, 16, low=-5, high=0), p), ["must be in [0, 255]", "e.g. -"]),
    "too-large.pt": (lambda p: torch.save(_ids(4, 16, low=VOCAB, high=VOCAB + 9), p), ["must be in [0, 255]"]),
    "float.pt": (lambda p: torch.save(torch.rand(4, 16), p), ["torch.float32 tensor of shape (4, 16)"]),
    "3d.pt": (lambda p: torch.save(_ids(2, 2, 16), p), ["shape (2, 2, 16)"]),
    "dict.pt": (lambda p: torch.save({"ids": _ids(4, 16)}, p), ["not a dict"]),
    "truncated.pt": (lambda p: (torch.save(_ids(64, 16), p), p.write_bytes(p.read_bytes()[:300])),
                     ["not a token-id file torch can load"]),
    "latin1.txt": (lambda p: p.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200), ["not UTF-8 text", "byte 3"]),
    "binary.txt": (lambda p: p.write_bytes(bytes(range(256)) * 8), ["not UTF-8 text"]),
    "nul.txt": (lambda p: p.write_bytes(b"\x00" * 4096), ["NUL bytes"]),
    "empty.txt": (lambda p: p.write_bytes(b""), ["is empty"]),
    "blank.jsonl": (lambda p: p.write_text("\n  \n"), ["is empty"]),
    "no-text.jsonl": (lambda p: p.write_text('{"text": "fine"}\n{"body": "no text field"}\n'), [":2:", "'text' field"]),
    "not-json.jsonl": (lambda p: p.write_text('{"text": "fine"}\nplain words\n'), [":2:", "not a JSON object"]),
    "list.jsonl": (lambda p: p.write_text('["text"]\n'), [":1:", "'text' field"]),
    "number-text.jsonl": (lambda p: p.write_text('{"text": 12}\n'), [":1:", "is a int, not a string"]),
    "folder.txt": (lambda p: p.mkdir(), ["is a folder"]),
}


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-texts")
    for name, (write, _) in TEXT_FILES.items():
        write(root / name)
    return root


# Every file as calibration; as evaluation, those whose check there is a separate path.
CASES = [(name, "calibration") for name in TEXT_FILES] + [
    (name, "evaluation") for name in ("negative.pt", "too-large.pt", "latin1.txt", "folder.txt")]


@pytest.mark.parametrize("name,which", CASES, ids=[f"{n}-{w}" for n, w in CASES])
def test_a_bad_text_file_is_refused_by_name_before_any_work(tiny_dirs, text_file, bad_texts, tmp_path, name, which):
    bad = bad_texts / name
    error, out = run_cli(prune_args(tiny_dirs["llama"], text_file, tmp_path / "runs" / "out", f"--data.{which}", str(bad)))
    line = refusal(error)
    assert str(bad) in line, line
    for text in TEXT_FILES[name][1]:
        assert text in line, (text, line)
    assert "Traceback" not in error and "dense baseline" not in out
    assert not (tmp_path / "runs").exists()


def _weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    change(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def _set(name, value):
    return lambda w: w[name].view(-1).__setitem__(7, value)


MODEL_FAULTS = {
    # name -> (how to break a copy of the tiny model folder, substrings of the refusal)
    "truncated-weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                          ["could not load its weights", "model.safetensors", "truncated or corrupt"]),
    "no-config": (lambda d: (d / "config.json").unlink(), ["has no config.json"]),
    "broken-config": (lambda d: (d / "config.json").write_text('{"model_type": "llama", "hidd'),
                      ["could not load config.json", "not a valid JSON"]),
    "no-tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")],
                     ["could not load its tokenizer"]),
    "nan-weight": (lambda d: _weights(d, _set("model.layers.1.mlp.up_proj.weight", float("nan"))),
                   ["model.layers.1.mlp.up_proj.weight holds 1 NaN or Inf"]),
    "inf-weight": (lambda d: _weights(d, _set("model.embed_tokens.weight", float("inf"))),
                   ["model.embed_tokens.weight holds 1 NaN or Inf"]),
}


@pytest.mark.parametrize("name", list(MODEL_FAULTS))
def test_a_broken_model_folder_is_refused_by_name_before_any_work(tiny_dirs, text_file, tmp_path, name):
    model = shutil.copytree(tiny_dirs["llama"], tmp_path / "models" / name)
    MODEL_FAULTS[name][0](model)
    error, out = run_cli(prune_args(model, text_file, tmp_path / "runs" / "out"))
    line = refusal(error)
    assert str(model) in line, line
    for text in MODEL_FAULTS[name][1]:
        assert text in line, (text, line)
    assert "dense baseline" not in out and not (tmp_path / "runs").exists()


def test_a_model_path_that_is_a_file_says_so(text_file, tmp_path):
    error, _ = run_cli(prune_args(text_file, text_file, tmp_path / "out"))
    assert error is not None and f"model path {str(text_file)!r} is a file" in error, error


@pytest.fixture(scope="module")
def pruned_masks(tiny_dirs, tmp_path_factory):
    from wanda_pl.modules.causal_lm import CausalLM

    module = CausalLM(str(tiny_dirs["llama"]))
    return {n: torch.zeros_like(m.weight, dtype=torch.bool) for n, m in module.all_targets().items()}


MASK_FAULTS = {
    "other-names": (lambda m: {f"transformer.h.{i}.attn": v for i, v in enumerate(m.values())},
                    ["name layers this model has not", "transformer.h.0.attn", "named like"]),
    "other-shape": (lambda m: {**m, "model.layers.0.mlp.up_proj": torch.zeros(3, 5, dtype=torch.bool)},
                    ["'model.layers.0.mlp.up_proj'", "shape (3, 5)", "(128, 64)"]),
    "float-masks": (lambda m: {k: v.float() for k, v in m.items()}, ["torch.float32", "bool"]),
    "empty": (lambda m: {}, ["not a mask file"]),
    "a-tensor": (lambda m: next(iter(m.values())), ["not a mask file"]),
}


@pytest.mark.parametrize("name", list(MASK_FAULTS) + ["corrupt"])
def test_a_mask_file_that_does_not_fit_the_model_is_refused_and_nothing_written(tiny_dirs, text_file, tmp_path,
                                                                                pruned_masks, name):
    path = tmp_path / "masks.pt"
    if name == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        expected = ["not a mask file torch can load"]
    else:
        torch.save(MASK_FAULTS[name][0](pruned_masks), path)
        expected = MASK_FAULTS[name][1]
    error, out = run_cli(["fit", "--model.name_or_path", str(tiny_dirs["llama"]), "--pruning.masks_from", str(path),
                          *prune_args(tiny_dirs["llama"], text_file, tmp_path / "runs" / "out")[3:],
                          "--trainer.max_steps", "1"])
    line = refusal(error)
    assert str(path) in line, line
    for text in expected:
        assert text in line, (text, line)
    assert not (tmp_path / "runs").exists() or left_beside(tmp_path / "runs") == []


# --------------------------------------------------------------------------- faults while writing
def _save_fails_with(code):
    """The model's safetensors write: half a file, then the OS error a full or read-only disk gives."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(code, os.strerror(code), str(filename))

    return save_file


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_a_failed_write_of_the_model_keeps_the_previous_output_and_names_the_cause(tiny_dirs, text_file, tmp_path,
                                                                                  monkeypatch, code):
    import transformers.modeling_utils as modeling_utils

    out = write_ours(tmp_path / "runs" / "out")
    before = snapshot(out)
    monkeypatch.setattr(modeling_utils, "safe_save_file", _save_fails_with(code))
    error, _ = run_cli(prune_args(tiny_dirs["llama"], text_file, out, "--save_model", "true"))
    line = refusal(error)
    assert line.startswith(f"error: could not write output_dir {str(out)!r}: {os.strerror(code)}"), line
    assert "model.safetensors" in line and line.endswith("nothing written, previous output kept"), line
    # the pruned blocks' checkpoints stay beside it, for --resume once there is room
    assert snapshot(out) == before and left_beside(out.parent) == [".out.wanda_pl-resume", "out"]


@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only; as root (who may write anyway) the permission check is answered from
    the mode bits, as for any other user."""
    real = os.access

    def by_mode(path, mode):
        if mode & os.W_OK and not os.stat(path).st_mode & 0o200:
            return False
        return real(path, mode)

    if os.geteuid() == 0:
        monkeypatch.setattr(outputs.os, "access", by_mode)
    made = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


def test_a_read_only_output_location_is_refused_before_the_model_loads(tiny_dirs, text_file, tmp_path, read_only):
    runs = tmp_path / "runs"
    out = write_ours(runs / "out")
    before = snapshot(runs)
    read_only(runs)
    error, stdout = run_cli(prune_args(tiny_dirs["llama"], text_file, runs / "out"))
    line = refusal(error)
    assert line == (f"error: output_dir {str(out)!r} cannot be written: {str(runs)!r} is not writable by this user; "
                    f"choose a folder you can write, or change its permissions"), line
    assert "Loading weights" not in error and "dense baseline" not in stdout
    assert snapshot(runs) == before
    error, _ = run_cli(prune_args(tiny_dirs["llama"], text_file, runs / "new" / "out"))
    assert error is not None and f"{str(runs)!r} is not writable" in error  # the nearest folder that exists


# --------------------------------------------------------------------------- one run at a time
def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_holder(tiny_dirs, text_file, tmp_path):
    out = write_ours(tmp_path / "runs" / "out")
    before = snapshot(out)
    with output_lock(out) as held:  # as a run in progress holds it
        error, stdout = run_cli(prune_args(tiny_dirs["llama"], text_file, out))
        assert held.read_text().strip() == str(os.getpid())
    line = refusal(error)
    assert line.startswith(f"error: output_dir {str(out)!r} is being written by another run (pid {os.getpid()}; "), line
    assert "Loading weights" not in error  # refused before the model is loaded
    assert "dense baseline" not in stdout and snapshot(out) == before
    assert left_beside(out.parent) == ["out"]  # the lock file goes with its run
    assert run_cli(prune_args(tiny_dirs["llama"], text_file, out))[0] is None  # free again


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(lock_file(out))!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with staged_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_file(out).read_text() == str(holder.pid)  # stale: its holder is dead
    with staged_dir(out) as stage:
        (stage / "report.json").write_text("{}")
    assert left_beside(tmp_path) == ["out"] and (out / "report.json").is_file()


def test_a_lock_file_removed_just_after_it_was_opened_is_not_taken(tmp_path, monkeypatch):
    """The run that held it removed it between our open and our flock: locking that orphan would let
    a third run take the new file at the same time as us."""
    import fcntl

    import wanda_pl.commands.lock as lock

    out, opened = tmp_path / "out", []
    real_open = os.open

    def open_then_lose_it(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:
            os.unlink(path)  # as the previous holder does when it ends
        opened.append(fd)
        return fd

    monkeypatch.setattr(lock.os, "open", open_then_lose_it)
    with output_lock(out) as held:
        monkeypatch.setattr(lock.os, "open", real_open)
        assert len(opened) == 2 and held.exists()
        rival = os.open(held, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the file at the path is the one we hold
                fcntl.flock(rival, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(rival)


def test_the_lock_is_per_output_dir(tmp_path):
    with output_lock(tmp_path / "a"):
        with staged_dir(tmp_path / "b") as stage:
            (stage / "x").write_text("x")
    assert left_beside(tmp_path) == ["b"]


# --------------------------------------------------------------------------- signals
def test_a_signal_inside_interruptible_raises_interrupted_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        with interruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    assert str(stop.value) == "interrupted by SIGTERM; nothing written, previous output kept"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_the_commit_waits_for_it(tmp_path):
    done = []
    with pytest.raises(Interrupted) as stop:
        with interruptible():
            with signals_deferred("the output was complete before it"):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                done.append("committed")
    assert done == ["committed"] and str(stop.value) == "interrupted by SIGINT; the output was complete before it"


# A real run of cli.py, held at a known point so that the signal lands there: inside calibration (the
# first statistics update), or inside saving (the model written into the stage, the rest not yet).
HELD_RUN = """
import sys, time
sys.path.insert(0, {root!r})
import wanda_pl.core.stats as stats
import wanda_pl.modules.causal_lm as causal_lm

def hold(what):
    print(what, flush=True)
    time.sleep(120)

if sys.argv[1] == "calibration":
    stats.LayerStats.update = lambda self, x, nsamples: hold("HELD in calibration")
else:
    real_save = causal_lm.save_causal_lm

    def save_then_hold(*args, **kwargs):
        real_save(*args, **kwargs)
        hold("HELD in saving")

    causal_lm.save_causal_lm = save_then_hold
import cli
sys.argv = ["cli.py", *sys.argv[2:]]
cli.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["calibration", "saving"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_run_leaves_the_previous_output_and_no_stage(tiny_dirs, text_file, tmp_path, where, signum):
    out = write_ours(tmp_path / "runs" / "out")
    before = snapshot(out)
    args = prune_args(tiny_dirs["llama"], text_file, out, "--save_model", "true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", HELD_RUN.format(root=str(ROOT)), where, *args],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path)
        try:
            lines = []
            while not lines or not lines[-1].startswith("HELD"):
                line = proc.stdout.readline()
                assert line, f"the run ended before it was held: {lines} {stderr.seek(0) or stderr.read()[-3000:]}"
                lines.append(line)
            assert lines[-1].strip() == f"HELD in {where}"
            if where == "saving":
                assert [p.name for p in (tmp_path / "runs").iterdir() if ".partial." in p.name]  # the stage exists
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
        stderr.seek(0)
        err = stderr.read()
    name = signal.Signals(signum).name
    assert code == 128 + signum, err[-3000:]
    assert err.strip().splitlines()[-1] == f"error: interrupted by {name}; nothing written, previous output kept"
    assert "Traceback" not in err
    # interrupted while saving, every block was pruned: their checkpoints stay for --resume (none in calibration)
    kept = [".out.wanda_pl-resume"] if where == "saving" else []
    assert snapshot(out) == before and left_beside(out.parent) == sorted(kept + ["out"])


def test_mask_shards_must_be_one_complete_set(tmp_path, caplog):
    """offload disk writes one mask file per block: a lost one must not leave its block silently dense."""
    from wanda_pl.errors import UserError
    from wanda_pl.training.masks import load_masks, save_mask_shard

    shards = [{f"layers.{k}.proj": torch.rand(4, 8) < 0.5} for k in range(3)]
    folder = tmp_path / "masks"
    for k, part in enumerate(shards):
        save_mask_shard(part, folder, k, 3)
    weights = {n: torch.zeros(4, 8) for part in shards for n in part}
    loaded = load_masks(tmp_path, weights)
    assert list(loaded) == [n for part in shards for n in part]
    assert all(torch.equal(loaded[n], m) for part in shards for n, m in part.items())
    (folder / "masks-00002-of-00003.pt").unlink()
    with pytest.raises(UserError, match=r"not one complete set of 3: missing \['masks-00002-of-00003.pt'\]"):
        load_masks(tmp_path, weights)
    save_mask_shard(shards[1], folder, 1, 4)  # a shard of another run's set of 4
    with pytest.raises(UserError, match=r"sets of \[3, 4\] mixed"):
        load_masks(tmp_path, weights)
    # One file naming only some of the model's layers is allowed (a run may prune some), and said.
    torch.save(shards[0], tmp_path / "one.pt")
    with caplog.at_level("WARNING", logger="wanda_pl.training.masks"):
        assert list(load_masks(tmp_path / "one.pt", weights)) == ["layers.0.proj"]
    assert "cover 1 of the model's 3 prunable layers" in caplog.text and "layers.1.proj" in caplog.text
