"""A markdown table of a finished sweep (``python cli.py sweep ...``), with every point's perplexity as
a ratio to a reference method's at the same sparsity, and its pruning wall time (calibration
forwards + masks and updates, evaluation left out) as a ratio too.

    python benchmarks/sweep_table.py outputs/smollm2_sweep --reference sparsegpt [--save NAME]

Numbers come from the sweep's own ``sweep.json`` (the points' reports); ``--save`` writes the
table and the sweep's settings to ``benchmarks/results/NAME.md`` and copies its plot beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from common import RESULTS, point_key, pruning_wall, write_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir")
    ap.add_argument("--reference", default="sparsegpt", help="the method the ratios are to")
    ap.add_argument("--save", metavar="NAME", help="write benchmarks/results/NAME.md (+ NAME.png)")
    args = ap.parse_args()
    folder = Path(args.sweep_dir)
    summary = json.loads((folder / "sweep.json").read_text())
    rows = summary["rows"]

    ref = {point_key(r): r for r in rows if r["method"] == args.reference}
    out = []
    for r in rows:
        base = ref.get(point_key(r))
        ppl_ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "-"
        time_ratio = f"{pruning_wall(r) / pruning_wall(base):.2f}" if base else "-"
        out.append(f"| {r['method']} | {r.get('allocation')} | {r['sparsity_type']} | {r['sparsity_ratio']:g} | "
                   f"{r['ppl']:.2f} | {ppl_ratio} | {r['actual_sparsity']:.4f} | {r['time_prune_s']:.1f} | "
                   f"{pruning_wall(r):.1f} | {time_ratio} |")
    header = (f"| method | allocation | sparsity | ratio | perplexity | / {args.reference} | actual sparsity | "
              f"mask+update (s) | pruning wall (s) | wall / {args.reference} |")
    settings = {**summary["settings"], "dense": summary["dense"], "grid": summary["grid"], "sweep_dir": str(folder),
                "versions": summary["versions"]}
    if args.save:
        write_table(args.save, header, out, settings)
        plot = folder / "ppl_vs_sparsity.png"
        if plot.is_file():
            shutil.copyfile(plot, RESULTS / f"{args.save}.png")
    else:
        print("\n".join([header, *out]))


if __name__ == "__main__":
    main()
