"""What sharing one ``X^T X`` between layers that read the same input (q/k/v, gate/up) saves: SparseGPT's
and ADMM's pruning wall time against Wanda's on SmolLM2-135M, with the statistics shared (today) and
with one accumulator per layer (before), in one run, alternating, medians of ``--repeats``.

    python benchmarks/llm_shared_stats.py                 # 8 x 256 calibration, 3 repeats
"""
from __future__ import annotations

import argparse
import functools
import statistics

from common import Runner, settings_of, write_table

import wanda_pl.core.engine as engine
from wanda_pl.core.hooks import collect_stats
from wanda_pl.data.text_module import TextDataModule
from wanda_pl.modules.causal_lm import CausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "admm"])
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, 2)
    dm.prepare_for(module)
    runner = Runner(module, dm)
    walls = {(m, s): [] for m in args.methods for s in (False, True)}
    masks, report = {}, None
    for _ in range(args.repeats):
        for method in args.methods:
            for share in (False, True):
                engine.collect_stats = functools.partial(collect_stats, share=share)
                report = runner.run(method=method)
                walls[(method, share)].append(report["time_s"]["calibration"] + report["time_s"]["prune"])
                masks.setdefault(method, set()).add(report["metrics"]["ppl"]["pruned"])
    engine.collect_stats = collect_stats
    base = {s: statistics.median(walls[("wanda", s)]) for s in (False, True)}
    rows = []
    for method in args.methods:
        before, after = statistics.median(walls[(method, False)]), statistics.median(walls[(method, True)])
        rows.append(f"| {method} | {before:.1f} ({before / base[False]:.2f}x wanda) | {after:.1f} "
                    f"({after / base[True]:.2f}x wanda) | {after / before:.2f} | "
                    f"{'same' if len(masks[method]) == 1 else 'DIFFERENT'} |")
    header = ("| method | pruning wall s, one accumulator per layer | shared (today) | shared / per layer | "
              "perplexity with and without sharing |")
    write_table("llm_shared_stats", header, rows, settings_of(report, methods=args.methods, repeats=args.repeats))


if __name__ == "__main__":
    main()
