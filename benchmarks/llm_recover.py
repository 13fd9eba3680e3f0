"""Recovering what pruning cost: SmolLM2-135M pruned (2:4 and 50%, the best one-shot method we have:
Wanda's mask + ADMM's update), then fine-tuned with every mask kept, the same steps, windows and
learning rate, with (a) the next-token loss alone, (b) distillation from the dense model by ``kl``,
(c) by ``squarehead``; each for full fine-tuning and masked LoRA. Held-out perplexity before and
after, the share of the gap to dense recovered, wall time; and what the top-k cache's truncation
costs (the KL against a teacher cut to its top k logits, against the full KL, on the pruned model).

    python benchmarks/llm_recover.py                        # about 30 minutes on 2 cores
    python benchmarks/llm_recover.py --steps 20 --types 2:4 --modes full   # a quick look
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import settings_of, trainer, write_table

import lightning as L  # noqa: E402
import torch  # noqa: E402

from wanda_pl.callbacks import Calibration, Distillation, Pruning  # noqa: E402
from wanda_pl.commands.fit import fit_and_report  # noqa: E402
from wanda_pl.commands.prune import prune  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
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
    L.seed_everything(args.seed, verbose=False)
    module = CausalLM(str(folder / "model"), finetune=mode, learning_rate=args.lr[mode])
    callbacks = [Calibration(), Pruning(enabled=False, masks_from=str(folder / "masks.pt"))]
    if loss != "next-token":
        callbacks.append(Distillation(args.model, loss, weight=args.weight, temperature=args.temperature))
    t = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                  enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                  max_steps=args.steps, max_epochs=-1, gradient_clip_val=1.0, check_val_every_n_epoch=10**6,
                  callbacks=callbacks)
    return fit_and_report(t, module, _data(args), lambda m, datamodule, ckpt_path: t.fit(m, datamodule=datamodule),
                          str(out), save_model=False)


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
    args = ap.parse_args()
    args.lr = {"full": args.lr_full, "lora": args.lr_lora}

    rows, last = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity_type in args.types:
            folder = Path(tmp) / f"pruned-{sparsity_type.replace(':', '-')}"
            t0 = time.perf_counter()
            pruned = _prune(args, sparsity_type, folder)
            dense, before = pruned["metrics"]["ppl"]["dense"], pruned["metrics"]["ppl"]["pruned"]
            print(f"{sparsity_type}: dense {dense:.3f}, pruned {before:.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            cost = _truncation(args, folder, (16, 64, 256))
            rows.append(f"| {sparsity_type} | (one-shot: wanda + admm) | - | {before:.3f} | - | "
                        f"KL(dense \\|\\| pruned) full {cost['full']:.4f}; top-16 {cost[16]:.4f}, top-64 "
                        f"{cost[64]:.4f}, top-256 {cost[256]:.4f} | - |")
            for mode in args.modes:
                for loss in args.losses:
                    t0 = time.perf_counter()
                    last = _fit(args, folder, mode, loss, Path(tmp) / f"fit-{sparsity_type}-{mode}-{loss}".replace(":", "-"))
                    after = last["metrics"]["ppl"]["after"]
                    assert last["sparsity_after"] == last["sparsity_before"], "fine-tuning changed the sparsity"
                    recovered = (before - after) / (before - dense)
                    wall = time.perf_counter() - t0
                    rows.append(f"| {sparsity_type} | {mode} | {loss} | {before:.3f} | {after:.3f} | "
                                f"{recovered:.1%} of the gap to dense {dense:.3f} | {wall:.0f} ({last['time_s']['fit']:.0f} "
                                f"training) |")
                    print(rows[-1], flush=True)
    header = ("| sparsity | fine-tuning | loss | perplexity pruned | after | recovered | wall s (training) |")
    write_table("llm_recover", header, rows, settings_of(
        {**last, "model": args.model}, steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight=args.weight,
        temperature=args.temperature, one_shot="wanda + update admm", modes=args.modes, losses=args.losses))


if __name__ == "__main__":
    main()
