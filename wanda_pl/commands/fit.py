"""The ``fit`` command's report: sparse fine-tuning with every mask kept, measured before and after.

Like ``prune``, it runs in every process under DDP (Lightning relaunches the script per rank);
the work happens inside ``trainer.validate``/``fit`` and only rank 0 writes. Outputs, written
atomically into ``output_dir``:

* ``report.json``: sparsity and metrics before and after, steps, time, mode, config;
* ``model/``: the fine-tuned model as a Hugging Face folder (LoRA: merged with the masked merge);
* ``masks.pt``: the masks (layer name -> bool, True = pruned);
* ``adapter/`` (LoRA): the unmerged adapters + masks (``wanda_pl.training.lora.load_adapter``).
"""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..callbacks import Pruning
from .outputs import check_output_dir, run_inputs, staged_dir
from .report import layer_sparsity, overall_sparsity, peak_memory, versions, write_json

log = logging.getLogger(__name__)


def _validate(trainer, model, datamodule) -> Dict[str, Any]:
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return dict(model.last_metrics)


@torch.no_grad()
def _probe_output(model, datamodule) -> Optional[torch.Tensor]:
    """The model's output on the first evaluation example (eval mode): compares merged and unmerged."""
    batch = next(iter(datamodule.val_dataloader()), None)
    if batch is None:
        return None
    x = batch[0][:1].to(model.device)
    was = model.training
    model.eval()
    try:
        return model(x).float().cpu()
    finally:
        model.train(was)


def fit_and_report(
    trainer,
    model,
    datamodule,
    fit: Callable[..., None],
    output_dir: str,
    ckpt_path: Optional[str] = None,
    save_model: bool = True,
    validate_before: bool = True,
    config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Validate (masks obtained and applied), ``fit`` (Lightning's own), merge LoRA with the
    masked merge, validate again and write the outputs."""
    t_start = time.perf_counter()
    if trainer.limit_val_batches == 0:
        raise ValueError("trainer.limit_val_batches=0 turns off the validation before and after fine-tuning; "
                         "to skip validating while fitting, set trainer.check_val_every_n_epoch high instead")
    pruning = next((c for c in trainer.callbacks if isinstance(c, Pruning)), None)
    inputs = run_inputs(config, model=getattr(model, "path", None), ckpt_path=ckpt_path,
                        masks_from=pruning.masks_from if pruning is not None else None)
    writes = {"trainer.default_root_dir": trainer.default_root_dir}
    check_output_dir(output_dir, inputs, writes)  # on every rank, before any work
    if hasattr(datamodule, "prepare_for"):
        datamodule.prepare_for(model)
    if pruning is not None and pruning.enabled and pruning.masks_from is None:
        pruning.check(model)
    is_lora = bool(getattr(model, "is_lora", False))

    stage_ctx = staged_dir(output_dir, inputs, "fit", writes) if trainer.is_global_zero else nullcontext()
    with stage_ctx as stage:
        # Before: on a resumed run the starting point is gone (the checkpoint holds trained weights).
        t0 = time.perf_counter()
        before = _validate(trainer, model, datamodule) if validate_before and ckpt_path is None else None
        t_before = time.perf_counter() - t0
        sparsity_measured = overall_sparsity(model.all_targets())

        t0 = time.perf_counter()
        fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        t_fit = time.perf_counter() - t0
        if trainer.interrupted:
            raise RuntimeError("fitting was interrupted; nothing written")

        masks = pruning.masks if pruning is not None else {}
        sparsity_before = pruning.start_sparsity if pruning is not None and pruning.start_sparsity is not None \
            else sparsity_measured
        mode = model.finetune_describe() if hasattr(model, "finetune_describe") else {}  # before merging
        merge: Dict[str, Any] = {}
        if is_lora:
            unmerged = _probe_output(model, datamodule)
            if trainer.is_global_zero:
                extra = {"load_with": "wanda_pl.training.lora.load_adapter(base_model, folder): applies masks.pt to the base too"}
                if pruning is not None and pruning.masks_source == "pruned" and pruning.method.needs_hessian:
                    # The solver changed the kept weights: the base is not the input model + masks.
                    model.save(stage / "adapter" / "base")
                    extra["base_model"] = "base"
                model.save_adapter(stage / "adapter", extra)
            merge["merged_layers"] = model.merge_lora()
            merged = _probe_output(model, datamodule)
            if unmerged is not None:
                merge["merged_vs_unmerged_max_abs_diff"] = float((merged - unmerged).abs().max())

        t0 = time.perf_counter()
        after = _validate(trainer, model, datamodule)
        t_after = time.perf_counter() - t0

        targets = model.all_targets()
        from ..training.lora import masked_nonzero

        losses = [float(x) for x in getattr(model, "train_losses", [])]
        report = {
            **model.describe(),
            **(pruning.describe() if pruning is not None else {}),
            **datamodule.describe(),
            **mode,
            "masks": {"layers": len(masks), "source": pruning.masks_source if pruning is not None else None,
                      "nonzero_at_pruned_positions": masked_nonzero(model.model, masks) if masks else 0},
            "sparsity_before": sparsity_before,
            "sparsity_after": overall_sparsity(targets),
            "metrics_before": before,
            "metrics_after": after,
            **merge,
            "resumed_from": ckpt_path,
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_loss": {"first": losses[0], "last": losses[-1], "steps_this_run": len(losses)} if losses else None,
            "time_s": {"validate_before": round(t_before, 3), "fit": round(t_fit, 3), "validate_after": round(t_after, 3),
                       "total": round(time.perf_counter() - t_start, 3)},
            "peak_memory_mb": peak_memory(),
            "devices": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "versions": versions(),
            "layers": layer_sparsity(targets),
            "config": config,
        }
        from ..training.sharding import full_state_dict

        whole = full_state_dict(model.model) if save_model else None  # sharded: gathered by every rank
        if trainer.is_global_zero:
            if save_model:
                model.save(stage / "model", **({"state_dict": whole} if whole is not None else {}))
            if masks:
                torch.save(masks, stage / "masks.pt")
            write_json(stage / "report.json", report)
            b = "n/a" if before is None else _fmt(before)
            print(f"{report.get('model')}: fine-tuned ({report.get('finetune', 'full')}) {report['steps']} steps; "
                  f"sparsity before {sparsity_before:.4f}, after {report['sparsity_after']:.4f}; "
                  f"metrics before {b}, after {_fmt(after)}")
    if trainer.is_global_zero:
        print(f"report: {Path(output_dir) / 'report.json'}")
    return report


def _fmt(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))) or "n/a"
