"""The ``prune`` command: validate dense, prune, validate pruned, write the report.

It runs in every process under DDP (Lightning relaunches the script per rank), so the heavy work
happens inside ``trainer.validate`` runs; only rank 0 writes. Outputs, written atomically into
``output_dir``: ``report.json``, ``layers.png`` (sparsity per block and layer type, planned and
actual), ``calibration_ids.pt`` (the exact calibration inputs, for replay), and with ``save_model``
the pruned model (``model/``, with its model card and report) and its masks (``masks.pt``); with RIA's
channel permutation, ``permutations.pt`` (layer -> the input-column order under which its mask is N:M,
what a 2:4 kernel needs). The numbers go to the trainer's loggers too.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..callbacks import Pruning, ZeroShot
from ..callbacks.lookup import find_callback
from ..core.distributed import share
from ..core.plan import describe as describe_plan
from ..eval.zero_shot import format_table
from ..modules.protocol import require
from ..training.masks import MASKS_DIR, MASKS_FILE, save_masks
from .card import write_card
from .common import Evaluation, environment, evaluate, lightning_writes, staged_output
from .loggers import log_run
from .outputs import check_output_dir, run_inputs
from .plots import layers_png
from .resume import checkpoints_for
from ..training.sharding import layer_sparsity, overall_sparsity
from .report import assemble, method_label, sparsity_table, write_json

PERMUTATIONS_FILE = "permutations.pt"


def prune(
    trainer,
    model,
    datamodule,
    output_dir: str = "outputs/prune",
    save_model: bool = False,
    validate_dense: bool = True,
    config: Optional[Dict[str, Any]] = None,
    dense: Optional[Evaluation] = None,
    sections: Optional[Dict[str, Dict[str, Any]]] = None,
    step: int = 0,
    resume: bool = False,
    checkpoints: bool = True,
) -> Dict[str, Any]:
    """Calibrate, prune, validate dense and pruned, and write ``report.json`` (+ ids, model).

    ``dense``: a baseline measured before (a sweep measures it once), used instead of measuring;
    ``sections``: more report sections; ``step``: the loggers' step for this run's numbers;
    ``checkpoints``: checkpoint every block so that ``resume`` can continue a killed run
    (:mod:`.resume`; offload disk always does: its pruned blocks are written as they are done)."""
    t_start = time.perf_counter()
    model = require(model)
    pruning = find_callback(trainer, Pruning, needed_for="the prune command")
    zero_shot = find_callback(trainer, ZeroShot)
    if pruning.masks_from is not None:
        raise ValueError("pruning.masks_from takes masks instead of computing them: it is for fit/validate, not prune")
    pruning.enabled = False  # the dense baseline first; step 2 arms it
    # Everything that can be wrong with the input fails here, before any long work, on every rank alike.
    inputs, writes = run_inputs(config, model=model.path), lightning_writes(trainer)
    check_output_dir(output_dir, inputs, writes)
    datamodule.prepare_for(model)
    pruning.check(model)
    if pruning.needs_activations:  # data-parallel calibration: at least one sample per rank
        share(len(datamodule.calibration_data()), 0, trainer.world_size)
    disk = getattr(model, "disk", None)
    save_model = save_model or disk is not None  # offload disk writes the pruned model as it goes: it is kept
    if resume and not (checkpoints or disk):
        raise ValueError("--resume true continues from the per-block checkpoints, which --checkpoints false turns off")
    ckpt = checkpoints_for(trainer, model, datamodule, pruning, output_dir, resume) if checkpoints or disk else None

    try:  # a failed run keeps the blocks it finished, for --resume
        with staged_output(trainer, output_dir, inputs, "prune", writes) as stage:
            pruning.checkpoints = ckpt
            if ckpt is not None:
                ckpt.open()
                if disk is not None:
                    disk.write_to(ckpt.folder / "model")
            # 1. The dense baseline, shown at once rather than only after the long pruning.
            measure = dense is None and validate_dense
            dense = evaluate(trainer, model, datamodule, zero_shot) if measure else dense
            if measure and trainer.is_global_zero:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in dense.metrics.items() if isinstance(v, float))
                print(f"dense baseline ({dense.seconds:.0f} s): {shown}", flush=True)
            # 2 + 3. Prune, then measure: one validation run whose start the Pruning callback prunes at,
            # so the masks are computed wherever Lightning put the model (device, DDP ranks).
            with pruning.armed():
                pruned = evaluate(trainer, model, datamodule, zero_shot)
            outcome = pruning.outcome
            if disk is not None and trainer.is_global_zero:
                disk.finish()
            # 4. The report.
            targets = model.all_targets()
            # every rank: sharded weights are counted by a collective; offloaded to disk: read back from the shards
            layers = disk.layer_sparsity(targets) if disk is not None else layer_sparsity(targets)
            t_eval = (dense.seconds if measure else 0.0) + pruned.seconds - outcome.total_s
            report = assemble(
                model=model.describe(),
                method=pruning.describe(),
                data=datamodule.describe(),
                results={"actual_sparsity": disk.overall_sparsity(targets) if disk else overall_sparsity(targets),
                         "calibration_samples_per_rank": outcome.samples_per_rank,
                         **({"resumed_from_block": outcome.resumed_from} if outcome.resumed_from else {}),
                         **({"permutations": PERMUTATIONS_FILE} if outcome.permutations else {}),
                         **_results(model, dense, pruned)},
                timing={"time_s": {
                    "calibration": round(outcome.calibration_data_s + outcome.forward_s, 3),
                    "prune": round(outcome.method_s, 3),
                    "eval": round(t_eval, 3),
                    "total": round(time.perf_counter() - t_start, 3),
                }},
                environment=environment(trainer),
                layers={"layers": layers, "layers_planned": describe_plan(outcome.plan)},
                config={"config": config},
                **(sections or {}),
            )
            log_run(trainer, report, step)
            if trainer.is_global_zero:
                if pruning.needs_activations:
                    torch.save(datamodule.calibration_data(), stage / "calibration_ids.pt")
                if outcome.permutations:
                    torch.save(outcome.permutations, stage / PERMUTATIONS_FILE)
                if save_model and disk is not None:  # written block by block while pruning; masks one file a block
                    os.replace(ckpt.folder / "model", stage / "model")
                    ckpt.write_masks(stage / MASKS_DIR, len(disk.blocks))  # fit --pruning.masks_from output_dir
                elif save_model:
                    model.save(stage / "model")
                    save_masks(pruning.masks, stage / MASKS_FILE)  # fit --pruning.masks_from output_dir/masks.pt
                if save_model:
                    write_card(stage / "model", report, Path(output_dir) / "model")
                write_json(stage / "report.json", report)
                layers_png(stage / "layers.png", layers, report["layers_planned"],
                           f"{report['model']}: {method_label(report)} {report['sparsity_type']} {report['sparsity_ratio']:g}")
                print(sparsity_table(layers))
                print(f"{report['model']}: {method_label(report)} {report['sparsity_type']} {report['sparsity_ratio']:g} -> "
                      f"actual sparsity {report['actual_sparsity']:.4f}; {_line(model, dense, pruned)} "
                      f"(evaluation: {report['evaluation']})")
    except BaseException:
        if ckpt is not None:
            ckpt.abandon()
        raise
    if ckpt is not None:
        ckpt.close()
    if trainer.is_global_zero:
        print(f"report: {Path(output_dir) / 'report.json'}")
    return report


def _results(model, dense: Optional[Evaluation], pruned: Evaluation) -> Dict[str, Any]:
    out = model.metrics_report(None if dense is None else dense.metrics, pruned.metrics)
    if pruned.zero_shot is not None:
        out["zero_shot"] = {"dense": None if dense is None else dense.zero_shot, "pruned": pruned.zero_shot}
    return out


def _line(model, dense: Optional[Evaluation], pruned: Evaluation) -> str:
    line = model.metrics_line(None if dense is None else dense.metrics, pruned.metrics)
    if pruned.zero_shot is not None:
        line += "\nzero-shot accuracy (%):\n" + format_table((dense.zero_shot if dense else None) or {}, pruned.zero_shot)
    return line
