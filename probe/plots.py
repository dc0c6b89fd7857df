"""Figures of layer-level signals with partition boundaries.

Figures are built as `matplotlib.figure.Figure` objects with the Agg canvas,
so no global pyplot state is touched and no display is needed. Every file
is written to a temporary name in the target folder and renamed, so a killed
process never leaves a half-written image.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

NamedBlock = tuple[str, int, int]
"""A named half-open block (name, start, end) of 0-based layer indices."""

_LAYER_AXIS_LABEL = "layer index (0-based)"


def _check_blocks(blocks: Sequence[NamedBlock], n_layers: int) -> None:
    """Raise a ValueError unless blocks cover [0, n_layers) in order without gaps."""
    expected_start = 0
    for name, start, end in blocks:
        if start != expected_start or end <= start:
            raise ValueError(
                f"block {name!r} must start at layer {expected_start} and end after it, got "
                f"[{start}, {end}); blocks must be contiguous half-open ranges from layer 0."
            )
        expected_start = end
    if blocks and expected_start != n_layers:
        raise ValueError(
            f"blocks must end at the number of layers {n_layers}, got last end {expected_start}."
        )


def _save_atomically(figure: Figure, path: str | os.PathLike) -> Path:
    """Write figure as PNG to a temporary file beside path, then rename it onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            figure.savefig(stream, format="png", dpi=150)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    logger.info("wrote %s", path)
    return path


def _new_figure(width: float, height: float) -> Figure:
    """Create a figure attached to an Agg canvas."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_cka_heatmap(
    cka: np.ndarray,
    blocks: Sequence[NamedBlock],
    path: str | os.PathLike,
    title: str = "Debiased linear CKA between layers",
) -> Path:
    """Draw a layer-by-layer CKA matrix with partition boundaries and save it as PNG.

    Args:
        cka: Similarity matrix of shape (n_layers, n_layers), unitless, from
            `probe.similarity.cka_matrix`.
        blocks: Partition as (name, start, end) half-open blocks covering
            [0, n_layers) in order; an empty sequence draws no boundaries.
        path: Output PNG file. Missing parent folders are created.
        title: Figure title, which should state what was measured and on which model.

    Returns:
        The path written.

    Raises:
        ValueError: If cka is not square or the blocks do not cover its layers.
    """
    cka = np.asarray(cka, dtype=np.float64)
    if cka.ndim != 2 or cka.shape[0] != cka.shape[1]:
        raise ValueError(
            f"`cka` must be a square matrix (n_layers, n_layers), got shape {cka.shape}."
        )
    n_layers = cka.shape[0]
    _check_blocks(blocks, n_layers)

    figure = _new_figure(6.5, 5.5)
    axes = figure.add_subplot()
    image = axes.imshow(
        cka, origin="upper", cmap="viridis", vmin=min(0.0, float(cka.min())), vmax=1.0,
        extent=(-0.5, n_layers - 0.5, n_layers - 0.5, -0.5), interpolation="nearest",
    )
    figure.colorbar(image, ax=axes, label="debiased linear CKA (unitless)")

    for index, (name, start, end) in enumerate(blocks):
        if start > 0:
            axes.axhline(start - 0.5, color="white", linewidth=1.2)
            axes.axvline(start - 0.5, color="white", linewidth=1.2)
        # Every other name sits one text row higher, so names of narrow neighbouring blocks do not overlap.
        axes.annotate(name, ((start + end - 1) / 2, -0.5), xytext=(0, 2 + 10 * (index % 2)),
                      textcoords="offset points", ha="center", va="bottom", fontsize=8)

    axes.set_xlabel(_LAYER_AXIS_LABEL)
    axes.set_ylabel(_LAYER_AXIS_LABEL)
    axes.set_title(title, pad=30 if blocks else 6)
    return _save_atomically(figure, path)


def _curve_positions(curve: np.ndarray, name: str, n_layers: int) -> np.ndarray:
    """Place a curve on the layer axis: per-layer values at l, between-layer values at l + 0.5."""
    if curve.ndim != 1:
        raise ValueError(f"curve {name!r} must be 1-D, got shape {curve.shape}.")
    if curve.shape[0] == n_layers:
        return np.arange(n_layers, dtype=np.float64)
    if curve.shape[0] == n_layers - 1:
        return np.arange(n_layers - 1, dtype=np.float64) + 0.5
    raise ValueError(
        f"curve {name!r} must have n_layers={n_layers} values (one per layer) or "
        f"{n_layers - 1} (one per pair of consecutive layers), got {curve.shape[0]}."
    )


def _shade_blocks(axes, blocks: Sequence[NamedBlock]) -> None:
    """Shade every other block and write each block's name at the top of the axes."""
    for index, (name, start, end) in enumerate(blocks):
        if index % 2 == 0:
            axes.axvspan(start - 0.5, end - 0.5, color="0.9", zorder=0)
        if start > 0:
            axes.axvline(start - 0.5, color="0.5", linestyle="--", linewidth=0.8, zorder=1)
        axes.annotate(
            name, ((start + end - 1) / 2, 1.0), xycoords=axes.get_xaxis_transform(),
            xytext=(0, 2 + 10 * (index % 2)), textcoords="offset points", ha="center", va="bottom", fontsize=8,
        )


def plot_layer_curves(
    curves: Mapping[str, np.ndarray],
    blocks: Sequence[NamedBlock],
    path: str | os.PathLike,
    title: str,
    ylabel: str,
    n_layers: int | None = None,
) -> Path:
    """Plot one or more per-layer curves over shaded, labelled blocks and save as PNG.

    Args:
        curves: Curve name to values. A curve of shape (n_layers,) is drawn at
            layers 0..n_layers-1. A curve of shape (n_layers - 1,) contains values
            between consecutive layers (such as angular distance) and is drawn
            at l + 0.5 for the pair (l, l + 1).
        blocks: Partition as (name, start, end) half-open blocks covering
            [0, n_layers) in order.
        path: Output PNG file. Missing parent folders are created.
        title: Figure title, which should state what was measured.
        ylabel: Label of the value axis, with its unit, for example
            "probe accuracy (fraction correct)".
        n_layers: Number of layers. Defaults to the end of the last block, or
            the longest curve when blocks is empty.

    Returns:
        The path written.

    Raises:
        ValueError: If curves is empty, a curve has an unsuitable length, or
            the blocks do not cover [0, n_layers).
    """
    if not curves:
        raise ValueError("`curves` must contain at least one curve, got none.")
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in curves.items()}
    if n_layers is None:
        n_layers = blocks[-1][2] if blocks else max(len(values) for values in arrays.values())
    _check_blocks(blocks, n_layers)

    figure = _new_figure(7.5, 4.0)
    axes = figure.add_subplot()
    _shade_blocks(axes, blocks)
    for name, values in arrays.items():
        positions = _curve_positions(values, name, n_layers)
        axes.plot(positions, values, marker="o", markersize=3, label=name)

    axes.set_xlim(-0.5, n_layers - 0.5)
    axes.set_xlabel(_LAYER_AXIS_LABEL)
    axes.set_ylabel(ylabel)
    axes.set_title(title, pad=30 if blocks else 6)
    axes.legend(fontsize=8)
    return _save_atomically(figure, path)
