"""Pruning a Mixture-of-Experts model with real weights: the embedded ``smollm2-moe-8x135m``
(SmolLM2-135M upcycled into 8 experts, top-2) against dense SmolLM2-135M, the same methods, the
same calibration and evaluation text, in one run.

    python benchmarks/llm_moe.py                                  # wanda, sparsegpt, admm at 50% and 2:4
    python benchmarks/llm_moe.py --nsamples 32 --seqlen 512 --eval-windows 32
    python benchmarks/llm_moe.py --reap 0.25 0.5 --methods --name llm_moe_reap   # whole experts only

Rows: perplexity (and its ratio to the model's dense perplexity), sparsity over the targets and over
every weight of the blocks (it must be the target: the experts are pruned, not only the attention),
the calibration tokens each expert received in block 0 and over all blocks (min / median / max),
and the pruning wall time (calibration forwards + masks and updates) as a ratio to dense SmolLM2's
at the same point. The dense MoE computes SmolLM2 up to rounding, so its dense perplexity equals
SmolLM2's; the pruned ones differ because every expert is pruned on its own tokens. ``--reap``
adds rows that remove that share of every block's experts (``--pruning.experts_ratio``, no weight
pruning): perplexity and the parameter count left.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import point_key, pruning_wall, run_sweep, settings_of, trainer, write_table

from wanda_pl.commands.sweep import Grid
from wanda_pl.data.text_module import TextDataModule
from wanda_pl.modules.causal_lm import CausalLM

MODELS = ("smollm2-135m", "smollm2-moe-8x135m")


def _spread(counts) -> str:
    counts = sorted(counts)
    return f"{counts[0]} / {statistics.median(counts):g} / {counts[-1]}" if counts else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="*", default=["wanda", "sparsegpt", "admm"])
    ap.add_argument("--types", nargs="+", default=["unstructured", "2:4"])
    ap.add_argument("--reap", nargs="*", type=float, default=[], help="shares of experts removed (REAP rows)")
    ap.add_argument("--name", default="llm_moe")
    args = ap.parse_args()

    found, report = {}, None
    for name in MODELS if args.methods else ():
        module = CausalLM(name)
        dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
        dm.prepare_for(module)
        with tempfile.TemporaryDirectory() as tmp:
            dense, _, rows = run_sweep(module, dm, [Grid(args.methods, [0.5], args.types, ["uniform"])], out=tmp)
            for row in rows:
                report = json.loads((Path(tmp) / row["point"] / "report.json").read_text())
                tokens = report.get("expert_tokens") or {}
                row["tokens_block0"] = _spread(next(iter(tokens.values()), {}).values())
                row["tokens_all"] = _spread([n for block in tokens.values() for n in block.values()])
        found[name] = (dense, rows)
        del module
    reference = {(r["method"], *point_key(r)): r for r in found.get("smollm2-135m", (None, []))[1]}
    lines = []
    for name in found:
        dense, rows = found[name]
        lines.append(f"| {name} | dense | - | {dense['ppl']:.3f} | 1.00 | - | - | - | - | - |")
        for r in rows:
            ref = reference[(r["method"], *point_key(r))]
            lines.append(
                f"| {name} | {r['method']} | {r['sparsity_type']} | {r['ppl']:.3f} | {r['ppl'] / dense['ppl']:.2f} | "
                f"{r['actual_sparsity']:.4f} | {r['sparsity_block_weights']:.4f} | {r['tokens_block0']} | "
                f"{r['tokens_all']} | {pruning_wall(r):.1f} ({pruning_wall(r) / pruning_wall(ref):.1f}x) |")
    for ratio in args.reap:
        report = _reap(ratio, args)
        lines.append(f"| {MODELS[1]} | REAP {ratio:g} of the experts | - | {report['metrics']['ppl']['pruned']:.3f} | "
                     f"{report['metrics']['ppl']['pruned'] / report['metrics']['ppl']['dense']:.2f} | "
                     f"{report['parameters'] / 1e6:.0f}M parameters | - | - | - | "
                     f"{report['time_s']['calibration'] + report['time_s']['prune']:.1f} |")
    header = ("| model | method | type | perplexity | / dense | sparsity (targets) | sparsity (block weights) | "
              "tokens per expert, block 0 (min / median / max) | all blocks | pruning wall s (x dense SmolLM2) |")
    write_table(args.name, header, lines, settings_of(report, methods=args.methods, types=args.types,
                                                       models=list(MODELS)))


def _reap(ratio: float, args) -> dict:
    """One prune run removing ``ratio`` of every block's experts and no weights, on a fresh module."""
    from wanda_pl.callbacks import Calibration, Pruning
    from wanda_pl.commands.prune import prune

    module = CausalLM(MODELS[1])
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
    dm.prepare_for(module)
    with tempfile.TemporaryDirectory() as out:
        return prune(trainer([Calibration(), Pruning("magnitude", sparsity_ratio=0.0, experts_ratio=ratio)]), module,
                     dm, str(Path(out) / "run"), checkpoints=False)


if __name__ == "__main__":
    main()
