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
from ..core.distributed import check_calibration_shares
from ..core.layers.experts import expert_tokens, has_experts
from ..core.plan import describe as describe_plan
from ..eval.zero_shot import format_table
from ..methods.settings import PruningSettings
from ..modules.protocol import require
from ..training.masks import MASKS_DIR, MASKS_FILE, save_masks
from .card import write_card
from .steps import Evaluation, environment, evaluate, lightning_writes, staged_output
from .loggers import log_run
from .outputs import check_output_dir, run_inputs
from .plots import layers_png
from .resume import checkpoints_for
from ..training.sharding import layer_sparsity, overall_sparsity, weight_sparsity
from .report import assemble, measured, method_label, sparsity_table, write_json

PERMUTATIONS_FILE = "permutations.pt"


def prune(trainer, model, datamodule, output_dir: str = "outputs/prune", save_model: bool = False,
          validate_dense: bool = True, config: Optional[Dict[str, Any]] = None, dense: Optional[Evaluation] = None,
          sections: Optional[Dict[str, Dict[str, Any]]] = None, step: int = 0, resume: bool = False,
          checkpoints: bool = True, settings: Optional[PruningSettings] = None) -> Dict[str, Any]:
    """Calibrate, prune, validate dense and pruned, and write ``report.json`` (+ ids, model):

    1. check everything that can be wrong with the input, before any long work, on every rank;
    2. measure the dense baseline (``dense``: one measured before, as a sweep does once);
    3. prune with ``settings`` (unset: the Pruning callback's) as one explicit step, then measure:
       one validation run whose start prunes, wherever Lightning put the model (device, DDP ranks);
    4. assemble the report (every rank: sharded weights are counted by a collective);
    5. rank 0 writes the outputs atomically.

    ``sections``: more report sections; ``step``: the loggers' step for this run's numbers;
    ``checkpoints``: checkpoint every block so that ``resume`` can continue a killed run
    (:mod:`.resume`; offload disk always does: its pruned blocks are written as they are done)."""
    t_start = time.perf_counter()
    model = require(model)
    pruning = find_callback(trainer, Pruning, needed_for="the prune command")
    zero_shot = find_callback(trainer, ZeroShot)
    settings = settings or pruning.settings
    inputs, writes = _check(trainer, model, datamodule, pruning, settings, config, output_dir)  # 1
    disk = getattr(model, "disk", None)
    save_model = save_model or disk is not None  # offload disk writes the pruned model as it goes: it is kept
    if resume and not (checkpoints or disk):
        raise ValueError("--resume true continues from the per-block checkpoints, which --checkpoints false turns off")
    ckpt = checkpoints_for(trainer, model, datamodule, settings, output_dir, resume) if checkpoints or disk else None
    try:  # a failed run keeps the blocks it finished, for --resume
        with staged_output(trainer, output_dir, inputs, "prune", writes) as stage:
            if ckpt is not None:
                ckpt.open(disk)
            baseline_here = dense is None and validate_dense
            dense = _baseline(trainer, model, datamodule, zero_shot, pruning) if baseline_here else dense  # 2
            with pruning.run(settings, ckpt) as run:  # 3
                pruned = evaluate(trainer, model, datamodule, zero_shot)
            if disk is not None and trainer.is_global_zero:
                disk.finish()
            t_eval = (dense.seconds if baseline_here else 0.0) + pruned.seconds - run.result.total_s
            report = _report(trainer, model, datamodule, settings, run.result, (dense, pruned), config,  # 4
                             sections, {"eval": t_eval, "total": time.perf_counter() - t_start})
            log_run(trainer, report, step)
            if trainer.is_global_zero:  # 5
                _write(stage, output_dir, model, datamodule, settings, run.result, report, save_model, ckpt)
                print(f"{report['model']}: {_title(report)} -> actual sparsity {report['actual_sparsity']:.4f}; "
                      f"{_line(model, dense, pruned)} (evaluation: {report['evaluation']})")
    except BaseException:
        if ckpt is not None:
            ckpt.abandon()
        raise
    if ckpt is not None:
        ckpt.close()
    if trainer.is_global_zero:
        print(f"report: {Path(output_dir) / 'report.json'}")
    return report


def _check(trainer, model, datamodule, pruning, settings, config, output_dir):
    """Step 1: everything that can be wrong with the input fails here, on every rank alike; the run's
    inputs and the folders Lightning writes (an output folder may hold neither)."""
    if pruning.masks_from is not None:
        raise ValueError("pruning.masks_from takes masks instead of computing them: it is for fit/validate, not prune")
    inputs, writes = run_inputs(config, model=model.path), lightning_writes(trainer)
    check_output_dir(output_dir, inputs, writes)
    datamodule.prepare_for(model)
    settings.check(model)
    if settings.needs_activations:  # data-parallel calibration: at least one sample per rank
        check_calibration_shares(len(datamodule.calibration_data()), trainer.world_size)
    return inputs, writes


def _baseline(trainer, model, datamodule, zero_shot, pruning) -> Evaluation:
    """Step 2: the dense model measured, and shown at once rather than only after the long pruning."""
    with pruning.untouched():
        dense = evaluate(trainer, model, datamodule, zero_shot)
    if trainer.is_global_zero:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in dense.metrics.items() if isinstance(v, float))
        print(f"dense baseline ({dense.seconds:.0f} s): {shown}", flush=True)
    return dense


def _report(trainer, model, datamodule, settings, result, pair, config, sections, times) -> Dict[str, Any]:
    """Step 4: the report; ``pair`` is (dense or None, pruned)."""
    dense, pruned = pair
    targets = model.all_targets()
    disk = getattr(model, "disk", None)  # offloaded to disk: read back from the shards
    layers = disk.layer_sparsity(targets) if disk is not None else layer_sparsity(targets)
    return assemble(
        model=model.describe(),
        method=settings.describe(),
        data=datamodule.describe(),
        results={"actual_sparsity": disk.overall_sparsity(targets) if disk else overall_sparsity(targets),
                 **weight_sparsity(model, targets, disk.weight_zeros if disk else None),
                 "calibration_samples_per_rank": result.samples_per_rank,
                 **({"resumed_from_block": result.resumed_from} if result.resumed_from else {}),
                 **({"permutations": PERMUTATIONS_FILE} if result.permutations else {}),
                 **({"expert_tokens": expert_tokens(targets, result.tokens), "rare_expert_layers": result.rare}
                    if has_experts(targets) else {}),
                 **({"reconstruction": result.reconstruction} if result.reconstruction else {}),
                 **({"experts_pruned": result.experts,
                     "parameters": sum(p.numel() for p in model.model.parameters())} if result.experts else {}),
                 **({"structure_result": result.structure, "parameters": result.structure["parameters"]["after"],
                     "parameters_dense": result.structure["parameters"]["before"]} if result.structure else {}),
                 **_results(model, dense, pruned)},
        timing={"time_s": {
            "calibration": round(result.calibration_data_s + result.forward_s, 3),
            "prune": round(result.method_s, 3),
            "eval": round(times["eval"], 3),
            "total": round(times["total"], 3),
        }},
        environment=environment(trainer),
        layers={"layers": layers, "layers_planned": describe_plan(result.plan)},
        config={"config": config},
        **(sections or {}),
    )


def _write(stage: Path, output_dir, model, datamodule, settings, result, report, save_model: bool, ckpt) -> None:
    """Step 5 (rank 0): the calibration ids, permutations, model and masks, card, report and picture."""
    disk = getattr(model, "disk", None)
    if settings.needs_activations:
        torch.save(datamodule.calibration_data(), stage / "calibration_ids.pt")
    if result.permutations:
        torch.save(result.permutations, stage / PERMUTATIONS_FILE)
    if save_model and disk is not None:  # written block by block while pruning; masks one file a block
        os.replace(ckpt.folder / "model", stage / "model")
        ckpt.write_masks(stage / MASKS_DIR, len(disk.blocks))  # fit --pruning.masks_from output_dir
    elif save_model:
        model.save(stage / "model")
        save_masks(result.masks, stage / MASKS_FILE)  # fit --pruning.masks_from output_dir/masks.pt
    if save_model:
        write_card(stage / "model", report, Path(output_dir) / "model")
    write_json(stage / "report.json", report)
    layers_png(stage / "layers.png", report["layers"], report["layers_planned"], f"{report['model']}: {_title(report)}")
    print(sparsity_table(report["layers"]))


def _title(report: Dict[str, Any]) -> str:
    if report.get("structure") == "depth":
        return f"depth: {report['blocks_removed']} blocks removed"
    if report.get("structure") == "width":
        return f"{report['method']} width: mlp {report['width_mlp']:g}, heads {report['width_heads']:g}"
    return f"{method_label(report)} {report['sparsity_type']} {report['sparsity_ratio']:g}"


def _results(model, dense: Optional[Evaluation], pruned: Evaluation) -> Dict[str, Any]:
    return {**measured(dense, pruned), **model.measured_on(pruned.metrics)}


def _line(model, dense: Optional[Evaluation], pruned: Evaluation) -> str:
    line = model.metrics_line(None if dense is None else dense.metrics, pruned.metrics)
    if pruned.zero_shot is not None:
        line += "\nzero-shot accuracy (%):\n" + format_table((dense.zero_shot if dense else None) or {}, pruned.zero_shot)
    return line
