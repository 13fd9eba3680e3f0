"""The ``sweep`` command: one model and one calibration set pruned at every point of a grid of
methods x sparsity ratios x sparsity types (x allocations).

The dense baseline is measured once; each point is a full ``prune`` run into its own subfolder
of ``output_dir`` (its ``report.json``, ``layers.png``, optionally the model). A point whose
folder already holds a finished report with the same settings is not run again, so an
interrupted sweep resumes where it stopped. After every point ``sweep.csv``, ``sweep.json`` and
one ``<metric>_vs_sparsity.png`` per declared metric the points measured (``eval.metrics``: e.g.
``ppl``; ``top1`` and ``agreement`` for classifiers) are rewritten atomically from the points' own
reports. Each point's settings reach the prune command as an argument (``PruningSettings``); the
trainer's callbacks are never swapped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tqdm.auto import tqdm

from ..callbacks import Pruning, ZeroShot
from ..callbacks.lookup import find_callback
from ..modules.protocol import require
from .steps import Evaluation, evaluate, lightning_writes
from ..assets.fingerprint import changed_files, model_files
from .lock import output_lock
from ..errors import UserError
from ..methods.settings import PruningSettings
from .outputs import (MARKER, check_output_dir, claim, foreign_entries, owned_entries, remove_leftovers,
                      run_inputs)
from .prune import prune
from .report import write_json
from .sweep_files import row_of, write_summary
from .sweep_grid import Grid, Point, points  # noqa: F401  (Grid: the CLI's and callers' type)

log = logging.getLogger(__name__)
DENSE = "dense.json"


def _fingerprint(point: Point, settings: PruningSettings, model, datamodule, config: Optional[Dict[str, Any]],
                 files: Dict[str, Any]) -> str:
    """What decides a point's numbers, hashed: its pruning settings, the model (its files' records,
    not only its path), the data and every config value outside the trainer's plumbing and the outputs."""
    decided = {k: v for k, v in (config or {}).items() if k not in ("output_dir", "sweep", "save_model", "trainer",
                                                                    "pruning")}
    decided["precision"] = ((config or {}).get("trainer") or {}).get("precision")
    shape = {"structure": "none", "widths": None, "blocks": 0}  # left out unset: earlier sweeps' points stay theirs
    point_fields = {k: v for k, v in asdict(point).items() if k not in shape or v != shape[k]}
    blob = json.dumps({"point": point_fields, "pruning": settings.describe(), "model": model.describe(),
                       "data": datamodule.describe(), "config": decided, "model_files": files}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _finished(folder: Path, fingerprint: str, files: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], str]:
    """The finished report of an earlier run of this very point (or None), and when there is one of
    another model, which of the model's files changed since it ran."""
    if owned_entries(folder) is None:
        return None, ""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None, ""
    ran = report.get("sweep") or {}
    if ran.get("fingerprint") == fingerprint:
        return report, ""
    return None, ", ".join(changed_files(ran.get("model_files") or {}, files)) if "model_files" in ran else ""


def sweep(trainer, model, datamodule, grid: Optional[Grid] = None, output_dir: str = "outputs/sweep",
          save_model: bool = False, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Prune at every point of ``grid`` (see the module docstring); returns the summary (``sweep.json``)."""
    model = require(model)
    if getattr(model.hparams, "offload", "none") != "none":  # each point starts from the dense weights, kept in memory
        raise UserError("sweep keeps the dense weights in memory to start every point from them, which "
                        "model.offload exists to avoid: run one prune per point with model.offload (and --resume)")
    base = find_callback(trainer, Pruning, needed_for="the sweep command")
    zero_shot = find_callback(trainer, ZeroShot)
    grid = grid or Grid()
    if base.masks_from is not None:
        raise ValueError("pruning.masks_from takes masks instead of computing them: it is for fit/validate, not sweep")
    todo = points(grid, base.settings)
    inputs, writes = run_inputs(config, model=model.path), lightning_writes(trainer)
    out = Path(output_dir).expanduser().absolute()
    if trainer.is_global_zero:
        remove_leftovers(out)  # of points killed outright: they would make the folder look foreign
        adopt_committed(out)
    out = check_output_dir(output_dir, inputs, writes)
    datamodule.prepare_for(model)
    for point, settings in todo:
        try:
            settings.check(model)
        except (ValueError, NotImplementedError) as err:
            raise ValueError(f"sweep point {point.name}: {err}") from None
    files = model_files(model.path)
    prints = {p.name: _fingerprint(p, cb, model, datamodule, config, files) for p, cb in todo}
    done = {}
    for point, _ in todo:
        report, changed = _finished(out / point.name, prints[point.name], files)
        if report is not None:
            done[point.name] = report
        elif changed and trainer.is_global_zero:
            print(f"{point.name}: run again: the model changed since it ran ({changed})", flush=True)
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        claim(out, [], "sweep")
    with ExitStack() as held:
        if trainer.is_global_zero:  # one sweep at a time in a folder
            held.enter_context(output_lock(out, output_dir))
        rows = _points(trainer, model, datamodule, zero_shot, base, grid, todo, (prints, files), done, out, save_model,
                       config)
    if trainer.is_global_zero:
        print(f"sweep: {len(rows)} points ({len(done)} kept from before): {out / 'sweep.csv'}")
    return json.loads((out / "sweep.json").read_text()) if trainer.is_global_zero else {"rows": rows}


def adopt_committed(out: Path) -> None:
    """A point killed after its folder was committed but before the sweep's marker listed it: a
    subfolder whose own marker lists all it holds and whose report names this sweep folder is
    taken back (anything else stays foreign and the folder is refused, as before)."""
    out = Path(out).expanduser().absolute()
    owned = owned_entries(out)
    if owned is None:
        return
    for folder in sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and p.name not in owned):
        listed = owned_entries(folder)
        try:
            ran = json.loads((folder / "report.json").read_text()).get("sweep") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if listed is not None and ran.get("sweep_dir") == str(out) and not foreign_entries(folder):
            claim(out, [folder.name, f"{folder.name}/{MARKER}", *(f"{folder.name}/{e}" for e in listed)], "sweep")


def _points(trainer, model, datamodule, zero_shot, base, grid, todo, identity, done, out, save_model, config):
    """Run (or keep) every point in order, rewriting the sweep's files after each; the rows.
    ``identity``: each point's fingerprint and the model files' records, kept in its report."""
    prints, files = identity
    with base.untouched():
        dense = _dense(trainer, model, datamodule, zero_shot, out, needed=len(done) < len(todo))
    start = _Start(model) if len(done) < len(todo) else None
    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="sweep", unit="point", position=0, disable=not trainer.is_global_zero)
    try:
        for step, (point, settings) in enumerate(todo):
            bar.set_postfix_str(point.name)
            report = done.get(point.name)
            if report is None:
                start.restore(reshaped=settings.structure.enabled or settings.experts_ratio > 0)
                point_config = None if config is None else {
                    **config, "output_dir": str(out / point.name),
                    "pruning": {**base.init_args, **settings.args, "enabled": False}}
                report = prune(trainer, model, datamodule, str(out / point.name), save_model, True, point_config,
                               dense=dense, step=step, checkpoints=False, settings=settings,
                               sections={"sweep": {"sweep": {"point": point.name, "fingerprint": prints[point.name],
                                                             "sweep_dir": str(out), "model_files": files}}})
            else:
                bar.write(f"{point.name}: finished before with the same settings, kept")
            rows.append(row_of(point, report, resumed=point.name in done))
            if trainer.is_global_zero:
                listed = owned_entries(out / point.name) or ()
                claim(out, [point.name, f"{point.name}/{MARKER}", *(f"{point.name}/{e}" for e in listed)], "sweep")
                summary = write_summary(out, grid, rows, dense.metrics if dense is not None else None, report)
                claim(out, summary["files"], "sweep")
            bar.update()
    finally:
        if start is not None:  # the caller's module as it came: a second sweep on it starts dense again
            start.restore()
        bar.close()
    return rows


class _Start:
    """The dense model every point starts from. A weight-sparsity point gets the dense weights back
    in place; after a point that cut the model (a structure, experts removed: other shapes, another
    config) the module gets a fresh copy of the dense network instead."""

    def __init__(self, model) -> None:
        self.model, self.dense, self.cut = model, copy.deepcopy(model.model), False

    def restore(self, reshaped: bool = False) -> None:
        """Put the dense model back; ``reshaped``: the next point will cut it."""
        if self.cut:
            self.model.use_network(copy.deepcopy(self.dense))
        else:
            self.model.model.load_state_dict(self.dense.state_dict())
        self.model.set_masks({})
        self.cut = reshaped


def _dense(trainer, model, datamodule, zero_shot, out: Path, needed: bool) -> Optional[Evaluation]:
    """The dense baseline: measured once when any point runs (a classifier's agreement needs that
    very pass), else the one recorded by the earlier run; kept in ``dense.json``."""
    if not needed:
        try:
            saved = json.loads((out / DENSE).read_text())
            return Evaluation(saved["metrics"], saved.get("zero_shot"), saved.get("seconds", 0.0))
        except (OSError, ValueError, KeyError):
            return None
    dense = evaluate(trainer, model, datamodule, zero_shot)
    if trainer.is_global_zero:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in dense.metrics.items() if isinstance(v, float))
        print(f"dense baseline ({dense.seconds:.0f} s): {shown}", flush=True)
        write_json(out / DENSE, {"metrics": dense.metrics, "zero_shot": dense.zero_shot, "seconds": dense.seconds,
                                 "model": model.describe(), "data": datamodule.describe()})
        claim(out, [DENSE], "sweep")
    return dense
