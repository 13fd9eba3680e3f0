"""Resumable pruning: a run killed by a real SIGKILL after block 1 of a 4-block model resumes, with
``--resume true``, to bit-identical masks and weights; other settings, a missing staging folder and
a stale one are handled before any work."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_cli import count_validations  # noqa: E402,F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "probe"


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer):
    """A tiny Llama with 4 blocks (the other fixtures have 2)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama4")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prune_args(model_dir, text_file, out, *extra):
    return ["prune", "--model.name_or_path", str(model_dir), "--data.calibration", str(text_file),
            "--data.evaluation", str(text_file), "--data.nsamples", "4", "--data.seqlen", "32",
            "--data.max_eval_windows", "2", "--pruning.sparsity_ratio", "0.5", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--save_model", "true", "--output_dir", str(out), *extra]


def in_process(model_dir, text_file, out, *extra):
    """(error or None, stdout) of the same command run in this process: for what needs no kill and no
    bit-for-bit comparison with a subprocess (refusals, a fresh run), without a process start each."""
    from conftest import run_cli

    return run_cli(prune_args(model_dir, text_file, out, *extra))


def run(model_dir, text_file, out, *extra, kill_after=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": f"{PROBE}{os.pathsep}{ROOT}"}
    env.pop("WANDA_PL_PROBE_DIR", None)
    if kill_after is not None:
        env["WANDA_PL_PROBE_KILL_AFTER"] = str(kill_after)
    cmd = [sys.executable, str(ROOT / "cli.py"), *prune_args(model_dir, text_file, out, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_output(a: Path, b: Path):
    from wanda_pl.training.masks import load_masks

    ma, mb = load_masks(a), load_masks(b)  # masks.pt, or offload disk's one file per block
    assert list(ma) == list(mb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    wa, wb = weights(a / "model"), weights(b / "model")
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ra, rb = json.loads((a / "report.json").read_text()), json.loads((b / "report.json").read_text())
    assert ra["metrics"] == rb["metrics"] and ra["layers"] == rb["layers"]
    assert (a / "permutations.pt").exists() == (b / "permutations.pt").exists()
    if (a / "permutations.pt").exists():  # the resumed blocks' permutations come back from the checkpoints
        pa, pb = (torch.load(f / "permutations.pt", weights_only=True) for f in (a, b))
        assert list(pa) == list(pb) == list(ma)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
@pytest.mark.parametrize("method,offload,extra", [
    ("sparsegpt", "none", ()),
    ("ria", "none", ("--pruning.sparsity_type", "2:4", "--pruning.ria_permute", "true")),  # + permutations.pt
    # disk: the shards written before the kill are reused; with fitted blocks (a plain wanda run is a subset)
    ("wanda", "disk", ("--pruning.reconstruct", "attn_mlp", "--pruning.reconstruct_steps", "3")),
    # cut blocks (their shapes and biases come back before their weights), and depth's influence scores
    ("wanda", "none", ("--pruning.structure", "width", "--pruning.compensate", "bias")),
    ("wanda", "disk", ("--pruning.structure", "width")),
    ("wanda", "cpu", ("--pruning.structure", "depth", "--pruning.blocks_removed", "2")),
])
def test_sigkill_after_block_1_resumes_bit_identical(deep_llama, text_file, tmp_path, method, offload, extra):
    """Only the kill needs a process of its own: the uninterrupted run and the resumed one go through the
    same command in this process, so the two outputs compared bit for bit come from one interpreter."""
    args = ("--pruning.method", method, "--model.offload", offload, *extra)
    whole = tmp_path / "whole"
    error, _ = in_process(deep_llama, text_file, whole, *args)
    assert error is None, error
    out = tmp_path / "runs" / "out"
    killed = run(deep_llama, text_file, out, *args, kill_after=1, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    staging = tmp_path / "runs" / ".out.wanda_pl-resume"
    assert json.loads((staging / "progress.rank0.json").read_text())["done"] == 1
    assert not out.exists()
    # a block's weights are checkpointed where the run changed them in memory (disk writes its shards; depth
    # only measures blocks)
    assert bool(list(staging.glob("block-*.safetensors"))) == (offload != "disk" and "depth" not in extra)
    error, stdout = in_process(deep_llama, text_file, out, *args, "--resume", "true")
    assert error is None, error
    assert "resuming after block 1" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_block"] == 2
    assert_same_output(whole, out)
    assert not staging.exists()  # a finished run deletes its staging folder
    # (offload disk's output equals the resident run's: in process, tests/test_scale.py, test_reconstruct.py and
    # test_structure.py)


@pytest.mark.slow
def test_resume_refusals_and_a_stale_folder(deep_llama, text_file, tmp_path, count_validations):
    """Only the kill needs a process of its own; the refusals and the fresh run go through the same
    command in this process (a user error exits 2 with its message, as in a process: tests/test_cli.py)."""
    out = tmp_path / "runs" / "out"
    staging = tmp_path / "runs" / ".out.wanda_pl-resume"
    error, _ = in_process(deep_llama, text_file, out, "--resume", "true")
    assert error.startswith("exit 2") and "no staging folder" in error and "to resume from" in error, error
    run(deep_llama, text_file, out, kill_after=0, check=False)
    assert staging.is_dir()
    error, _ = in_process(deep_llama, text_file, out, "--resume", "true", "--pruning.sparsity_ratio", "0.6")
    assert error.startswith("exit 2") and "other settings" in error and "method" in error and "0.6" in error, error
    assert count_validations == []  # refused before any work
    error, stdout = in_process(deep_llama, text_file, out)  # no --resume: the stale folder is reported and replaced
    assert error is None, error
    assert "replacing the staging folder" in stdout
    assert not staging.exists() and (out / "report.json").is_file()
    # a folder in the way that is not ours is never removed
    staging.mkdir()
    (staging / "mine.txt").write_text("a user's file")
    error, _ = in_process(deep_llama, text_file, out)
    assert error.startswith("exit 2") and "was not written by wanda_pl" in error, error
    assert (staging / "mine.txt").read_text() == "a user's file"


@pytest.mark.slow
def test_resume_refuses_a_model_changed_on_disk(deep_llama, text_file, tmp_path):
    """SparseGPT killed after block 1; another model of the same architecture is then saved at the
    same path (a re-download of another revision): the resume is refused naming the file, before
    any work, and the finished blocks are kept for the user to decide."""
    import shutil

    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    shutil.copytree(deep_llama, model)
    out = tmp_path / "runs" / "out"
    staging = tmp_path / "runs" / ".out.wanda_pl-resume"
    run(model, text_file, out, "--pruning.method", "sparsegpt", kill_after=1, check=False)
    assert (staging / "progress.rank0.json").is_file()
    config = AutoModelForCausalLM.from_pretrained(model).config
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(model)  # same shapes, same header, other bytes
    error, stdout = in_process(model, text_file, out, "--pruning.method", "sparsegpt", "--resume", "true")
    assert error.startswith("exit 2") and "changed since the interrupted run" in error, error
    assert "'model.safetensors' (its content differs)" in error
    assert "resuming after block" not in stdout and not (out / "report.json").exists()
    assert (staging / "block-00001.safetensors").is_file()  # nothing of the earlier run is deleted
    # an untouched model folder resumes as before (the fingerprint is stable for the same files)
    fresh = tmp_path / "fresh"
    run(model, text_file, fresh, "--pruning.method", "sparsegpt", kill_after=1, check=False)
    error, stdout = in_process(model, text_file, fresh, "--pruning.method", "sparsegpt", "--resume", "true")
    assert error is None and "resuming after block 1" in stdout, error
