"""The ``fit`` command's report: sparse fine-tuning with every mask kept, measured before and after.

Like ``prune``, it runs in every process under DDP (Lightning relaunches the script per rank);
the work happens inside ``trainer.validate``/``fit`` and only rank 0 writes. Outputs, written
atomically into ``output_dir``:

* ``report.json``: sparsity and metrics before and after, steps, time, mode, config;
* ``model/``: the fine-tuned model as a Hugging Face folder (LoRA: merged with the masked merge),
  with its model card (``README.md``) and ``report.json``;
* ``layers.png``: sparsity per block and layer type after fine-tuning;
* ``masks.pt``: the masks (layer name -> bool, True = pruned);
* ``adapter/`` (LoRA): the unmerged adapters + masks (``wanda_pl.training.lora.load_adapter``).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from ..callbacks import Distillation, Pruning, ZeroShot
from ..callbacks.lookup import find_callback
from ..modules.protocol import require
from ..training import lora
from ..training.masks import MASKS_FILE, save_masks
from ..training.sharding import full_state_dict, layer_sparsity, overall_sparsity, weight_sparsity
from .card import write_card
from .steps import environment, evaluate, lightning_writes, staged_output
from .outputs import check_output_dir, run_inputs
from .plots import layers_png
from .report import FIT_SIDES, assemble, measured, write_json

log = logging.getLogger(__name__)


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
    """Fine-tune with every mask kept and write the report:

    1. check the input, on every rank, before any work; keep the distillation teacher (before pruning);
    2. measure before (the Pruning callback obtains and applies the masks as validation starts);
    3. fine-tune with Lightning's own ``fit``, every mask kept by the Pruning callback;
    4. LoRA: save the adapters as trained, then merge them (masked) into the weights;
    5. measure after;
    6. assemble the report; rank 0 writes it, the model, masks and picture atomically."""
    t_start = time.perf_counter()
    model = require(model)
    pruning = find_callback(trainer, Pruning)
    zero_shot = find_callback(trainer, ZeroShot)
    inputs, writes = _check(trainer, model, datamodule, pruning, config, output_dir, ckpt_path)  # 1
    distill = find_callback(trainer, Distillation)
    if distill is not None and distill.enabled:  # the dense weights, before the masks; a cache built here
        distill.prepare(model, datamodule, build_cache=os.environ.get("LOCAL_RANK", "0") == "0")
    with staged_output(trainer, output_dir, inputs, "fit", writes) as stage:
        # 2. On a resumed run the starting point is gone (the checkpoint holds trained weights).
        before = evaluate(trainer, model, datamodule, zero_shot) if validate_before and ckpt_path is None else None
        sparsity_measured = overall_sparsity(model.all_targets())
        t0 = time.perf_counter()
        fit(model, datamodule=datamodule, ckpt_path=ckpt_path)  # 3
        t_fit = time.perf_counter() - t0
        if trainer.interrupted:
            raise RuntimeError("fitting was interrupted; nothing written")
        masks = pruning.masks if pruning is not None else {}
        sparsity_before = pruning.start_sparsity if pruning is not None and pruning.start_sparsity is not None \
            else sparsity_measured
        mode = model.finetune_describe()  # before merging
        if distill is not None:
            mode["distill"] = distill.describe()  # teacher, losses first and last, tokens seen
        merge = _merge_lora(trainer, model, datamodule, pruning, masks, stage)  # 4
        after = evaluate(trainer, model, datamodule, zero_shot)  # 5
        report = _report(trainer, model, datamodule, pruning, masks, (mode, merge), (before, after),  # 6
                         sparsity_before, ckpt_path, config,
                         {"fit": t_fit, "total": time.perf_counter() - t_start})
        whole = full_state_dict(model.model) if save_model else None  # sharded: gathered by every rank
        if trainer.is_global_zero:
            _write(stage, output_dir, model, report, masks, save_model, whole)
            b = "n/a" if before is None else _fmt(before.metrics)
            print(f"{report.get('model')}: fine-tuned ({report.get('finetune', 'full')}) {report['steps']} steps; "
                  f"sparsity before {sparsity_before:.4f}, after {report['sparsity_after']:.4f}; "
                  f"metrics before {b}, after {_fmt(after.metrics)}")
    if trainer.is_global_zero:
        print(f"report: {Path(output_dir) / 'report.json'}")
    return report


def _check(trainer, model, datamodule, pruning, config, output_dir, ckpt_path):
    """Step 1: the run's inputs and Lightning's folders, the output folder checked against them."""
    if trainer.limit_val_batches == 0:
        raise ValueError("trainer.limit_val_batches=0 turns off the validation before and after fine-tuning; "
                         "to skip validating while fitting, set trainer.check_val_every_n_epoch high instead")
    inputs = run_inputs(config, model=model.path, ckpt_path=ckpt_path,
                        masks_from=pruning.masks_from if pruning is not None else None)
    writes = lightning_writes(trainer)
    check_output_dir(output_dir, inputs, writes)
    datamodule.prepare_for(model)
    if pruning is not None and pruning.enabled and pruning.masks_from is None:
        pruning.settings.check(model)
    return inputs, writes


def _merge_lora(trainer, model, datamodule, pruning, masks, stage) -> Dict[str, Any]:
    """Step 4: the adapters saved as trained (rank 0), then merged with the masked merge; what the
    merge did, for the report (nothing without LoRA)."""
    if not lora.lora_layers(model.model):
        return {}
    unmerged = _probe_output(model, datamodule)
    if trainer.is_global_zero:
        extra = {"base_model": model.path,
                 "load_with": "wanda_pl.training.lora.load_adapter(base_model, folder): applies masks.pt to the base too"}
        if pruning is not None and pruning.masks_source == "pruned" and pruning.settings.method.needs_hessian:
            # The solver changed the kept weights: the base is not the input model + masks.
            model.save(stage / "adapter" / "base")
            extra["base_model"] = "base"
        lora.save_adapter(model.model, stage / "adapter", masks, extra)
    merge: Dict[str, Any] = {"merged_layers": len(lora.merge(model.model))}
    merged = _probe_output(model, datamodule)
    if unmerged is not None:
        merge["merged_vs_unmerged_max_abs_diff"] = float((merged - unmerged).abs().max())
    return merge


def _report(trainer, model, datamodule, pruning, masks, training, pair, sparsity_before, ckpt_path, config,
            times) -> Dict[str, Any]:
    """Step 6: the report; ``training`` is (fine-tuning mode, LoRA merge), ``pair`` (before or None, after)."""
    (mode, merge), (before, after) = training, pair
    targets = model.all_targets()
    losses = [float(x) for x in model.train_losses]
    return assemble(
        model=model.describe(),
        method=pruning.describe() if pruning is not None else {},
        data=datamodule.describe(),
        training={
            **mode,
            "masks": {"layers": len(masks), "source": pruning.masks_source if pruning is not None else None,
                      "nonzero_at_pruned_positions": lora.masked_nonzero(model.model, masks) if masks else 0},
            **merge,
            "resumed_from": ckpt_path,
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_loss": {"first": losses[0], "last": losses[-1], "steps_this_run": len(losses)} if losses else None,
            "strategy": type(trainer.strategy).__name__,
        },
        results={
            "sparsity_before": sparsity_before,
            "sparsity_after": overall_sparsity(targets),
            **weight_sparsity(model, targets),
            **measured(before, after, FIT_SIDES),
            **model.measured_on(after.metrics),
        },
        timing={"time_s": {"validate_before": round(0.0 if before is None else before.seconds, 3),
                           "fit": round(times["fit"], 3), "validate_after": round(after.seconds, 3),
                           "total": round(times["total"], 3)}},
        environment=environment(trainer),
        layers={"layers": layer_sparsity(targets)},
        config={"config": config},
    )


def _write(stage: Path, output_dir, model, report, masks, save_model: bool, whole) -> None:
    """Step 6 (rank 0): the model with its card, the masks, the report and its picture."""
    if save_model:
        model.save(stage / "model", **({"state_dict": whole} if whole is not None else {}))
        write_card(stage / "model", report, Path(output_dir) / "model")
    if masks:
        save_masks(masks, stage / MASKS_FILE)
    write_json(stage / "report.json", report)
    layers_png(stage / "layers.png", report["layers"], title=f"{report.get('model')}: after fine-tuning")

def _fmt(metrics: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float))) or "n/a"
