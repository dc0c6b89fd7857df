"""Per-layer signals of `probe-layers`: container, figures, and the on-disk cache for --resume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from probe import __version__
from probe.activations import LayerFeatures
from probe.io import atomic_path, write_json_atomic
from probe.partition import Partition
from probe.plots import plot_cka_heatmap, plot_layer_curves


@dataclass
class LayerSignals:
    """Per-layer measurements that the segmentation and the figures use.

    Attributes:
        probe_accuracy: Capability -> out-of-fold accuracy, shape (n_layers,).
        probe_ci: Capability -> Wilson 95% interval, shape (n_layers, 2).
        probe_selectivity: Capability -> accuracy minus shuffled-label control, shape (n_layers,).
        attribution: Capability -> per-pair relative gradient norms, shape (n_pairs, n_layers).
        cka: Debiased linear CKA, shape (n_layers, n_layers).
        angular: Angular distance between consecutive layers in [0, 1], shape (n_layers - 1,).
    """

    probe_accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    probe_ci: dict[str, np.ndarray] = field(default_factory=dict)
    probe_selectivity: dict[str, np.ndarray] = field(default_factory=dict)
    attribution: dict[str, np.ndarray] = field(default_factory=dict)
    cka: np.ndarray | None = None
    angular: np.ndarray | None = None

    def attribution_profile(self, capability: str) -> np.ndarray:
        """Mean over pairs of the relative gradient norm, shape (n_layers,)."""
        return self.attribution[capability].mean(axis=0)

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-layer summary for the partition file."""
        rounded = lambda values: [round(float(v), 5) for v in np.ravel(values)]  # noqa: E731
        out: dict[str, Any] = {}
        if self.probe_accuracy:
            out["probe_accuracy"] = {c: rounded(v) for c, v in self.probe_accuracy.items()}
            out["probe_selectivity"] = {c: rounded(v) for c, v in self.probe_selectivity.items()}
        if self.attribution:
            out["attribution"] = {c: rounded(self.attribution_profile(c)) for c in self.attribution}
        if self.angular is not None:
            out["angular_distance_next"] = rounded(self.angular)
        if self.cka is not None:
            out["cka_next"] = rounded(np.diag(self.cka, k=1))
        return out


def write_figures(partition: Partition, signals: LayerSignals, work_dir: Path) -> list[Path]:
    named = [(b.name, b.start, b.end) for b in partition.blocks]
    model = partition.model.get("name", "model")
    paths = []
    if signals.cka is not None:
        paths.append(plot_cka_heatmap(signals.cka, named, work_dir / "cka.png",
                                      f"Debiased linear CKA between layers ({model})"))
    if signals.probe_selectivity:
        paths.append(plot_layer_curves(signals.probe_selectivity, named, work_dir / "probe_selectivity.png",
                                       f"Linear probe selectivity per layer ({model})",
                                       "selectivity (accuracy - control accuracy)"))
    if signals.attribution:
        profiles = {c: signals.attribution_profile(c) for c in signals.attribution}
        paths.append(plot_layer_curves(profiles, named, work_dir / "attribution.png",
                                       f"DPO loss gradient norm per layer at step 0 ({model})",
                                       "||grad|| / ||params|| (mean over pairs)"))
    return paths


MEASUREMENT_FIELDS = ("model", "seed", "n_train", "attribution_pairs", "cka_examples", "n_splits", "pooling",
                      "batch_size", "max_length", "beta", "dtype", "layers_path", "signals")


def measurement_key(config: Any, data_hash: str) -> dict[str, Any]:
    """Settings that determine the measured signals; segmentation settings are not part of it."""
    return {**{name: getattr(config, name) for name in MEASUREMENT_FIELDS}, "data": data_hash,
            "version": __version__}


def save_signals(signals: LayerSignals, work_dir: Path, key: dict[str, Any]) -> None:
    """Write the signals to `signals.npz` and the settings that produced them to `signals.json`."""
    arrays: dict[str, np.ndarray] = {}
    for capability in signals.probe_accuracy:
        arrays[f"probe_accuracy/{capability}"] = signals.probe_accuracy[capability]
        arrays[f"probe_ci/{capability}"] = signals.probe_ci[capability]
        arrays[f"probe_selectivity/{capability}"] = signals.probe_selectivity[capability]
    for capability, rows in signals.attribution.items():
        arrays[f"attribution/{capability}"] = rows
    if signals.cka is not None:
        arrays["cka"] = signals.cka
        arrays["angular"] = signals.angular

    with atomic_path(work_dir / "signals.npz") as temporary:
        with temporary.open("wb") as handle:
            np.savez(handle, **arrays)
    write_json_atomic(work_dir / "signals.json", key)


def load_saved_signals(work_dir: Path, key: dict[str, Any]) -> tuple[LayerSignals, LayerFeatures] | None:
    """Return earlier signals and features measured with the same settings, or None."""
    try:
        saved_key = json.loads((work_dir / "signals.json").read_text())
        meta = json.loads((work_dir / "features" / "meta.json").read_text())
        arrays = np.load(work_dir / "signals.npz")
    except (OSError, ValueError):
        return None
    if saved_key != json.loads(json.dumps(key)) or meta.get("done") != meta.get("total"):
        return None

    signals = LayerSignals()
    for name in arrays.files:
        if "/" in name:
            group, capability = name.split("/", 1)
            getattr(signals, group)[capability] = arrays[name]
    if "cka" in arrays.files:
        signals.cka, signals.angular = arrays["cka"], arrays["angular"]
    features = LayerFeatures(work_dir / "features", meta["layers"], meta["total"], meta["hidden_size"])
    return signals, features
