"""Perplexity and time of dense / magnitude / wanda (and sparsegpt, the OBS ablations) on the
embedded SmolLM2-135M and held-out Wikipedia text: the shape of the paper's Tables 2 and 6.

    python benchmarks/llm_prune.py                       # Table 2 methods at 50%, 4:8, 2:4
    python benchmarks/llm_prune.py --ablations           # + sparsegpt and the four OBS ablations
    python benchmarks/llm_prune.py --types unstructured --ratios 0.5 0.6 0.7 --allocations uniform owl
                                                         # OWL's allocation against uniform
    python benchmarks/llm_prune.py --nsamples 32 --seqlen 512 --methods sparsegpt admm wanda+admm wanda+dsnot ria \
        --ratios 0.5 0.6 0.7 --ria-permute --reference sparsegpt --name llm_prune_beyond_32
                                                         # the beyond-the-paper steps, as ratios to SparseGPT
"""
from __future__ import annotations

import argparse

from common import point_key, pruning_wall, run_sweep, settings_of, write_table

from wanda_pl.data.text_module import TextDataModule
from wanda_pl.commands.sweep import Grid
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
    ap.add_argument("--ria-permute", action="store_true",
                    help="add RIA with its channel permutation (--pruning.ria_permute) at the N:M types")
    ap.add_argument("--reference", metavar="METHOD",
                    help="add columns: perplexity and pruning wall time as ratios to this method's at the same point")
    ap.add_argument("--name", help="results file name (default from the options)")
    ap.add_argument("--keep", metavar="DIR", help="keep the sweep folder (sweep.csv, ppl_vs_sparsity.png, reports)")
    ap.add_argument("--plan", nargs="+", metavar="METHOD/TYPE",
                    help="exactly these rows instead (e.g. wanda/2:4 ablate_mag_seq/unstructured): to fill in a table")
    args = ap.parse_args()

    available = method_names()
    methods = args.methods or [m for m in ("magnitude", "wanda", "sparsegpt") if m in available]
    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
    dm.prepare_for(module)
    # The rows are the sweep command's: the same code path as `python cli.py sweep`.
    grids = [Grid(methods, args.ratios, args.types, args.allocations)]
    if args.ablations:
        grids.append(Grid([m for m in ABLATIONS if m in available], [0.5], ["unstructured"], ["uniform"]))
    if args.plan:
        plan = [tuple(p.split("/", 1)) for p in args.plan]
        unknown = [m for m, *_ in plan if m not in available]
        if unknown or any(len(p) != 2 for p in plan):
            ap.error(f"--plan takes METHOD/TYPE with METHOD in {available}; got {args.plan}")
        grids = [Grid([m for m, t in plan if t == stype], [0.5], [stype], ["uniform"])
                 for stype in dict.fromkeys(t for _, t in plan)]
    dense_metrics, dense_s, points = run_sweep(module, dm, grids, args.keep)
    nm = [t for t in args.types if t != "unstructured"]
    if args.ria_permute and nm:
        # Its own folder: the sweep names a point by method and type, and this is `ria` again.
        keep = args.keep and f"{args.keep}_ria_permute"
        _, _, permuted = run_sweep(module, dm, [Grid(["ria"], [0.5], nm, ["uniform"])], keep, ria_permute=True)
        points += [{**r, "method": "ria+permute"} for r in permuted]
    dense = dense_metrics["ppl"]
    ref = {point_key(r): r for r in points if r["method"] == args.reference}
    rows = [f"| dense | - | - | - | {dense:.2f} | 0.0000 | - | - | {dense_s:.1f} |" + (" - | - |" if ref else "")]
    for r in points:
        rows.append(f"| {r['method']} | {r['allocation']} | {r['sparsity_type']} | {r['sparsity_ratio']:g} | "
                    f"{r['ppl']:.2f} | {r['actual_sparsity']:.4f} | "
                    f"{r['time_prune_s']:.2f} | {r['time_calibration_s']:.1f} | {r['time_total_s']:.1f} |")
        if args.reference:
            base = ref.get(point_key(r))
            rows[-1] += (f" {r['ppl'] / base['ppl']:.3f} | {pruning_wall(r) / pruning_wall(base):.2f} |" if base else " - | - |")
        print(rows[-1], flush=True)
    report = {**dm.describe(), **module.describe()}
    header = ("| method | allocation | sparsity | ratio | perplexity | actual sparsity | mask+update time (s) | "
              "calibration forward (s) | total (s) |")
    if args.reference:
        header += f" ppl / {args.reference} | wall / {args.reference} |"
    name = args.name or ("llm_prune_plan" if args.plan else "llm_prune_ablations" if args.ablations else
                         "llm_prune_allocation" if args.allocations != ["uniform"] else "llm_prune")
    write_table(name, header, rows,
                settings_of(report, methods=methods, types=args.types, ratios=args.ratios,
                            allocations=args.allocations, ria_permute=args.ria_permute, dense_ppl=dense,
                            wall="calibration forward + mask and update seconds, evaluation left out"))



if __name__ == "__main__":
    main()
