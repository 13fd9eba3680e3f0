"""Block-level reconstruction on SmolLM2-135M: which steps and learning rate, and what it buys.

Every row prunes the same model on the same calibration windows with Wanda's mask (at the given
sparsity), then fits each pruned block (``--pruning.reconstruct``) for the given Adam steps and
learning rate; perplexity on held-out Wikipedia and the pruning wall time, each as a ratio to the
plain Wanda row of the same run. What chose the defaults of ``--pruning.reconstruct_steps`` /
``_lr`` / ``_batch``.

    python benchmarks/llm_reconstruct.py                                   # 2:4, attn_mlp and block
    python benchmarks/llm_reconstruct.py --types 0.5 --lrs 1e-4 --steps 50 --nsamples 32 --seqlen 512
    # which target: the dense block on the pruned model's inputs, or the dense model's own stream
    python benchmarks/llm_reconstruct.py --modes block --steps 20 --lrs 1e-3 --targets pruned dense \
        --nsamples 8 --eval-windows 8 --also news --name llm_reconstruct_target
"""
from __future__ import annotations

import argparse
import itertools

from common import Runner, perplexity_on, settings_of, write_table

from wanda_pl.data.text_module import TextDataModule
from wanda_pl.modules.causal_lm import CausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", nargs="+", default=["2:4"])
    ap.add_argument("--modes", nargs="+", default=["attn_mlp", "block"])
    ap.add_argument("--steps", nargs="+", type=int, default=[20, 50])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", nargs="+", default=["pruned"], choices=["pruned", "dense"])
    ap.add_argument("--also", default=None, help="a second held-out text (news)")
    ap.add_argument("--name", default="llm_reconstruct")
    args = ap.parse_args()
    also = (lambda: f" {perplexity_on(module, args.also, args.seqlen, args.eval_windows):.3f} |") if args.also else (lambda: "")

    module = CausalLM(args.model)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows)
    dm.prepare_for(module)
    runner = Runner(module, dm)
    dense = runner.dense_metrics()["ppl"]
    rows, report = [f"| dense | - | - | - | - | {dense:.3f} | - | - |{also()}"], None
    for sparsity_type in args.types:
        kind = {"sparsity_type": sparsity_type} if ":" in sparsity_type else {"sparsity_ratio": float(sparsity_type)}
        base = runner.run(method=args.method, **kind)
        ref_ppl, ref_s = base["metrics"]["ppl"]["pruned"], base["time_s"]["calibration"] + base["time_s"]["prune"]
        rows.append(f"| {sparsity_type} | none | - | - | - | {ref_ppl:.3f} | 1.00 | {ref_s:.0f} (1.0x) |{also()}")
        print(rows[-1], flush=True)
        for mode, steps, lr, target in itertools.product(args.modes, args.steps, args.lrs, args.targets):
            report = runner.run(method=args.method, reconstruct=mode, reconstruct_steps=steps, reconstruct_lr=lr,
                                reconstruct_batch=args.batch, reconstruct_target=target, **kind)
            ppl, wall = report["metrics"]["ppl"]["pruned"], report["time_s"]["calibration"] + report["time_s"]["prune"]
            rows.append(f"| {sparsity_type} | {mode} | {steps} | {lr:g} | {target} | {ppl:.3f} | {ppl / ref_ppl:.2f} | "
                        f"{wall:.0f} ({wall / ref_s:.1f}x) |{also()}")
            print(rows[-1], flush=True)
    header = ("| sparsity | reconstruct | steps | lr | target | perplexity | / no reconstruction | pruning wall s (x none) |"
              + (f" {args.also} perplexity |" if args.also else ""))
    write_table(args.name, header, rows, settings_of(report or base, method=args.method, batch=args.batch,
                                                             dense_ppl=dense, also=args.also))


if __name__ == "__main__":
    main()
