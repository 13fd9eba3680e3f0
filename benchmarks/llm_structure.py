"""A smaller SmolLM2-135M: structured pruning (MLP width by Wanda-sp, whole blocks by influence),
then recovery by distillation from the dense model, against dense in the same run.

Every model comes from one ``sweep`` (``--sweep.structures [width,depth]``, ``--save_model true``);
each is then fine-tuned with ``kl`` distillation from the dense model (its own process). Per row:
parameters removed (of all parameters, embeddings included), held-out Wikipedia and news perplexity,
zero-shot mean accuracy (lm-eval, the seven tasks), and prefill / decode speed against dense, each
model timed in turn within every round (``llm_speed.inference``).

Width is MLP channels only by default (``--heads 0``): SmolLM2 has 3 KV groups, so any head removal
takes a third of attention. A parameter share is turned into the MLP width that removes it.

    python benchmarks/llm_structure.py                      # about an hour on 2 cores
    python benchmarks/llm_structure.py --shares 0.2 --blocks 3 --zero-shot-limit 0 --steps 10   # a quick look
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import in_child, perplexity_on, trainer, write_table, settings_of

import lightning as L  # noqa: E402
import torch  # noqa: E402

from llm_speed import SPEED_HEADER, SPEED_ORDER, inference  # noqa: E402
from wanda_pl.callbacks import Calibration, Distillation, Pruning  # noqa: E402
from wanda_pl.commands.fit import fit_and_report  # noqa: E402
from wanda_pl.commands.sweep import Grid, sweep  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
from wanda_pl.eval.zero_shot import PAPER_TASKS, run_zero_shot  # noqa: E402
from wanda_pl.modules.causal_lm import CausalLM  # noqa: E402


def _data(args) -> TextDataModule:
    return TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows,
                          args.batch_size)


def mlp_width_for(model, share: float) -> float:
    """The MLP channel share whose removal takes ``share`` of all the model's parameters."""
    total = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    width = share * total / mlp
    if not 0 < width < 1:
        raise SystemExit(f"removing {share:g} of the parameters needs an MLP width of {width:.2f}: not in (0, 1)")
    return round(width, 4)


def _fit(args, folder: Path, out: Path) -> dict:
    """Distillation from the dense model (in a child process); the tuned model in ``out/model``."""
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    module = CausalLM(str(folder), learning_rate=args.lr)
    callbacks = [Calibration(), Pruning(enabled=False),
                 Distillation(args.model, args.loss, weight=args.weight, temperature=args.temperature)]
    t = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                  enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                  max_steps=args.steps, max_epochs=-1, gradient_clip_val=1.0, check_val_every_n_epoch=10**6,
                  callbacks=callbacks)
    report = fit_and_report(t, module, _data(args), lambda m, datamodule, ckpt_path: t.fit(m, datamodule=datamodule),
                            str(out), save_model=True)
    report["news"] = perplexity_on(module, "news", args.seqlen, args.eval_windows)
    return report


def _zero_shot(args, model: str) -> float:
    torch.set_num_threads(args.threads)
    module = CausalLM(model)
    return run_zero_shot(module.model, module.tokenizer, PAPER_TASKS, "embedded", args.zero_shot_limit, 8)["mean_acc"]


def _zs(args, model: str) -> str:
    if args.zero_shot_limit <= 0:
        return "-"
    t0 = time.perf_counter()
    acc = f"{100 * in_child(_zero_shot, args, model):.2f}"
    print(f"zero-shot {model}: {acc} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--score", default="wanda", help="width score: magnitude, wanda (Wanda-sp), flap")
    ap.add_argument("--shares", type=float, nargs="*", default=[0.2, 0.35], help="parameter shares removed by width")
    ap.add_argument("--heads", type=float, default=0.0, help="share of KV groups removed by the width points")
    ap.add_argument("--width-multiple", type=int, default=1,
                    help="kept MLP channels rounded to a multiple of this (--pruning.width_multiple)")
    ap.add_argument("--blocks", type=int, nargs="*", default=[3, 6], help="blocks removed by the depth points")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows, also the fine-tuning text")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--loss", default="kl")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-shot-limit", type=int, default=100, help="documents per task; 0: no zero-shot")
    ap.add_argument("--repeats", type=int, default=5, help="timed speed rounds (after one warm-up round); 0: no speed table (time the kept models later, quiet)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--zero-shot-points", nargs="*", help="the points that get zero-shot, 'dense' for the dense model (unset: every one)")
    ap.add_argument("--out", help="a folder to keep the sweep in (a rerun with the same settings resumes it)")
    ap.add_argument("--name", default="llm_structure", help="results/<name>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    module = CausalLM(args.model)
    widths = [mlp_width_for(module.model, s) for s in args.shares]
    structures = (["width"] if widths else []) + (["depth"] if args.blocks else [])
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or scratch
        t0 = time.perf_counter()
        summary = sweep(trainer([Calibration(), Pruning(args.score, width_heads=args.heads,
                                                                     width_multiple=args.width_multiple,
                                                                     structure="width" if widths else "none")]), module, _data(args),
                        Grid([args.score], widths, structures=structures, blocks=args.blocks or None),
                        str(Path(tmp) / "sweep"), save_model=True)
        print(f"sweep: {time.perf_counter() - t0:.0f} s", flush=True)
        dense = summary["dense"]["ppl"]
        del module
        dense_news = perplexity_on(CausalLM(args.model), "news", args.seqlen, args.eval_windows)
        dense_zs = _zs(args, args.model) if args.zero_shot_points is None or "dense" in args.zero_shot_points else "-"
        rows = [f"| dense | 0 | {dense:.2f} | {dense_news:.2f} | {dense_zs} | - | - | - | - |"]
        speed_models, last = {"dense": args.model}, None
        for row in summary["rows"]:
            folder = Path(tmp) / "sweep" / row["point"] / "model"
            news = perplexity_on(CausalLM(str(folder)), "news", args.seqlen, args.eval_windows)
            t0 = time.perf_counter()
            last = in_child(_fit, args, folder, Path(tmp) / f"fit-{row['point']}")
            distill_s = time.perf_counter() - t0
            tuned = Path(tmp) / f"fit-{row['point']}" / "model"
            after = last["metrics"]["ppl"]["after"]
            prune_s = row.get("time_calibration_s", 0) + row.get("time_prune_s", 0)
            zs = args.zero_shot_points is None or row["point"] in args.zero_shot_points
            rows.append(f"| {row['point']} | {row['parameters_removed']:.1%} | {row['ppl']:.2f} | {news:.2f} | "
                        f"{_zs(args, str(folder)) if zs else '-'} | {after:.2f} | {last['news']:.2f} | "
                        f"{_zs(args, str(tuned)) if zs else '-'} | "
                        f"{prune_s:.0f} / {distill_s:.0f} |")
            print(rows[-1], flush=True)
            speed_models[row["point"]] = str(folder)
        speed = inference(speed_models, args.repeats) if args.repeats else []
    header = ("| model | parameters removed | ppl | news ppl | zero-shot mean acc | ppl after distillation | "
              "news ppl after | zero-shot after | prune s / distill s |")
    rows += [] if not speed else ["", SPEED_HEADER, "|---|---|---|---|---|---|"] + speed
    write_table(args.name, header, rows, settings_of(
        {**(last or {}), "model": args.model}, score=args.score, shares=args.shares, mlp_widths=widths,
        width_multiple=args.width_multiple, heads=args.heads, blocks=args.blocks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        loss=args.loss, weight=args.weight, temperature=args.temperature, zero_shot_limit=args.zero_shot_limit,
        zero_shot_points=args.zero_shot_points or "all", repeats=args.repeats, threads=args.threads,
        speed=SPEED_ORDER + "; ratios to dense"))


if __name__ == "__main__":
    main()
