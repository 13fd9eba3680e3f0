"""Recovering what pruning cost: SmolLM2-135M pruned (2:4 and 50%, the best one-shot method we have:
Wanda's mask + ADMM's update), then fine-tuned with every mask kept, the same steps, windows and
learning rate, with (a) the next-token loss alone, (b) distillation from the dense model by ``kl``,
(c) by ``squarehead``; each for full fine-tuning and masked LoRA. Held-out perplexity before and
after (and on the news text, of another kind than the Wikipedia the model is tuned on), the share
of the gap to dense recovered, wall time, peak memory (each fine-tuning in its own process); zero-shot
accuracy (lm-eval, seven tasks) of the pruned model and of the best row of each loss; and what the
top-k cache's truncation costs (the KL against a teacher cut to its top k logits, against the full
KL, on the pruned model).

    python benchmarks/llm_recover.py                        # about 30 minutes on 2 cores
    python benchmarks/llm_recover.py --steps 20 --types 2:4 --modes full --zero-shot-limit 0   # a quick look
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import in_child, perplexity_on, settings_of, trainer, write_table

import lightning as L  # noqa: E402
import torch  # noqa: E402

from wanda_pl.callbacks import Calibration, Distillation, Pruning  # noqa: E402
from wanda_pl.commands.fit import fit_and_report  # noqa: E402
from wanda_pl.commands.prune import prune  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
from wanda_pl.eval.zero_shot import PAPER_TASKS, run_zero_shot  # noqa: E402
from wanda_pl.modules.causal_lm import CausalLM  # noqa: E402
from wanda_pl.training.distill import kl, kl_top_k  # noqa: E402

LOSSES = ("next-token", "kl", "squarehead")


def _data(args) -> TextDataModule:
    return TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows,
                          args.batch_size)


def _prune(args, sparsity_type: str, out: Path) -> dict:
    """The pruned model and its masks in ``out`` (prune --save_model true)."""
    module = CausalLM(args.model)
    dm = _data(args)
    ratio = {} if ":" in sparsity_type else {"sparsity_ratio": float(sparsity_type)}
    pruning = Pruning("wanda", sparsity_type="unstructured" if ratio else sparsity_type, update="admm", **ratio)
    return prune(trainer([Calibration(), pruning]), module, dm, str(out), save_model=True, checkpoints=False)


def _fit(args, folder: Path, mode: str, loss: str, out: Path) -> dict:
    """One fine-tuning (in a child process: ``in_child``); its report, the news perplexity after, and
    the tuned weights in ``out/model`` when zero-shot is asked for."""
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    module = CausalLM(str(folder / "model"), finetune=mode, learning_rate=args.lr[mode])
    callbacks = [Calibration(), Pruning(enabled=False, masks_from=str(folder / "masks.pt"))]
    if loss != "next-token":
        callbacks.append(Distillation(args.model, loss, weight=args.weight, temperature=args.temperature))
    t = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                  enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                  max_steps=args.steps, max_epochs=-1, gradient_clip_val=1.0, check_val_every_n_epoch=10**6,
                  callbacks=callbacks)
    report = fit_and_report(t, module, _data(args), lambda m, datamodule, ckpt_path: t.fit(m, datamodule=datamodule),
                            str(out), save_model=args.zero_shot_limit > 0)
    report["also_after"] = perplexity_on(module, args.also, args.seqlen, args.eval_windows) if args.also else None
    return report


def _zero_shot(args, model: str) -> dict:
    torch.set_num_threads(args.threads)
    module = CausalLM(model)
    return run_zero_shot(module.model, module.tokenizer, PAPER_TASKS, "embedded", args.zero_shot_limit, 8)


@torch.no_grad()
def _truncation(args, folder: Path, ks) -> dict:
    """KL(dense || pruned) on the evaluation windows in full and with the teacher cut to its top k."""
    student, teacher = CausalLM(str(folder / "model")), CausalLM(args.model)
    dm = _data(args)
    dm.prepare_for(student)
    full, cut = 0.0, {k: 0.0 for k in ks}
    windows = dm.evaluation_ids()
    for ids in windows.split(1):
        s, t = student(ids), teacher(ids)
        full += float(kl(s, t))
        for k in ks:
            top = t.topk(k, dim=-1)
            cut[k] += float(kl_top_k(s, top.values.half(), top.indices, 1.0))
    return {"full": full / len(windows), **{k: v / len(windows) for k, v in cut.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", nargs="+", default=["2:4", "0.5"])
    ap.add_argument("--modes", nargs="+", default=["full", "lora"])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows, also the fine-tuning text")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--weight", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--also", default="news", help="a second held-out text ('' for none)")
    ap.add_argument("--zero-shot-limit", type=int, default=100,
                    help="documents per task for the zero-shot rows (pruned, best of each loss); 0: none")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--name", default="llm_recover", help="results/<name>.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.lr = {"full": args.lr_full, "lora": args.lr_lora}

    rows, last, zero_shot = [], None, []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity_type in args.types:
            folder = Path(tmp) / f"pruned-{sparsity_type.replace(':', '-')}"
            t0 = time.perf_counter()
            pruned = _prune(args, sparsity_type, folder)
            dense, before = pruned["metrics"]["ppl"]["dense"], pruned["metrics"]["ppl"]["pruned"]
            also = _also_before(args, folder)
            print(f"{sparsity_type}: dense {dense:.3f}, pruned {before:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            cost = _truncation(args, folder, (16, 64, 256))
            rows.append(f"| {sparsity_type} | (one-shot: wanda + admm) | - | {before:.3f} | - | "
                        f"KL(dense \\|\\| pruned) full {cost['full']:.4f}; top-16 {cost[16]:.4f}, top-64 "
                        f"{cost[64]:.4f}, top-256 {cost[256]:.4f} | {_fmt(also['pruned'])} (dense {_fmt(also['dense'])}) "
                        f"| - | - |")
            best = {}
            for mode in args.modes:
                for loss in args.losses:
                    t0 = time.perf_counter()
                    out = Path(tmp) / f"fit-{sparsity_type}-{mode}-{loss}".replace(":", "-")
                    last = in_child(_fit, args, folder, mode, loss, out)
                    after = last["metrics"]["ppl"]["after"]
                    assert last["sparsity_after"] == last["sparsity_before"], "fine-tuning changed the sparsity"
                    recovered = (before - after) / (before - dense)
                    wall = time.perf_counter() - t0
                    rows.append(f"| {sparsity_type} | {mode} | {loss} | {before:.3f} | {after:.3f} | "
                                f"{recovered:.1%} of the gap to dense {dense:.3f} | "
                                f"{_fmt(also['pruned'])} -> {_fmt(last['also_after'])} | {wall:.0f} "
                                f"({last['time_s']['fit']:.0f} training) | {last['peak_memory_mb']['cpu_rss_mb']:.0f} |")
                    print(rows[-1], flush=True)
                    kind = "next-token" if loss == "next-token" else "distillation"
                    if after < best.get(kind, (float("inf"),))[0]:
                        best[kind] = (after, f"{mode}, {loss}", out / "model")
            if args.zero_shot_limit > 0:
                zero_shot.append(_zero_shot_row(args, sparsity_type, "dense", args.model))
                zero_shot.append(_zero_shot_row(args, sparsity_type, "pruned (one-shot)", str(folder / "model")))
                for kind, (_, which, model) in best.items():
                    zero_shot.append(_zero_shot_row(args, sparsity_type, f"best {kind}: {which}", str(model)))
    header = (f"| sparsity | fine-tuning | loss | perplexity pruned | after | recovered | {args.also or '-'} "
              "perplexity | wall s (training) | peak RSS MB |")
    if zero_shot:
        rows += ["", "| sparsity | model | " + " | ".join(PAPER_TASKS) + " | mean acc | mean acc_norm* |",
                 "|" + "---|" * (len(PAPER_TASKS) + 4)] + zero_shot
    write_table(args.name, header, rows, settings_of(
        {**last, "model": args.model}, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight=args.weight,
        temperature=args.temperature, one_shot="wanda + update admm", modes=args.modes, losses=args.losses,
        also=args.also, zero_shot_limit=args.zero_shot_limit, threads=args.threads,
        peak="peak resident memory of the process that ran the fine-tuning (one per row)"))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _also_before(args, folder: Path) -> dict:
    if not args.also:
        return {"dense": None, "pruned": None}
    return {"dense": perplexity_on(CausalLM(args.model), args.also, args.seqlen, args.eval_windows),
            "pruned": perplexity_on(CausalLM(str(folder / "model")), args.also, args.seqlen, args.eval_windows)}


def _zero_shot_row(args, sparsity_type: str, name: str, model: str) -> str:
    t0 = time.perf_counter()
    res = in_child(_zero_shot, args, model)
    row = (f"| {sparsity_type} | {name} | " + " | ".join(f"{100 * res['tasks'][t]['acc']:.1f}" for t in PAPER_TASKS)
           + f" | {100 * res['mean_acc']:.2f} | {100 * res['mean_acc_norm']:.2f} |")
    print(row, f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


if __name__ == "__main__":
    main()
