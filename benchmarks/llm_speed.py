"""Wall time of Wanda pruning against plain forward passes over the same calibration set.

Any activation-aware, error-propagating method needs at least two forward passes per block
(one to calibrate, one to propagate pruned activations), so ``2 x forward`` is the floor.
Each measurement runs in its own process, so its peak memory (RSS) is its own. Medians of
``--repeats`` runs.

    python benchmarks/llm_speed.py --nsamples 32 --seqlen 1024 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(part: str, args) -> dict:
    import torch

    from common import Runner  # noqa: F401  (sets up sys.path and HF_HUB_OFFLINE)
    from wanda_pl.data.text_module import TextDataModule
    from wanda_pl.modules.causal_lm import CausalLM
    from wanda_pl.commands.report import peak_memory

    module = CausalLM(args.model, dtype=args.dtype)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, 0, 1)
    dm.prepare_for(module)
    ids = dm.calibration_ids()
    if part == "forward":
        t0 = time.perf_counter()
        with torch.no_grad():
            for row in ids.split(1):
                module.model(input_ids=row, use_cache=False)
        seconds = time.perf_counter() - t0
    else:
        report = Runner(module, dm).run(method=part, sparsity_ratio=0.5)
        seconds = report["time_s"]["calibration"] + report["time_s"]["prune"]
    return {"seconds": seconds, **peak_memory()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print("RESULT " + json.dumps(measure(args.part, args)))
        return

    def run(part: str) -> dict:
        cmd = [sys.executable, str(HERE / "llm_speed.py"), "--part", part] + [
            f"--{k}={v}" for k, v in (("model", args.model), ("dtype", args.dtype), ("nsamples", args.nsamples),
                                      ("seqlen", args.seqlen))]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])

    forward = [run("forward") for _ in range(args.repeats)]
    pruned = [run(args.method) for _ in range(args.repeats)]
    f = statistics.median(r["seconds"] for r in forward)
    p = statistics.median(r["seconds"] for r in pruned)
    rows = [
        f"| one forward pass over the calibration set | {f:.1f} | 1.00 | {max(r['cpu_rss_mb'] for r in forward):.0f} |",
        f"| {args.method} prune (capture + 2 passes per block + masks) | {p:.1f} | {p / f:.2f} | "
        f"{max(r['cpu_rss_mb'] for r in pruned):.0f} |",
    ]
    from common import write_table
    from wanda_pl.commands.report import versions

    write_table("llm_speed", "| run | median seconds | x forward | peak RSS (MB) |", rows,
                {"model": args.model, "dtype": args.dtype, "nsamples": args.nsamples, "seqlen": args.seqlen,
                 "repeats": args.repeats, "floor": "2.00 x forward", "ratio_to_floor": round(p / (2 * f), 3),
                 "versions": versions()})


if __name__ == "__main__":
    main()
