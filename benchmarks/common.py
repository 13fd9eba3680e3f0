"""Shared helpers for the benchmark scripts: one Trainer per pruning run, dense weights restored between runs."""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from wanda_pl.callbacks import Calibration, Pruning  # noqa: E402
from wanda_pl.commands.prune import prune  # noqa: E402
from wanda_pl.commands.report import versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def trainer(callbacks) -> L.Trainer:
    return L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     use_distributed_sampler=False, enable_model_summary=False, enable_progress_bar=False,
                     num_sanity_val_steps=0, callbacks=callbacks)


class Runner:
    """Prunes one module again and again, restoring the dense weights before each run."""

    def __init__(self, module, datamodule):
        self.module, self.dm = module, datamodule
        self.dense_state = copy.deepcopy(module.model.state_dict())
        self.dense = None

    def dense_metrics(self):
        if self.dense is None:
            self.module.model.load_state_dict(self.dense_state)
            t = trainer([])
            t.validate(self.module, datamodule=self.dm, verbose=False)
            self.dense = self.module.validation_metrics()
        return self.dense

    def run(self, **pruning_kwargs) -> dict:
        self.module.model.load_state_dict(self.dense_state)
        t = trainer([Calibration(), Pruning(**pruning_kwargs)])
        with tempfile.TemporaryDirectory() as out:
            report = prune(t, self.module, self.dm, str(Path(out) / "run"), validate_dense=False, checkpoints=False)
        return report


def run_sweep(module, datamodule, grids, out=None, **pruning):
    """The ``sweep`` command on a loaded module, one grid after another into one folder: returns
    (dense metrics, dense seconds, rows). ``out``: keep the folder (its sweep.csv, plots, reports);
    ``pruning``: options of every point's Pruning callback (``ria_permute=True``)."""
    from wanda_pl.commands.sweep import sweep

    rows, dense = [], None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or Path(tmp) / "sweep")
        for grid in grids:
            summary = sweep(trainer([Calibration(), Pruning(**pruning)]), module, datamodule, grid, str(folder))
            rows += [r for r in summary["rows"] if r["point"] not in {x["point"] for x in rows}]
            dense = json.loads((folder / "dense.json").read_text())
    return dense["metrics"], dense["seconds"], rows


def perplexity_on(module, source: str, seqlen: int, windows: int, batch_size: int = 1) -> float:
    """The module's perplexity, as it is now, on another held-out text (``news``): the same
    validation loop as the run's own, on ``source``'s evaluation split."""
    from wanda_pl.data.text_module import TextDataModule

    dm = TextDataModule(source, source, 1, seqlen, 0, windows, batch_size)
    trainer([]).validate(module, datamodule=dm, verbose=False)
    return module.validation_metrics()["ppl"]


def in_child(fn, *args):
    """``fn(*args)`` in a fresh spawned process: its report's peak memory is that one run's alone
    (a process's peak resident memory only ever grows)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def write_table(name: str, header: str, rows: list, settings: dict) -> str:
    """A markdown table plus the settings that decide its numbers, printed and saved to results/."""
    lines = [header, "|" + "|".join("---" for _ in header.strip("|").split("|")) + "|"]
    lines += rows
    text = "\n".join(lines) + "\n\nSettings: `" + json.dumps(settings, default=str) + "`\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
    return text


def settings_of(report: dict, **extra) -> dict:
    keys = ("model", "dtype", "calibration", "evaluation", "nsamples", "seqlen", "seed", "max_eval_windows", "eval_windows")
    return {**{k: report.get(k) for k in keys}, **extra, "versions": versions()}


def point_key(row) -> tuple:
    """Where a sweep row sits: its sparsity type, ratio and allocation (to pair it with a reference's)."""
    return row["sparsity_type"], row["sparsity_ratio"], row.get("allocation")


def pruning_wall(row) -> float:
    """A sweep row's pruning wall time: calibration forwards plus masks and updates (evaluation left out)."""
    return row["time_calibration_s"] + row["time_prune_s"]
