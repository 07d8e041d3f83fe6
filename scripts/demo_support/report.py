"""Summary tables, ``summary.json`` and plots of the CPU demo (``scripts/demo.py``).

Everything here reads what ``run.py`` wrote -- one results CSV per method (the reference's format,
``utils/results.py``) -- and summarises it with :func:`average_csv.summarize`, so the demo reports exactly
the numbers ``python average_csv.py`` prints. The functions are tested on hand-written CSV files. The
figures are drawn on bare :class:`matplotlib.figure.Figure` objects with the Agg canvas (no pyplot state,
no display needed); every file is written atomically (:mod:`utils.files`).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from average_csv import read_rows, summarize
from dataset.voc import VOC_CLASSES
from utils.files import write_atomically, write_text_atomically
from utils.results import ABSENT, NOT_LEARNED

SUMMARY_KEYS = ("bg", "old", "new", "all")

# One colour per method, stable across figures (tab10 entries), so the plots can be read side by side.
METHOD_COLOURS: dict[str, str] = {
    "FT": "#7f7f7f",
    "MiB": "#1f77b4",
    "PLOP": "#2ca02c",
    "LGKD": "#d62728",
    "LWF": "#9467bd",
    "LWF-MC": "#8c564b",
    "ILT": "#e377c2",
    "EWC": "#bcbd22",
    "RW": "#17becf",
    "PI": "#ff7f0e",
}
FALLBACK_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


@dataclass
class MethodResult:
    """One method's continual run as read back from its results CSV.

    Attributes:
        name: method name (FT, MiB, ...).
        rows: CSV rows, row ``i`` = step ``i`` (``step,IoU_0,...,IoU_{K-1},MeanIoU``).
        summary: :func:`average_csv.summarize` of the rows (fractions, not percentages).
        csv_path: the file the rows came from.
    """

    name: str
    rows: list[list[str]]
    summary: dict[str, float | int]
    csv_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def per_step_all(self) -> list[float]:
        """mIoU over all seen classes after each step, in percent."""
        return [100.0 * float(row[-1]) for row in self.rows]

    @property
    def final(self) -> dict[str, float]:
        """Final-step background / old / new / all mIoU, in percent (as ``average_csv.py`` prints them)."""
        return {key: 100.0 * float(self.summary[key]) for key in SUMMARY_KEYS}

    @property
    def average(self) -> float:
        """mIoU averaged over the steps, in percent."""
        return 100.0 * float(self.summary["avg"])

    def final_class_iou(self) -> list[float | None]:
        """Per-class IoU (percent) of the last step; None where the CSV says ``X`` or ``x``."""
        return [None if v in (ABSENT, NOT_LEARNED) else 100.0 * float(v) for v in self.rows[-1][1:-1]]


def load_method_result(csv_path: str | os.PathLike, name: str) -> MethodResult:
    """Read a method's results CSV and summarise it with ``average_csv.summarize``.

    Raises:
        average_csv.CsvFormatError: the file is empty, has missing or repeated steps, ragged rows, ...
        OSError: the file cannot be read.
    """
    rows = read_rows(csv_path)
    notes: list[str] = []
    summary = summarize(rows, notes)
    return MethodResult(name=name, rows=rows, summary=summary, csv_path=Path(csv_path), notes=notes)


# ---------------------------------------------------------------------------------------------- text
def _fmt(value: float | None, width: int = 6) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    return f"{value:{width}.2f}"


def old_new_labels(n_step0_classes: int, n_classes: int) -> tuple[str, str]:
    """Column labels naming the class ranges, e.g. ``old (1-15)`` and ``new (16-20)`` for VOC 15-1."""
    return f"old (1-{n_step0_classes - 1})", f"new ({n_step0_classes}-{n_classes - 1})"


def format_final_table(
    results: Sequence[MethodResult], n_step0_classes: int = 16, n_classes: int = 21
) -> str:
    """The final-step table: background, old, new and all-class mIoU per method (percent)."""
    old_label, new_label = old_new_labels(n_step0_classes, n_classes)
    header = (
        f"{'method':<8} {'background':>10} {old_label:>11} {new_label:>12} {'all':>7} {'avg over steps':>15}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        final = result.final
        lines.append(
            f"{result.name:<8} {_fmt(final['bg'], 10)} {_fmt(final['old'], 11)} {_fmt(final['new'], 12)} "
            f"{_fmt(final['all'], 7)} {_fmt(result.average, 15)}"
        )
    return "\n".join(lines)


def format_per_step_table(results: Sequence[MethodResult]) -> str:
    """All-class mIoU (percent) after each step, one row per method."""
    n_steps = max((len(r.rows) for r in results), default=0)
    header = f"{'method':<8} " + " ".join(f"{'step ' + str(s):>7}" for s in range(n_steps))
    lines = [header, "-" * len(header)]
    for result in results:
        values = result.per_step_all + [None] * (n_steps - len(result.rows))
        lines.append(f"{result.name:<8} " + " ".join(_fmt(v, 7) for v in values))
    return "\n".join(lines)


def format_markdown_table(
    results: Sequence[MethodResult], n_step0_classes: int = 16, n_classes: int = 21
) -> str:
    """The final table as GitHub markdown (pasted into the README), with the per-step mIoU."""
    old_label, new_label = old_new_labels(n_step0_classes, n_classes)
    n_steps = max((len(r.rows) for r in results), default=0)
    steps = " / ".join(str(s) for s in range(n_steps))
    lines = [
        f"| method | background | {old_label} | {new_label} | all | all after steps {steps} |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for result in results:
        final = result.final
        per_step = " / ".join(f"{v:.1f}" for v in result.per_step_all)
        lines.append(
            f"| {result.name} | {final['bg']:.2f} | {final['old']:.2f} | {final['new']:.2f} | "
            f"{final['all']:.2f} | {per_step} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- json
def _finite(value: float) -> float | None:
    """JSON has no NaN: a mean over no class (``average_csv`` returns nan) becomes null."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else round(value, 4)


def build_summary(
    results: Sequence[MethodResult],
    commands: Mapping[str, Sequence[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``summary.json`` (mIoU in percent).

    Args:
        results: one entry per method, in display order.
        commands: method name -> the command lines (strings) of its chain, in the order they ran
            (the shared step-0 training included).
        extra: other top-level entries (settings, wall time, ...), written as given.

    Returns:
        ``{"methods": {name: {"final": {bg, old, new, all}, "per_step_all": [...], "avg": ...,
        "final_class_iou": [...], "csv": ..., "commands": [...]}}, **extra}``.
    """
    commands = commands or {}
    methods: dict[str, Any] = {}
    for result in results:
        methods[result.name] = {
            "final": {key: _finite(value) for key, value in result.final.items()},
            "per_step_all": [_finite(v) for v in result.per_step_all],
            "avg": _finite(result.average),
            "final_class_iou": [None if v is None else _finite(v) for v in result.final_class_iou()],
            "csv": str(result.csv_path) if result.csv_path is not None else None,
            "commands": list(commands.get(result.name, [])),
        }
    return {"methods": methods, **dict(extra or {})}


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    write_text_atomically(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------- plots
def method_colour(name: str, index: int = 0) -> str:
    return METHOD_COLOURS.get(name, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """The figure as a PNG file, written atomically."""
    path = Path(path)
    png = io.BytesIO()  # drawn first, so a failed drawing leaves no file
    fig.savefig(png, format="png", dpi=fig.dpi, bbox_inches="tight")
    write_atomically(path, lambda handle: handle.write(png.getvalue()))
    return path


def plot_miou_per_step(
    results: Sequence[MethodResult],
    path: str | os.PathLike,
    n_step0_classes: int = 16,
    n_classes: int = 21,
    title: str = "VOC 15-1 (15-5s) on synthetic data",
    step_label: str = "step (0 = classes 0-15, then one new class per step)",
) -> Path:
    """Two panels: all-class mIoU after each step per method, and the final bg / old / new / all bars.

    ``title`` names the protocol and ``step_label`` (the x axis of the left panel) what each step adds.
    """
    fig = _new_figure(11.5, 4.2)
    ax_steps, ax_final = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1.0]})
    for i, result in enumerate(results):
        steps = list(range(len(result.rows)))
        ax_steps.plot(
            steps, result.per_step_all, marker="o", label=result.name, color=method_colour(result.name, i)
        )
    n_steps = max((len(r.rows) for r in results), default=1)
    ax_steps.set_xticks(range(n_steps))
    ax_steps.set_xlabel(step_label)
    ax_steps.set_ylabel("mIoU over all seen classes (%)")
    ax_steps.set_title("mIoU after each step")
    ax_steps.set_ylim(bottom=0)
    ax_steps.grid(alpha=0.3)
    ax_steps.legend()

    old_label, new_label = old_new_labels(n_step0_classes, n_classes)
    groups = ["background", old_label, new_label, "all"]
    width = 0.8 / max(len(results), 1)
    x = np.arange(len(groups))
    for i, result in enumerate(results):
        values = [result.final[key] for key in SUMMARY_KEYS]
        values = [0.0 if math.isnan(v) else v for v in values]
        bars = ax_final.bar(
            x + (i - (len(results) - 1) / 2) * width,
            values,
            width,
            label=result.name,
            color=method_colour(result.name, i),
        )
        ax_final.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax_final.set_xticks(x, groups)
    ax_final.set_ylabel("IoU at the final step (%)")
    ax_final.set_title("Final step")
    ax_final.set_ylim(0, 105)
    ax_final.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_final_class_iou(
    results: Sequence[MethodResult],
    path: str | os.PathLike,
    class_names: Sequence[str] = VOC_CLASSES,
    n_step0_classes: int = 16,
) -> Path:
    """Grouped bars: the final step's IoU of every class, per method (``X``/``x`` drawn as missing)."""
    n_classes = max((len(r.rows[-1]) - 2 for r in results), default=len(class_names))
    fig = _new_figure(max(10.0, 0.55 * n_classes + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(len(results), 1)
    x = np.arange(n_classes)
    for i, result in enumerate(results):
        values = result.final_class_iou()
        heights = [0.0 if v is None else v for v in values]
        ax.bar(
            x + (i - (len(results) - 1) / 2) * width,
            heights,
            width,
            label=result.name,
            color=method_colour(result.name, i),
        )
    ax.axvline(n_step0_classes - 0.5, color="black", linestyle="--", linewidth=1)
    ax.text(n_step0_classes - 0.6, 101, "old | new", ha="center", va="bottom", fontsize=8)
    names = [class_names[c] if c < len(class_names) else str(c) for c in range(n_classes)]
    ax.set_xticks(x, [f"{c} {n}" for c, n in enumerate(names)], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("IoU at the final step (%)")
    ax.set_ylim(0, 108)
    ax.set_title("Per-class IoU after the last step")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(results), loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion_matrix(
    matrix: np.ndarray,
    path: str | os.PathLike,
    class_names: Sequence[str] = VOC_CLASSES,
    title: str = "Confusion matrix",
    n_step0_classes: int | None = 16,
) -> Path:
    """Row-normalised confusion matrix (rows = ground truth, columns = prediction) with class names."""
    matrix = np.asarray(matrix, dtype=np.float64)
    n = matrix.shape[0]
    names = [f"{c} {class_names[c]}" if c < len(class_names) else str(c) for c in range(n)]
    fig = _new_figure(8.5, 7.5)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, interpolation="nearest", cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class's pixels")
    for row in range(n):
        for col in range(n):
            value = matrix[row, col]
            if value >= 0.1:
                ax.text(
                    col,
                    row,
                    f"{value:.1f}".lstrip("0"),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value > 0.6 else "black",
                )
    if n_step0_classes is not None and 0 < n_step0_classes < n:
        for pos in (n_step0_classes - 0.5,):
            ax.axhline(pos, color="black", linewidth=0.8, linestyle="--")
            ax.axvline(pos, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_prediction_grid(
    grid: np.ndarray,
    column_titles: Sequence[str],
    tile_size: int,
    path: str | os.PathLike,
    legend: Mapping[int, tuple[str, Sequence[int]]] | None = None,
    gap: int = 2,
    title: str | None = None,
) -> Path:
    """Save a ``utils.visualization.make_prediction_grid`` array with a title above each column.

    Args:
        grid: (H, W, 3) uint8 grid, columns of ``tile_size`` pixels separated by ``gap`` pixels.
        column_titles: one title per column (image, ground truth, then one per method).
        tile_size: width of one tile in pixels.
        path: output PNG.
        legend: class id -> (name, RGB colour) of the classes shown, drawn under the grid.
        gap: pixels between tiles (as passed to ``make_prediction_grid``).
        title: figure title.
    """
    height, width = grid.shape[:2]
    n_cols = len(column_titles)
    # Layout in inches: title, column titles, the grid (tiles of 1.5 in, small crops are enlarged
    # with nearest-neighbour pixels), then the legend rows.
    grid_w = 1.5 * n_cols
    grid_h = grid_w * height / width
    top = 0.3 + (0.3 if title else 0.0)
    legend_cols = 6
    bottom = 0.25 + 0.22 * math.ceil(len(legend) / legend_cols) if legend else 0.1
    fig_h = top + grid_h + bottom
    fig = _new_figure(grid_w, fig_h)
    ax = fig.add_axes((0.0, bottom / fig_h, 1.0, grid_h / fig_h))
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for col, name in enumerate(column_titles):
        centre = (col * (tile_size + gap) + tile_size / 2) / width
        fig.text(centre, (bottom + grid_h + 0.06) / fig_h, name, ha="center", va="bottom", fontsize=9)
    if title:
        fig.text(0.5, (fig_h - 0.08) / fig_h, title, ha="center", va="top", fontsize=10)
    if legend:
        from matplotlib.patches import Patch

        handles = [
            Patch(facecolor=np.asarray(colour) / 255.0, edgecolor="black", linewidth=0.3, label=f"{c} {name}")
            for c, (name, colour) in sorted(legend.items())
        ]
        fig.legend(
            handles=handles,
            loc="lower center",
            ncols=min(legend_cols, len(handles)),
            fontsize=7,
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )
    return _save(fig, path)


def copy_figure(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Copy a PNG (e.g. into docs/images/ for the README), atomically."""
    data = Path(source).read_bytes()
    write_atomically(destination, lambda handle: handle.write(data))
    return Path(destination)
