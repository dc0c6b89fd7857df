"""Smoke tests for probe.plots: figures are written as valid, non-empty PNG files."""

import matplotlib
import numpy as np
import pytest

from probe.plots import plot_cka_heatmap, plot_layer_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCKS = [("local", 0, 3), ("intermediate", 3, 7), ("global", 7, 10)]


def read_png(path) -> bytes:
    data = path.read_bytes()
    assert len(data) > 1000, f"{path} is only {len(data)} bytes"
    assert data.startswith(PNG_SIGNATURE)
    return data


def test_cka_heatmap_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    cka = np.clip(np.eye(10) + 0.3 * rng.uniform(size=(10, 10)), -1.0, 1.0)
    path = tmp_path / "figures" / "cka.png"

    written = plot_cka_heatmap(cka, BLOCKS, path, "Debiased linear CKA, toy model")

    assert written == path
    read_png(path)


def test_cka_heatmap_without_blocks(tmp_path):
    path = tmp_path / "cka.png"

    plot_cka_heatmap(np.eye(4), [], path)

    read_png(path)


def test_layer_curves_writes_png(tmp_path):
    rng = np.random.default_rng(1)
    curves = {
        "syntax selectivity": rng.uniform(size=10),
        "angular distance to next layer": rng.uniform(size=9),  # between layers
    }
    path = tmp_path / "curves.png"

    plot_layer_curves(curves, BLOCKS, path, "Probe selectivity per layer", "value (fraction)")

    read_png(path)


def test_plots_leave_no_temporary_files(tmp_path):
    plot_cka_heatmap(np.eye(10), BLOCKS, tmp_path / "cka.png")
    plot_layer_curves({"a": np.zeros(10)}, BLOCKS, tmp_path / "curves.png", "t", "y (unit)")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["cka.png", "curves.png"]


def test_plots_do_not_open_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    figures_before = plt.get_fignums()
    backend_before = matplotlib.get_backend()
    plot_cka_heatmap(np.eye(10), BLOCKS, tmp_path / "cka.png")

    assert plt.get_fignums() == figures_before
    assert matplotlib.get_backend() == backend_before


def test_plots_overwrite_existing_file(tmp_path):
    path = tmp_path / "cka.png"
    path.write_bytes(b"old")

    plot_cka_heatmap(np.eye(10), BLOCKS, path)

    read_png(path)


def test_cka_heatmap_rejects_gapped_blocks(tmp_path):
    blocks = [("local", 0, 3), ("global", 4, 10)]

    with pytest.raises(ValueError, match=r"block 'global' must start at layer 3 and end after it, got \[4, 10\)"):
        plot_cka_heatmap(np.eye(10), blocks, tmp_path / "cka.png")


def test_layer_curves_rejects_wrong_length(tmp_path):
    with pytest.raises(ValueError, match=r"curve 'x' must have n_layers=10 values .* or 9 .*, got 7"):
        plot_layer_curves({"x": np.zeros(7)}, BLOCKS, tmp_path / "c.png", "t", "y (unit)")
