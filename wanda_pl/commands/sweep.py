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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from tqdm.auto import tqdm

from ..callbacks import Pruning, ZeroShot
from ..callbacks.lookup import find_callback
from ..core.sparsity import SparsitySpec
from ..methods import STEP_KINDS, step_names
from ..methods.settings import PruningSettings
from ..modules.protocol import require
from .steps import Evaluation, evaluate, lightning_writes
from ..assets.fingerprint import changed_files, model_files
from .lock import output_lock
from ..errors import UserError
from .outputs import (MARKER, check_output_dir, claim, foreign_entries, owned_entries, remove_leftovers,
                      run_inputs)
from .prune import prune
from .report import write_json
from .sweep_files import row_of, write_summary

log = logging.getLogger(__name__)
DENSE = "dense.json"


@dataclass
class Grid:
    """The points of a sweep.

    Args:
        methods: pruning methods (unset: ``--pruning.method``); ``METHOD+UPDATE`` adds a weight update
            to a mask-only method (``wanda+admm``), ``+dsnot`` a refinement (``wanda+dsnot+admm``);
            else ``--pruning.refine`` / ``--pruning.update`` apply.
        ratios: sparsity ratios of the unstructured points, each in [0, 1) (unset:
            ``--pruning.sparsity_ratio``). N:M points take N/M.
        types: sparsity types: ``unstructured`` and/or N:M patterns (``2:4``, ``4:8``).
        allocations: allocations of the unstructured points: ``uniform``, ``owl``, ``profile``
            (unset: ``--pruning.allocation``); N:M points are uniform.
    """

    methods: Optional[List[str]] = None
    ratios: Optional[List[float]] = None
    # int: YAML 1.1 reads an unquoted 2:4 as the base-60 number 124 (2 * 60 + 4); see _sparsity_type.
    types: Optional[List[Union[str, int]]] = None
    allocations: Optional[List[str]] = None

    def __post_init__(self) -> None:
        if self.types is not None:  # as the user meant them, in the points and in sweep.json's grid
            self.types = [_sparsity_type(t) for t in self.types]


@dataclass(frozen=True)
class Point:
    method: str
    sparsity_type: str
    sparsity_ratio: Optional[float]  # None: N/M
    allocation: str = "uniform"

    @property
    def name(self) -> str:
        """The point's subfolder: ``wanda-unstructured-0.5``, ``wanda-owl-unstructured-0.7``, ``sparsegpt-2of4``."""
        alloc = "" if self.allocation == "uniform" else f"-{self.allocation}"
        what = self.sparsity_type.replace(":", "of") if self.sparsity_ratio is None else \
            f"{self.sparsity_type}-{self.sparsity_ratio:g}"
        return f"{self.method}{alloc}-{what}"


def _sparsity_type(value: Union[str, int]) -> str:
    if isinstance(value, int) and not isinstance(value, bool):  # base-60 back to N:M (M < 60 is all YAML reads so)
        return f"{value // 60}:{value % 60}"
    return str(value)


def _steps(name: str) -> Dict[str, str]:
    """``wanda+dsnot+admm`` -> method, refine and update (each step named at most once)."""
    method, *steps = name.split("+")
    out = {"method": method}
    for step in steps:
        key = next((kind for kind in STEP_KINDS if step in step_names(kind)[1:]), None)
        if key is None or key in out:
            raise ValueError(f"{name!r}: after '+' come at most one refinement {step_names('refine')[1:]} and one "
                             f"weight update {step_names('update')[1:]}, got {step!r}")
        out[key] = step
    return out


def points(grid: Grid, base: PruningSettings) -> List[Tuple[Point, PruningSettings]]:
    """Every point of ``grid`` with its settings (``base`` otherwise); a grid that is empty or a
    point the settings refuse fails here, naming the point, before any work."""
    args = base.args
    methods = grid.methods if grid.methods is not None else [args["method"]]
    ratios = grid.ratios if grid.ratios is not None else [base.spec.ratio]
    types = grid.types if grid.types is not None else [base.spec.type]
    allocations = grid.allocations if grid.allocations is not None else [args["allocation"]]
    for key, values in (("methods", methods), ("types", types), ("allocations", allocations)):
        if not values:
            raise ValueError(f"sweep.{key} is empty: the sweep has no points; give at least one")
    if not ratios and "unstructured" in types:
        raise ValueError("sweep.ratios is empty but sweep.types has unstructured: give at least one ratio")
    grid_points: List[Point] = []
    for stype in dict.fromkeys(types):
        spec = SparsitySpec.parse(stype, None) if stype != "unstructured" else None
        for ratio in ([None] if spec is not None and spec.structured else dict.fromkeys(ratios)):
            for alloc in (["uniform"] if ratio is None else dict.fromkeys(allocations)):
                grid_points += [Point(m, stype, None if ratio is None else float(ratio), alloc)
                                for m in dict.fromkeys(methods)]
    out = []
    for point in grid_points:
        try:
            out.append((point, base.replace(**_steps(point.method), sparsity_type=point.sparsity_type,
                                            sparsity_ratio=point.sparsity_ratio, allocation=point.allocation)))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"sweep point {point.name}: {err}") from None
    return out


def _fingerprint(point: Point, settings: PruningSettings, model, datamodule, config: Optional[Dict[str, Any]],
                 files: Dict[str, Any]) -> str:
    """What decides a point's numbers, hashed: its pruning settings, the model (its files' records,
    not only its path), the data and every config value outside the trainer's plumbing and the outputs."""
    decided = {k: v for k, v in (config or {}).items() if k not in ("output_dir", "sweep", "save_model", "trainer",
                                                                    "pruning")}
    decided["precision"] = ((config or {}).get("trainer") or {}).get("precision")
    blob = json.dumps({"point": asdict(point), "pruning": settings.describe(), "model": model.describe(),
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
    if base.settings.experts_ratio:  # every point starts from the dense weights, of the dense shapes
        raise UserError("pruning.experts_ratio removes experts, and a sweep restores the dense weights for every "
                        "point: run one prune per point")
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
    dense_state = copy.deepcopy(model.model.state_dict()) if len(done) < len(todo) else None
    rows: List[Dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="sweep", unit="point", position=0, disable=not trainer.is_global_zero)
    try:
        for step, (point, settings) in enumerate(todo):
            bar.set_postfix_str(point.name)
            report = done.get(point.name)
            if report is None:
                model.model.load_state_dict(dense_state)  # each point starts from the dense weights
                model.set_masks({})
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
        if dense_state is not None:  # the caller's module as it came: a second sweep on it starts dense again
            model.model.load_state_dict(dense_state)
            model.set_masks({})
        bar.close()
    return rows


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
