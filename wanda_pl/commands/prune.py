"""The bodies of the CLI subcommands that Lightning's Trainer does not have.

They run in every process under DDP (Lightning relaunches the script per rank), so all
the heavy work happens inside ``trainer.validate``/``fit`` hooks; only rank 0 writes."""
from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..callbacks import Pruning
from .outputs import check_output_dir, run_inputs, staged_dir
from .report import overall_sparsity, layer_sparsity, peak_memory, sparsity_table, versions, write_json

log = logging.getLogger(__name__)


def _pruning_callback(trainer) -> Pruning:
    found = [c for c in trainer.callbacks if isinstance(c, Pruning)]
    if not found:
        raise RuntimeError("the prune command needs the Pruning callback (the CLI adds it as --pruning.*)")
    return found[0]


def _validate(trainer, model, datamodule) -> Dict[str, float]:
    trainer.validate(model, datamodule=datamodule, verbose=False)
    return dict(model.last_metrics)


def prune(
    trainer,
    model,
    datamodule,
    output_dir: str = "outputs/prune",
    save_model: bool = False,
    validate_dense: bool = True,
    config: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Calibrate, prune, validate dense and pruned, and write ``report.json`` (+ ids, model)."""
    t_start = time.perf_counter()
    pruning = _pruning_callback(trainer)
    if pruning.masks_from is not None:
        raise ValueError("pruning.masks_from takes masks instead of computing them: it is for fit/validate, not prune")
    pruning.enabled = False
    # Everything that can be wrong with the input fails here, before any long work.
    inputs = run_inputs(config, model=model.path)
    writes = {"trainer.default_root_dir": trainer.default_root_dir}
    check_output_dir(output_dir, inputs, writes)  # on every rank: each must fail alike
    datamodule.prepare_for(model)
    pruning.check(model)

    # Only rank 0 stages and commits the output: under DDP every rank runs this function, and
    # another rank's (empty) stage committed after rank 0's would replace the finished output.
    stage_ctx = staged_dir(output_dir, inputs, "prune", writes) if trainer.is_global_zero else nullcontext()
    with stage_ctx as stage:
        t0 = time.perf_counter()
        dense = _validate(trainer, model, datamodule) if validate_dense else None
        t_eval = time.perf_counter() - t0
        if dense is not None and trainer.is_global_zero:  # the baseline now, not only after the long pruning
            shown = ", ".join(f"{k} {v:.4f}" for k, v in dense.items() if isinstance(v, float))
            print(f"dense baseline ({t_eval:.0f} s): {shown}", flush=True)

        pruning.enabled = True
        t0 = time.perf_counter()
        pruned = _validate(trainer, model, datamodule)
        t_pruned_total = time.perf_counter() - t0
        times = pruning.times
        t_eval += t_pruned_total - times["prune"]

        targets = model.all_targets()
        layers = layer_sparsity(targets)
        report = {
            **model.describe(),
            **pruning.describe(),
            **datamodule.describe(),
            "actual_sparsity": overall_sparsity(targets),
            **model.metrics_report(dense, pruned),
            "time_s": {
                "calibration": round(times["calibration_data"] + times["prune_forward"], 3),
                "prune": round(times["prune_metric"], 3),
                "eval": round(t_eval, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
            "peak_memory_mb": peak_memory(),
            "devices": trainer.world_size,
            "versions": versions(),
            "layers": layers,
            "config": config,
        }
        if trainer.is_global_zero:
            if pruning.needs_activations:
                torch.save(datamodule.calibration_data(), stage / "calibration_ids.pt")
            if save_model:
                model.save(stage / "model")
                torch.save(pruning.masks, stage / "masks.pt")  # fit --pruning.masks_from output_dir/masks.pt
            write_json(stage / "report.json", report)
            print(sparsity_table(layers))
            print(
                f"{report['model']}: {report['method']} {report['sparsity_type']} {report['sparsity_ratio']:g} -> "
                f"actual sparsity {report['actual_sparsity']:.4f}; {model.metrics_line(dense, pruned)} "
                f"(evaluation: {report['evaluation']})"
            )
    if trainer.is_global_zero:
        print(f"report: {Path(output_dir) / 'report.json'}")
    return report
