"""Prune, then fine-tune with every mask kept: the embedded SmolLM2-135M at 2:4 with Wanda, then
masked LoRA (r=8, alpha=16, dropout 0.05, q_proj and v_proj) on the calibration text, merged with
the masked merge. Perplexity dense / pruned / fine-tuned on held-out Wikipedia text and the
sparsity before and after (equal, exactly). Sized for 2 CPU cores in under 20 minutes:

    python benchmarks/llm_finetune.py                         # seqlen 256, 100 steps
    python benchmarks/llm_finetune.py --steps 300 --mode full # longer, or dense (masked) fine-tuning
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import settings_of, write_table

import lightning as L  # noqa: E402

from wanda_pl.callbacks import Calibration, Pruning  # noqa: E402
from wanda_pl.data.text_module import TextDataModule  # noqa: E402
from wanda_pl.commands.fit import fit_and_report  # noqa: E402
from wanda_pl.modules.causal_lm import CausalLM  # noqa: E402


class Progress(L.Callback):
    def __init__(self, every: int) -> None:
        self.every, self.t0 = every, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            print(f"step {step}: loss {float(outputs['loss']):.4f} ({time.perf_counter() - self.t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity-type", default="2:4")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows, also the fine-tuning text")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3, help="the reference's 1e-4 is for far longer runs on C4")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    L.seed_everything(args.seed, verbose=False)
    module = CausalLM(args.model, finetune=args.mode, learning_rate=args.lr, weight_decay=args.weight_decay)
    dm = TextDataModule("wikipedia", "wikipedia", args.nsamples, args.seqlen, args.seed, args.eval_windows, args.batch_size)
    dm.prepare_for(module)
    pruning = Pruning(method=args.method, sparsity_type=args.sparsity_type, enabled=False)
    t = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False, use_distributed_sampler=False,
                  enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                  max_steps=args.steps, max_epochs=-1, gradient_clip_val=1.0, check_val_every_n_epoch=10**6,
                  callbacks=[Calibration(), pruning, Progress(10)])

    t0 = time.perf_counter()
    t.validate(module, datamodule=dm, verbose=False)
    dense, t_dense = module.validation_metrics(), time.perf_counter() - t0
    print(f"dense perplexity {dense['ppl']:.3f} ({t_dense:.0f} s)", flush=True)

    pruning.enabled = True
    with tempfile.TemporaryDirectory() as out:
        report = fit_and_report(
            t, module, dm, lambda m, datamodule, ckpt_path: t.fit(m, datamodule=datamodule, ckpt_path=ckpt_path),
            str(Path(out) / "run"), save_model=False,
        )
    ts = report["time_s"]
    before, after = report["metrics"]["ppl"]["before"], report["metrics"]["ppl"]["after"]
    rows = [
        f"| dense | {dense['ppl']:.2f} | 0.0000 | - | {t_dense:.0f} |",
        f"| {args.method} {args.sparsity_type} | {before:.2f} | {report['sparsity_before']:.4f} | - | "
        f"{ts['validate_before']:.0f} (prune + eval) |",
        f"| + {args.mode} fine-tuning, {report['steps']} steps{' (merged)' if args.mode == 'lora' else ''} | {after:.2f} | "
        f"{report['sparsity_after']:.4f} | {report['train_loss']['first']:.3f} -> {report['train_loss']['last']:.3f} | "
        f"{ts['fit']:.0f} (train) + {ts['validate_after']:.0f} (eval) |",
    ]
    assert report["sparsity_after"] == report["sparsity_before"], "fine-tuning changed the sparsity"
    header = "| model | perplexity | sparsity | train loss first -> last | time (s) |"
    extra = {k: report.get(k) for k in ("finetune", "learning_rate", "weight_decay", "lora_r", "lora_alpha",
                                        "lora_dropout", "lora_targets", "trainable_params",
                                        "merged_vs_unmerged_max_abs_diff")}
    write_table(f"llm_finetune{'' if args.mode == 'lora' else '_full'}", header, rows,
                settings_of(report, method=args.method, sparsity_type=args.sparsity_type, steps=report["steps"],
                            batch_size=args.batch_size, masks_kept=report["masks"], **extra))


if __name__ == "__main__":
    main()
