"""Perplexity and time of dense / magnitude / wanda (and sparsegpt, the OBS ablations) on the
embedded SmolLM2-135M and held-out Wikipedia text: the shape of the paper's Tables 2 and 6.

    python benchmarks/llm_prune.py                       # Table 2 methods at 50%, 4:8, 2:4
    python benchmarks/llm_prune.py --ablations           # + sparsegpt and the four OBS ablations
    python benchmarks/llm_prune.py --types unstructured --ratios 0.5 0.6 0.7 --allocations uniform owl
                                                         # OWL's allocation against uniform
"""
from __future__ import annotations

import argparse
import time

from common import Runner, settings_of, write_table

from wanda_pl.data.text_module import TextDataModule
from wanda_pl.methods import method_names
from wanda_pl.modules.causal_lm import CausalLM

ABLATIONS = ("ablate_mag_seq", "ablate_wanda_seq", "ablate_mag_iter", "ablate_wanda_iter")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=None, help="default: magnitude wanda (+ sparsegpt if available)")
    ap.add_argument("--types", nargs="+", default=["unstructured", "4:8", "2:4"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5], help="unstructured sparsity ratios")
    ap.add_argument("--allocations", nargs="+", default=["uniform"], help="uniform | owl (unstructured rows)")
    ap.add_argument("--ablations", action="store_true", help="add sparsegpt and the four OBS-update ablations at 50%%")
    ap.add_argument("--plan", nargs="+", metavar="METHOD/TYPE",
                    help="exactly these rows instead (e.g. wanda/2:4 ablate_mag_seq/unstructured): to fill in a table")
    args = ap.parse_args()

    available = method_names()
    methods = args.methods or [m for m in ("magnitude", "wanda", "sparsegpt") if m in available]
    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
    dm.prepare_for(module)
    runner = Runner(module, dm)
    t0 = time.perf_counter()
    dense = runner.dense_metrics()["ppl"]
    rows = [f"| dense | - | - | - | {dense:.2f} | 0.0000 | - | - | {time.perf_counter() - t0:.1f} |"]
    # (method, sparsity type, ratio or None for N:M, allocation)
    plan = [(m, t, None, "uniform") if ":" in t else (m, t, r, a)
            for t in args.types for r in ([None] if ":" in t else args.ratios)
            for a in (["uniform"] if ":" in t else args.allocations) for m in methods]
    if args.ablations:
        plan += [(m, "unstructured", 0.5, "uniform") for m in ABLATIONS if m in available]
    if args.plan:
        plan = [tuple(p.split("/", 1)) for p in args.plan]
        unknown = [m for m, _ in plan if m not in available]
        if unknown or any(len(p) != 2 for p in plan):
            ap.error(f"--plan takes METHOD/TYPE with METHOD in {available}; got {args.plan}")
        plan = [(m, t, None if ":" in t else 0.5, "uniform") for m, t in plan]
    report = None
    for method, stype, ratio, allocation in plan:
        report = runner.run(method=method, sparsity_type=stype, sparsity_ratio=ratio, allocation=allocation)
        ts = report["time_s"]
        rows.append(f"| {method} | {allocation} | {report['sparsity_type']} | {report['sparsity_ratio']:g} | "
                    f"{report['ppl']:.2f} | {report['actual_sparsity']:.4f} | "
                    f"{ts['prune']:.2f} | {ts['calibration']:.1f} | {ts['total']:.1f} |")
        print(rows[-1], flush=True)
    header = ("| method | allocation | sparsity | ratio | perplexity | actual sparsity | mask+update time (s) | "
              "calibration forward (s) | total (s) |")
    name = "llm_prune_plan" if args.plan else "llm_prune_ablations" if args.ablations else \
        "llm_prune_allocation" if args.allocations != ["uniform"] else "llm_prune"
    write_table(name, header, rows,
                settings_of(report or {}, ratios=args.ratios, allocations=args.allocations, dense_ppl=dense))


if __name__ == "__main__":
    main()
