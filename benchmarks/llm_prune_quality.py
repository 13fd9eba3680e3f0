"""The best one-shot quality against SparseGPT, guarded against fitting the calibration text: each row
pruned from the same dense SmolLM2-135M with the same calibration windows, then measured by perplexity
on held-out Wikipedia (the calibration text's kind), on held-out news (another kind), and by zero-shot
accuracy (lm-eval, the paper's seven tasks), each beside SparseGPT's at the same sparsity.

A row is a method with its steps as the sweep names them (``wanda+swaps+admm``), then ``/option=value``
pieces for any other pruning option (``admm/reconstruct=block``), or ``preset=NAME``.

    python benchmarks/llm_prune_quality.py --types 2:4 0.7          # the issue's goal points
    python benchmarks/llm_prune_quality.py --types 0.5 0.6 0.7 4:8 2:4 --zero-shot-limit 0   # perplexity only
"""
from __future__ import annotations

import argparse
import time

from common import Runner, perplexity_on, settings_of, write_table

import torch

from wanda_pl.commands.sweep_grid import _steps
from wanda_pl.data.text_module import TextDataModule
from wanda_pl.eval.zero_shot import PAPER_TASKS, run_zero_shot
from wanda_pl.modules.causal_lm import CausalLM

ROWS = ["sparsegpt", "admm", "wanda+swaps+admm", "admm/reconstruct=block"]


def row_settings(row: str, sparsity_type: str) -> dict:
    """``admm/reconstruct=block`` at ``2:4`` -> the Pruning callback's keyword arguments."""
    steps, *options = row.split("/")
    out = {} if steps.startswith("preset=") else _steps(steps)
    for piece in [steps] * steps.startswith("preset=") + options:
        key, _, value = piece.partition("=")
        out[key] = _value(value)
    if ":" in sparsity_type:
        out["sparsity_type"] = sparsity_type
    else:
        out["sparsity_ratio"] = float(sparsity_type)
    return out


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", nargs="+", default=["2:4", "0.7"], help="N:M types or unstructured ratios")
    ap.add_argument("--rows", nargs="+", default=ROWS, help="the first is the reference (ratios to it)")
    ap.add_argument("--also", default="news", help="the second held-out text")
    ap.add_argument("--zero-shot-limit", type=int, default=100, help="documents per task; 0: no zero-shot")
    ap.add_argument("--zero-shot-rows", nargs="+", default=None, help="rows that get zero-shot (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--name", default="llm_prune_quality", help="results/<name>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for t in args.types:  # bad rows fail before any work
        for r in args.rows:
            from wanda_pl.methods.settings import PruningSettings
            PruningSettings.from_args(**row_settings(r, t))

    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
    dm.prepare_for(module)
    runner = Runner(module, dm)
    dense = runner.dense_metrics()["ppl"]
    dense_also = perplexity_on(module, args.also, args.seqlen, args.eval_windows)
    rows, report = [f"| dense | - | {dense:.2f} | - | {dense_also:.2f} | - | - | - | - | - |"], {}
    print(rows[0], flush=True)
    for sparsity_type in args.types:
        ref = None
        for row in args.rows:
            report = runner.run(**row_settings(row, sparsity_type))
            wall = report["time_s"]["calibration"] + report["time_s"]["prune"]
            got = {"ppl": report["metrics"]["ppl"]["pruned"], "also": perplexity_on(module, args.also, args.seqlen,
                                                                         args.eval_windows), "wall": wall}
            zs = None
            if args.zero_shot_limit > 0 and (args.zero_shot_rows is None or row in args.zero_shot_rows):
                t0 = time.perf_counter()
                res = run_zero_shot(module.model, module.tokenizer, PAPER_TASKS, "embedded", args.zero_shot_limit, 8)
                zs = 100 * res["mean_acc"]
                print(f"  zero-shot {row}: " + ", ".join(f"{t} {100 * res['tasks'][t]['acc']:.0f}" for t in PAPER_TASKS)
                      + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            got["zs"] = zs
            ref = ref or got
            zs_cell = "-" if zs is None else f"{zs:.2f}"
            zs_diff = "-" if zs is None or ref["zs"] is None else f"{zs - ref['zs']:+.2f}"
            rows.append(f"| {row} | {sparsity_type} | {got['ppl']:.2f} | {got['ppl'] / ref['ppl']:.3f} | "
                        f"{got['also']:.2f} | {got['also'] / ref['also']:.3f} | {zs_cell} | {zs_diff} | {wall:.0f} | "
                        f"{wall / ref['wall']:.2f} |")
            print(rows[-1], flush=True)
    ref_name = args.rows[0]
    header = (f"| row | sparsity | wikipedia ppl | / {ref_name} | {args.also} ppl | / {ref_name} | zero-shot mean acc | "
              f"- {ref_name} (points) | pruning wall s | / {ref_name} |")
    write_table(args.name, header, rows, settings_of(
        report, rows=args.rows, types=args.types, also=args.also, zero_shot_limit=args.zero_shot_limit,
        zero_shot_tasks=list(PAPER_TASKS), threads=args.threads, dense_ppl=dense, dense_also_ppl=dense_also,
        wall="calibration forward + masks, updates and reconstruction, evaluation left out"))


if __name__ == "__main__":
    main()
