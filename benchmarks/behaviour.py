"""Behaviour hashes, for refactors that must change nothing: run eight prune settings on the embedded
SmolLM2 with the checkout at hand, hash what they produced, and compare two such records.

    python benchmarks/behaviour.py record before.json      # on the commit before the change
    python benchmarks/behaviour.py record after.json       # on the change (same machine, same threads)
    python benchmarks/behaviour.py compare before.json after.json

Masks, saved weights, RIA's permutations and the calibration ids are compared bit for bit; reports
equal after dropping what is measured (times, peak memory) or machine-specific, and after reading the
older report through ``commands.report.upgrade``. Small settings (8 x 128 calibration, 4 evaluation
windows): about 20 minutes on 2 cores, RIA's permutation the longest. Each run is a fresh ``cli.py
prune`` process of the checkout this script sits in.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--model.name_or_path", "smollm2-135m", "--data.calibration", "wikipedia", "--data.evaluation",
          "wikipedia", "--data.nsamples", "8", "--data.seqlen", "128", "--data.max_eval_windows", "4",
          "--save_model", "true", "--pruning.sparsity_ratio", "0.5", "--trainer.enable_progress_bar", "false"]
SETTINGS = {
    "magnitude": ["--pruning.method", "magnitude"],
    "wanda": ["--pruning.method", "wanda"],
    "wanda_2:4": ["--pruning.method", "wanda", "--pruning.sparsity_type", "2:4"],
    "sparsegpt": ["--pruning.method", "sparsegpt"],
    "admm": ["--pruning.method", "admm", "--pruning.admm_iterations", "4", "--pruning.admm_gradual", "2"],
    "wanda+dsnot+admm": ["--pruning.method", "wanda", "--pruning.refine", "dsnot", "--pruning.update", "admm",
                         "--pruning.admm_iterations", "4"],
    "ria_2:4_permute": ["--pruning.method", "ria", "--pruning.sparsity_type", "2:4", "--pruning.ria_permute", "true"],
    "owl": ["--pruning.method", "wanda", "--pruning.allocation", "owl", "--pruning.sparsity_ratio", "0.6"],
}
MEASURED = ("time_s", "peak_memory_mb", "hardware", "versions", "output_dir", "torch_threads")


def _digest(tensors) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in MEASURED}
    return [_strip(v) for v in value] if isinstance(value, list) else value


def _outputs(folder: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = {}
    for f in sorted((folder / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    out = {"masks": _digest(torch.load(folder / "masks.pt")), "weights": _digest(weights),
           "report": _strip(json.loads((folder / "report.json").read_text()))}
    if (folder / "permutations.pt").exists():
        out["permutations"] = _digest(torch.load(folder / "permutations.pt"))
    if (folder / "calibration_ids.pt").exists():
        out["calibration_ids"] = _digest({"ids": torch.load(folder / "calibration_ids.pt")})
    return out


def record(path: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in SETTINGS.items():
            out = Path(tmp) / name.replace(":", "-").replace("+", "_")
            done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "prune", *COMMON, *args, "--output_dir",
                                   str(out)], env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: cli.py prune failed:\n{done.stderr[-2000:]}")
            found[name] = _outputs(out)
            print(f"{name}: masks {found[name]['masks']} weights {found[name]['weights']}", flush=True)
    Path(path).write_text(json.dumps(found, indent=1, sort_keys=True, default=str) + "\n")


def compare(before: str, after: str) -> int:
    sys.path.insert(0, str(ROOT))
    from wanda_pl.commands.report import upgrade

    a, b = (json.loads(Path(p).read_text()) for p in (before, after))
    differ = 0
    print(f"{'setting':18} {'masks':>6} {'weights':>8} {'report':>7}")
    for name in SETTINGS:
        x, y = a.get(name), b.get(name)
        if x is None or y is None:
            print(f"{name:18} missing in one record")
            differ += 1
            continue
        same = [x.get(k) == y.get(k) for k in ("masks", "weights", "permutations", "calibration_ids")]
        reports = _strip(upgrade(x["report"])) == _strip(upgrade(y["report"]))
        print(f"{name:18} {'same' if same[0] else 'DIFFER':>6} {'same' if same[1] else 'DIFFER':>8} "
              f"{'same' if reports and all(same[2:]) else 'DIFFER':>7}")
        differ += not (all(same) and reports)
    print("all equal" if not differ else f"{differ} settings differ")
    return int(bool(differ))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "record":
        record(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        raise SystemExit(compare(sys.argv[2], sys.argv[3]))
    else:
        raise SystemExit(__doc__)
