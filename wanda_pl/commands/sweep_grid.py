"""A sweep's grid: its points (weight sparsity: methods x types x ratios x allocations; structures:
width scores x ratios, depth block counts) and each point's pruning settings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from ..core.sparsity import SparsitySpec
from ..core.structure import MODES, SCORES
from ..methods import STEP_KINDS, step_names
from ..methods.settings import PruningSettings


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
        structures: ``none`` (the weight-sparsity points above), ``width`` and/or ``depth`` (unset:
            ``--pruning.structure``). Width points: every method of ``methods`` that scores channels
            (magnitude, wanda, flap) x every ratio, the ratio being the share removed of what
            ``--pruning.width_mlp`` / ``width_heads`` leave unset. Depth points: one per ``blocks``.
            Each structured point starts from a fresh copy of the dense model.
        blocks: blocks removed by the depth points (unset: ``--pruning.blocks_removed``).
    """

    methods: Optional[List[str]] = None
    ratios: Optional[List[float]] = None
    # int: YAML 1.1 reads an unquoted 2:4 as the base-60 number 124 (2 * 60 + 4); see _sparsity_type.
    types: Optional[List[Union[str, int]]] = None
    allocations: Optional[List[str]] = None
    structures: Optional[List[str]] = None
    blocks: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.types is not None:  # as the user meant them, in the points and in sweep.json's grid
            self.types = [_sparsity_type(t) for t in self.types]


@dataclass(frozen=True)
class Point:
    method: str
    sparsity_type: str
    sparsity_ratio: Optional[float]  # None: N/M
    allocation: str = "uniform"
    structure: str = "none"
    widths: Optional[Tuple[float, float]] = None  # width: the MLP and head shares removed
    blocks: int = 0  # depth: blocks removed

    @property
    def name(self) -> str:
        """The point's subfolder: ``wanda-unstructured-0.5``, ``wanda-owl-unstructured-0.7``, ``sparsegpt-2of4``,
        ``wanda-width-0.2`` (``wanda-width-mlp0.2-heads0`` when they differ), ``depth-3``."""
        if self.structure == "depth":
            return f"depth-{self.blocks}"
        if self.structure == "width":
            mlp, heads = self.widths
            return f"{self.method}-width-" + (f"{mlp:g}" if mlp == heads else f"mlp{mlp:g}-heads{heads:g}")
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


# What a weight-sparsity point resets when the base settings are structured, and the reverse.
_NO_STRUCTURE = dict(structure="none", width_mlp=None, width_heads=None, blocks_removed=0, compensate="none",
                     width_multiple=1)
_NO_WEIGHT_STEPS = dict(refine="none", update="none", allocation="uniform", sparsity_type="unstructured")


def points(grid: Grid, base: PruningSettings) -> List[Tuple[Point, PruningSettings]]:
    """Every point of ``grid`` with its settings (``base`` otherwise); a grid that is empty or a
    point the settings refuse fails here, naming the point, before any work."""
    args = base.args
    methods = grid.methods if grid.methods is not None else [args["method"]]
    ratios = grid.ratios if grid.ratios is not None else [base.spec.ratio]
    types = grid.types if grid.types is not None else [base.spec.type]
    allocations = grid.allocations if grid.allocations is not None else [args["allocation"]]
    structures = grid.structures if grid.structures is not None else [args["structure"]]
    for key, values in (("methods", methods), ("types", types), ("allocations", allocations),
                        ("structures", structures)):
        if not values:
            raise ValueError(f"sweep.{key} is empty: the sweep has no points; give at least one")
    unknown = [s for s in structures if s not in MODES]
    if unknown:
        raise ValueError(f"sweep.structures: {unknown[0]!r} is none of {', '.join(MODES)}")
    grid_points: List[Tuple[Point, Dict[str, Any]]] = []
    for structure in dict.fromkeys(structures):
        grid_points += _SHAPES[structure](grid, args, methods, ratios, types, allocations)
    out = []
    for point, changes in grid_points:
        try:
            out.append((point, base.replace(**changes)))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"sweep point {point.name}: {err}") from None
    return out


def _weight_points(grid, args, methods, ratios, types, allocations) -> List[Tuple[Point, Dict[str, Any]]]:
    if not ratios and "unstructured" in types:
        raise ValueError("sweep.ratios is empty but sweep.types has unstructured: give at least one ratio")
    out = []
    for stype in dict.fromkeys(types):
        spec = SparsitySpec.parse(stype, None) if stype != "unstructured" else None
        for ratio in ([None] if spec is not None and spec.structured else dict.fromkeys(ratios)):
            for alloc in (["uniform"] if ratio is None else dict.fromkeys(allocations)):
                for m in dict.fromkeys(methods):
                    point = Point(m, stype, None if ratio is None else float(ratio), alloc)
                    out.append((point, {**_NO_STRUCTURE, **_method_steps(point),
                                        "sparsity_type": stype, "sparsity_ratio": point.sparsity_ratio,
                                        "allocation": alloc}))
    return out


def _width_points(grid, args, methods, ratios, types, allocations) -> List[Tuple[Point, Dict[str, Any]]]:
    scores = [m for m in dict.fromkeys(methods) if m in SCORES]
    if not scores:
        raise ValueError(f"sweep.structures has width, and none of the methods {list(methods)} scores channels: "
                         f"add one of {', '.join(SCORES)}")
    if not ratios:
        raise ValueError("sweep.ratios is empty but sweep.structures has width: give at least one ratio")
    if args["width_mlp"] is not None and args["width_heads"] is not None and len(set(ratios)) > 1:
        raise ValueError("sweep.ratios sets the width points' shares, and pruning.width_mlp and width_heads are "
                         "both set, which leaves the ratios nothing: unset one of them")
    out = []
    for ratio in dict.fromkeys(ratios):
        widths = tuple(float(ratio) if args[k] is None else float(args[k]) for k in ("width_mlp", "width_heads"))
        for score in scores:
            point = Point(score, "unstructured", float(ratio), structure="width", widths=widths)
            out.append((point, {**_NO_WEIGHT_STEPS, "method": score, "structure": "width",
                                "sparsity_ratio": float(ratio), "blocks_removed": 0}))
    return out


def _depth_points(grid, args, methods, ratios, types, allocations) -> List[Tuple[Point, Dict[str, Any]]]:
    blocks = grid.blocks if grid.blocks is not None else ([args["blocks_removed"]] if args["blocks_removed"] else [])
    if not blocks:
        raise ValueError("sweep.structures has depth: give sweep.blocks (or pruning.blocks_removed), the blocks "
                         "removed at each depth point")
    out = []
    for count in dict.fromkeys(blocks):
        point = Point("influence", "unstructured", None, structure="depth", blocks=count)
        out.append((point, {**_NO_WEIGHT_STEPS, "structure": "depth", "blocks_removed": count,
                            "width_mlp": None, "width_heads": None, "compensate": "none", "width_multiple": 1}))
    return out


_SHAPES = {"none": _weight_points, "width": _width_points, "depth": _depth_points}


def _method_steps(point: Point) -> Dict[str, str]:
    try:
        return _steps(point.method)
    except ValueError as err:
        raise ValueError(f"sweep point {point.name}: {err}") from None
