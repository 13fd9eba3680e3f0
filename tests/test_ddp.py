"""Perplexity and masks do not depend on the number of processes (DDP on CPU, gloo)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # cli.py lives at the repository root
    sys.path.insert(0, str(ROOT))

# 5 windows over 2 ranks: uneven shards (3 + 2), which padding would bias
ARGS = ["--data.nsamples", "4", "--data.seqlen", "32", "--data.max_eval_windows", "5",
        "--pruning.method", "wanda", "--pruning.sparsity_type", "unstructured", "--pruning.sparsity_ratio", "0.5",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false", "--save_model", "true"]


def run(model_dir, text_file, out, *extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(ROOT / "cli.py"), "prune", "--model.name_or_path", str(model_dir),
           "--data.calibration", str(text_file), "--data.evaluation", str(text_file), *ARGS,
           "--output_dir", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_same_ppl_on_one_and_two_processes(tiny_dirs, text_file, tmp_path):
    one = run(tiny_dirs["llama"], text_file, tmp_path / "one")
    two = run(tiny_dirs["llama"], text_file, tmp_path / "two",
              "--trainer.strategy", "ddp", "--trainer.devices", "2")
    assert one["devices"] == 1 and two["devices"] == 2
    assert one["eval_windows"] == two["eval_windows"] == 5
    for key in ("ppl", "ppl_dense"):
        assert math.isfinite(one[key]) and math.isfinite(two[key])
        assert abs(one[key] - two[key]) <= 1e-4 * abs(one[key]), (key, one[key], two[key])
    assert one["ppl"] != one["ppl_dense"]
    # every rank prunes on all calibration windows: the same masks
    assert one["actual_sparsity"] == two["actual_sparsity"] == 0.5
    assert one["layers"] == two["layers"]
    assert torch.equal(torch.load(tmp_path / "one" / "calibration_ids.pt", weights_only=True),
                       torch.load(tmp_path / "two" / "calibration_ids.pt", weights_only=True))
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "model").state_dict()
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model").state_dict()
    for k in m1:
        assert torch.equal(m1[k] == 0, m2[k] == 0), k
    # rank 0 alone wrote a complete output, nothing partial next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert {"report.json", "calibration_ids.pt", "model"} <= {p.name for p in (tmp_path / "two").iterdir()}


def test_non_zero_rank_writes_nothing(tiny_dirs, text_file, tmp_path, monkeypatch):
    """Under DDP every rank runs the prune command; only rank 0 may stage and commit the output
    (another rank's empty stage, committed after rank 0's, would replace the finished output)."""
    import cli

    monkeypatch.setattr(cli.WandaTrainer, "is_global_zero", property(lambda self: False))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "cli.py")])
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(args=["prune", "--model.name_or_path", str(tiny_dirs["llama"]), "--data.calibration", str(text_file),
                       "--data.evaluation", str(text_file), *ARGS, "--output_dir", str(tmp_path / "runs" / "out")])
    finally:
        torch.set_num_threads(old)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
