"""Pictures of results: a metric against sparsity (sweeps) and sparsity per block and layer type.

Sizes are fixed by the data's shape, not by the text in them (no tight bounding box), so a
figure of the same grid is always the same number of pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence

from .report import atomic_write, block_grid, column_names

DPI = 100
METRIC_SIZE = (8.0, 5.0)  # inches: 800 x 500 pixels


def layers_size(blocks: int, types: int) -> tuple:
    """Inches of ``layers.png`` for a grid of ``blocks`` rows and ``types`` columns (two panels)."""
    return (2.5 + 2 * (1.0 + 0.35 * types), 2.0 + 0.22 * blocks)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure atomically (a reader never sees half a PNG) and free it."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=DPI, format="png"), "wb")
    finally:
        _pyplot().close(fig)


def layers_png(path, actual: Mapping[str, float], planned: Optional[Mapping[str, float]] = None,
               title: str = "") -> Path:
    """Sparsity per block (rows) and layer type (columns), planned beside actual, on one colour scale."""
    plt = _pyplot()
    panels = [("planned", planned or {}), ("actual", actual)]
    blocks, types, _ = block_grid(actual)
    values = [v for _, layers in panels for v in layers.values()]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-6:  # uniform: centre the one value on the scale rather than hide it at an end
        lo, hi = lo - 0.05, hi + 0.05
    fig, axes = plt.subplots(1, 2, figsize=layers_size(len(blocks), len(types)), squeeze=False, layout="constrained")
    image = None
    for ax, (label, layers) in zip(axes[0], panels):
        _, _, grid = block_grid(layers)
        cells = [[grid.get(b, {}).get(t, float("nan")) for t in types] for b in blocks]
        image = ax.imshow(cells, cmap="viridis", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        ax.set_title(label if layers else f"{label}: not recorded", fontsize=9)
        ax.set_xticks(range(len(types)), column_names(types), rotation=60, fontsize=7, ha="right")
        ax.set_yticks(range(len(blocks)), [b.split(".")[-1] for b in blocks], fontsize=6)
        ax.set_ylabel("block", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), label="sparsity", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, Path(path))
    return Path(path)


def metric_png(path, rows: Sequence[Mapping], metric: str, label: str, dense: Optional[float] = None,
               log: bool = False, title: str = "") -> Path:
    """``metric`` against actual sparsity, one line per method (and allocation) over the unstructured
    points; N:M points marked apart and labelled with their pattern; the dense value as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=METRIC_SIZE, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, series in enumerate(_series(rows)):
        colour = colours[i % len(colours)]
        line = [r for r in rows if _key(r) == series and r.get(metric) is not None]
        shaped = sorted((r for r in line if r.get("structure")), key=lambda r: r["parameters_removed"])
        line = [r for r in line if not r.get("structure")]
        flat = sorted((r for r in line if ":" not in str(r["sparsity_type"])), key=lambda r: r["actual_sparsity"])
        nm = [r for r in line if ":" in str(r["sparsity_type"])]
        if shaped:  # a smaller model: placed by the share of its parameters removed
            ax.plot([100 * r["parameters_removed"] for r in shaped], [r[metric] for r in shaped], "s-",
                    color=colour, label=series)
        if flat:
            ax.plot([100 * r["actual_sparsity"] for r in flat], [r[metric] for r in flat], "o-", color=colour,
                    label=series)
        for r in nm:
            ax.plot(100 * r["actual_sparsity"], r[metric], marker="*", markersize=13, linestyle="none", color=colour,
                    label=None if flat else series)
            ax.annotate(str(r["sparsity_type"]), (100 * r["actual_sparsity"], r[metric]), fontsize=8,
                        textcoords="offset points", xytext=(6, 4), color=colour)
    if dense is not None:
        ax.axhline(dense, color="0.4", linestyle="--", linewidth=1, label=f"dense ({dense:.4g})")
    if log:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:.4g}")  # 42.1, not 4.21 x 10^1
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())
    ax.set_xlabel("actual sparsity (%) — stars: N:M" +
                  ("; squares: parameters removed (width, depth)" if any(r.get("structure") for r in rows) else ""))
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    _save(fig, Path(path))
    return Path(path)


def _key(row: Mapping) -> str:
    if row.get("structure"):
        return f"{row['method']} ({row['structure']})"
    alloc = row.get("allocation", "uniform")
    return row["method"] if alloc in (None, "uniform") else f"{row['method']} ({alloc})"


def _series(rows: Iterable[Mapping]) -> List[str]:
    return list(dict.fromkeys(_key(r) for r in rows))
