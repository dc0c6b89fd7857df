"""Figures of where training changed the model and what it gained or lost.

Every function builds a `matplotlib.figure.Figure` on the Agg canvas, so no
pyplot state is touched and no display is needed; `save_figure` writes a PNG
atomically. Layers are 0-based, partition boundaries are drawn where a
partition is known, and cells or layers without an adapter are grey ("not
adapted"), never coloured as a zero update.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from analysis.lora_norms import LayerTable
from probe.io import atomic_path
from probe.partition import Partition

logger = logging.getLogger(__name__)

NOT_ADAPTED_COLOR = "#c8c8c8"
BOUNDARY_COLOR = "#d62728"
LAYER_LABEL = "decoder layer (0-based)"
METRIC_LABELS = {
    "frobenius": "update norm ‖ΔW‖_F (weight units)",
    "relative": "relative update ‖ΔW‖_F / ‖W‖_F (ratio)",
    "stable_rank": "stable rank of ΔW (‖ΔW‖_F² / ‖ΔW‖_2², dimensionless)",
}
COLORBAR_LABELS = {
    "frobenius": "‖ΔW‖_F (weight units)",
    "relative": "‖ΔW‖_F / ‖W‖_F (ratio)",
    "stable_rank": "stable rank (dimensionless)",
}


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Write `figure` as PNG to `path` through a temporary file, so a killed process leaves no partial image."""
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=dpi)
    logger.info("wrote %s", path)
    return path


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """Render `figure` as PNG bytes, e.g. for `IPython.display.Image` in a notebook."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def shared_range(tables: list[LayerTable], metric: str) -> tuple[float, float]:
    """Return (0, max) of `metric` over all adapted cells of all tables, for one colour scale."""
    maxima = [np.nanmax(table.values[metric]) for table in tables if table.adapted.any()]
    finite = [value for value in maxima if np.isfinite(value)]
    high = max(finite) if finite else 1.0
    return 0.0, high if high > 0 else 1.0


def draw_partition_rows(axes, partition: Partition | None, *, label: bool) -> None:
    """Draw horizontal lines between blocks of a heatmap whose rows are layers, and name the blocks on the right."""
    if partition is None:
        return
    for block in partition.blocks[1:]:
        axes.axhline(block.start - 0.5, color=BOUNDARY_COLOR, linewidth=1.5)
    if label:
        for block in partition.blocks:
            axes.annotate(
                block.name, xy=(1, (block.start + block.end - 1) / 2), xycoords=("axes fraction", "data"),
                xytext=(4, 0), textcoords="offset points", rotation=90, va="center", ha="left",
                fontsize=8, color=BOUNDARY_COLOR,
            )


def draw_partition_columns(axes, partition: Partition | None) -> None:
    """Draw dashed vertical lines between blocks of a plot whose x axis is layers, and name the blocks on top."""
    if partition is None:
        return
    for block in partition.blocks[1:]:
        axes.axvline(block.start - 0.5, color=BOUNDARY_COLOR, linewidth=1.2, linestyle="--")
    for block in partition.blocks:
        axes.annotate(
            block.name, xy=((block.start + block.end - 1) / 2, 1), xycoords=("data", "axes fraction"),
            xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8, color=BOUNDARY_COLOR,
        )


def norm_heatmap(tables: list[LayerTable], metric: str = "relative", *, title: str | None = None) -> Figure:
    """Draw layer x module-type heatmaps of one norm metric, one panel per run on a shared colour scale.

    Args:
        tables: Layer tables with the same `num_layers` and `module_types`
            (build them with `shared_module_types`).
        metric: "frobenius", "relative" or "stable_rank".
        title: Figure title; a default names the metric.

    Raises:
        ValueError: If `tables` is empty, the metric is unknown, or the tables do not line up.
    """
    check_tables(tables, metric)
    low, high = shared_range(tables, metric)
    colormap = colormaps["viridis"].with_extremes(bad=NOT_ADAPTED_COLOR)
    norm = Normalize(low, high)

    num_layers = tables[0].num_layers
    columns = tables[0].module_types
    width = 1.2 + len(tables) * max(2.2, 0.45 * len(columns) + 1.0)
    figure = new_figure(width, max(3.0, 0.2 * num_layers + 1.8))
    panels = figure.subplots(1, len(tables), sharey=True, squeeze=False)[0]

    for index, (axes, table) in enumerate(zip(panels, tables)):
        image = axes.imshow(np.ma.masked_invalid(table.values[metric]), cmap=colormap, norm=norm,
                            aspect="auto", interpolation="nearest")
        axes.set_xticks(range(len(columns)), [column.rsplit(".", 1)[-1] for column in columns], rotation=60, fontsize=8)
        axes.set_xlabel("module type")
        axes.set_title(table.name or f"run {index}", fontsize=10)
        draw_partition_rows(axes, table.partition, label=index == len(tables) - 1)
        if index == 0:
            axes.set_ylabel(LAYER_LABEL)

    colorbar = figure.colorbar(image, ax=list(panels), shrink=0.9, pad=0.04)
    colorbar.set_label(COLORBAR_LABELS[metric])
    figure.legend(handles=[Patch(color=NOT_ADAPTED_COLOR, label="not adapted")], loc="outside lower right",
                  fontsize=8, frameon=False)
    figure.suptitle(title or f"LoRA update per layer and module: {METRIC_LABELS[metric].split(' (')[0]}")
    return figure


def check_tables(tables: list[LayerTable], metric: str) -> None:
    if not tables:
        raise ValueError("at least one layer table is needed to draw a figure")
    if metric not in METRIC_LABELS:
        raise ValueError(f"`metric` must be one of {', '.join(METRIC_LABELS)}, got {metric!r}")
    first = tables[0]
    for table in tables[1:]:
        if table.num_layers != first.num_layers or table.module_types != first.module_types:
            raise ValueError(
                f"tables {first.name!r} and {table.name!r} do not line up (layers {first.num_layers} vs "
                f"{table.num_layers}, module types {first.module_types} vs {table.module_types}); "
                "build them with `module_types=shared_module_types(...)`"
            )


def layer_norm_bars(tables: list[LayerTable], metric: str = "relative", *, title: str | None = None) -> Figure:
    """Draw one bar per layer and run: the norm of the whole layer's update.

    Args:
        tables: Layer tables with the same `num_layers`.
        metric: "frobenius" (sqrt of summed squared module norms) or
            "relative" (that over the frozen norm of the same modules).
        title: Figure title; a default names the metric.
    """
    if metric not in ("frobenius", "relative"):
        raise ValueError(f"`metric` must be frobenius or relative for layer bars, got {metric!r}")
    check_tables(tables, metric)
    num_layers = tables[0].num_layers
    figure = new_figure(max(6.0, 0.28 * num_layers * max(1, len(tables)) ** 0.5 + 2.0), 3.8)
    axes = figure.subplots()

    width = 0.8 / len(tables)
    layers = np.arange(num_layers)
    for index, table in enumerate(tables):
        values = table.layer_frobenius if metric == "frobenius" else table.layer_relative
        offsets = layers - 0.4 + width * (index + 0.5)
        axes.bar(offsets, np.nan_to_num(values, nan=0.0), width=width, label=table.name or f"run {index}")
        missing = np.isnan(values)
        axes.plot(offsets[missing], np.zeros(missing.sum()), linestyle="none", marker="s", markersize=3,
                  color=NOT_ADAPTED_COLOR)

    partition = next((table.partition for table in tables if table.partition is not None), None)
    draw_partition_columns(axes, partition)
    axes.plot([], [], linestyle="none", marker="s", color=NOT_ADAPTED_COLOR, label="not adapted")
    axes.set_xlabel(LAYER_LABEL)
    axes.set_ylabel(METRIC_LABELS[metric])
    axes.set_xlim(-0.6, num_layers - 0.4)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=8, ncols=min(4, len(tables) + 1))
    axes.set_title(
        title or f"LoRA update per layer ({'relative to frozen weights' if metric == 'relative' else 'Frobenius norm'})",
        pad=16 if partition is not None else 6,
    )
    return figure


def accuracy_figure(evaluation: dict[str, Any], metric: str = "accuracy") -> Figure:
    """Draw held-out preference accuracy per capability for the base model and every group, with intervals."""
    capabilities = list(evaluation["base"]["capabilities"])
    series = [("base", evaluation["base"]["capabilities"])]
    series += [(name, group["capabilities"]) for name, group in evaluation["groups"].items()]

    figure = new_figure(max(6.0, 1.2 * len(capabilities) * math.sqrt(len(series)) + 2.0), 3.8)
    axes = figure.subplots()
    width = 0.8 / len(series)
    for index, (name, entries) in enumerate(series):
        estimates = np.array([entries[c][metric]["estimate"] for c in capabilities])
        lows = np.array([entries[c][metric]["low"] for c in capabilities])
        highs = np.array([entries[c][metric]["high"] for c in capabilities])
        positions = np.arange(len(capabilities)) - 0.4 + width * (index + 0.5)
        axes.bar(positions, estimates, width=width, label=name,
                 yerr=np.vstack([estimates - lows, highs - estimates]), capsize=2)
    axes.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    axes.set_xticks(range(len(capabilities)), capabilities)
    axes.set_xlabel("capability (held-out pairs)")
    axes.set_ylabel(f"{'length-normalised ' if metric.endswith('normalized') else ''}preference accuracy (share)")
    axes.set_ylim(0.0, 1.05)
    axes.legend(fontsize=8, ncols=min(5, len(series)))
    axes.set_title(f"Held-out preference accuracy with {int(evaluation['settings']['level'] * 100)}% bootstrap intervals")
    return figure


def tax_figure(evaluation: dict[str, Any]) -> Figure:
    """Draw the change in accuracy against the base model per group and capability; target capabilities are filled."""
    rows = [row for row in evaluation["tax"] if row["metric"] != "perplexity"]
    groups = list(dict.fromkeys(row["group"] for row in rows))
    capabilities = list(dict.fromkeys(row["measure"] for row in rows))
    figure = new_figure(max(6.0, 1.5 * len(groups) + 2.0), 3.8)
    axes = figure.subplots()

    markers = "osD^v<>"
    spread = 0.6 / max(1, len(capabilities))
    for index, capability in enumerate(capabilities):
        for position, group in enumerate(groups):
            row = next(r for r in rows if r["group"] == group and r["measure"] == capability)
            change = row["change"]
            x = position - 0.3 + spread * (index + 0.5)
            axes.errorbar(x, change["estimate"], yerr=[[change["estimate"] - change["low"]], [change["high"] - change["estimate"]]],
                          fmt=markers[index % len(markers)], color=f"C{index}", capsize=2,
                          markerfacecolor=f"C{index}" if row["target"] else "white",
                          label=capability if position == 0 else None)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_xlabel("run (pooled over seeds)")
    axes.set_ylabel(f"change in {rows[0]['metric'] if rows else 'accuracy'} vs base (share)")
    axes.legend(fontsize=8, title="capability (filled = target)", title_fontsize=8)
    axes.set_title("Alignment tax: held-out accuracy change vs base model")
    return figure
