"""Find functional blocks of decoder layers from data and write a partition.

The pipeline: capture pooled activations of the capability suite at every
layer, fit linear probes per layer and capability, compute the layer x layer
debiased CKA matrix and consecutive angular distances, take the step-0 DPO
gradient per layer and capability, then segment the layers exactly into
contiguous blocks on a per-layer feature built from those signals, with a
bootstrap for boundary stability.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from probe import __version__
from probe.activations import LayerFeatures, extract_features
from probe.attribution import attribution_mass, dpo_gradient_attribution
from probe.io import write_json_atomic
from probe.models import LoadedModel, ModelNotAvailableError, load_model, resolve_model_spec
from probe.partition import CAPABILITIES, Block, Partition
from probe.probes import LinearProbeSuite
from probe.segment import bootstrap_boundaries, choose_k, segment
from probe.signals import LayerSignals, load_saved_signals, measurement_key, save_signals, write_figures
from probe.similarity import cka_matrix, consecutive_angular_distance

logger = logging.getLogger(__name__)


@dataclass
class DiscoverConfig:
    """Settings of `probe-layers`; each field becomes a `--flag`.

    Attributes are documented in `probe.cli` help texts.
    """

    model: str = "smollm2"
    out: str = "discovered.json"
    work_dir: str | None = None
    preset: Literal["thirds"] | None = None
    blocks: int | None = None
    max_blocks: int = 6
    min_block: int = 2
    seed: int = 0
    n_train: int = 100
    attribution_pairs: int = 16
    cka_examples: int = 768
    n_boot: int = 30
    n_splits: int = 5
    pooling: Literal["mean", "last"] = "mean"
    batch_size: int = 16
    max_length: int = 128
    beta: float = 0.1
    dtype: str = "float32"
    device: str = "auto"
    layers_path: str | None = None
    resume: bool = False
    signals: list[str] = field(default_factory=lambda: ["probe", "cka", "attribution"])

    def resolved_work_dir(self) -> Path:
        if self.work_dir:
            return Path(self.work_dir)
        out = Path(self.out)
        return out.parent / f"{out.stem}-probe"


# ---------------------------------------------------------------------------
# measurement


def suite_inputs(suite, n_train: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Probe texts of every capability.

    Returns:
        Texts, labels (1 good, 0 corrupted), capability index and pair index,
        the last three of shape (n_texts,).
    """
    texts, labels, groups, pair_ids = [], [], [], []
    for index, capability in enumerate(CAPABILITIES):
        items = suite.probe_items(capability, "train")[: 2 * n_train]
        texts += [item["text"] for item in items]
        labels += [int(item["label"]) for item in items]
        groups += [index] * len(items)
        pair_ids += [item["pair_id"] for item in items]
    pair_index = np.unique(np.asarray(pair_ids), return_inverse=True)[1]
    return texts, np.asarray(labels), np.asarray(groups), pair_index


def fit_probes(features: LayerFeatures, labels: np.ndarray, groups: np.ndarray, pair_index: np.ndarray,
               config: DiscoverConfig, signals: LayerSignals) -> None:
    from tqdm.auto import tqdm

    for index, capability in enumerate(tqdm(CAPABILITIES, desc="linear probes", unit="capability")):
        rows = np.flatnonzero(groups == index)
        probe = LinearProbeSuite(n_splits=config.n_splits, random_state=config.seed, n_jobs=-1)
        # The good and the corrupted text of a pair share a fold, so no probe trains on one and is tested on the other.
        probe.fit(features.all_layers(config.pooling, rows), labels[rows], groups=pair_index[rows])
        signals.probe_accuracy[capability] = probe.accuracy_
        signals.probe_ci[capability] = probe.accuracy_ci_
        signals.probe_selectivity[capability] = probe.selectivity_


def cka_sample(n_examples: int, limit: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if n_examples <= limit:
        return np.arange(n_examples)
    return np.sort(rng.choice(n_examples, size=limit, replace=False))


def measure(loaded: LoadedModel, suite, config: DiscoverConfig, work_dir: Path) -> tuple[LayerSignals, LayerFeatures]:
    texts, labels, groups, pair_index = suite_inputs(suite, config.n_train)
    logger.info("probing %d texts (%s) at %d layers", len(texts), ", ".join(CAPABILITIES), loaded.num_layers)
    features = extract_features(
        loaded.model, loaded.tokenizer, loaded.stack, texts, work_dir / "features",
        batch_size=config.batch_size, max_length=config.max_length, resume=config.resume, model_name=loaded.spec.name,
    )
    signals = LayerSignals()
    if "probe" in config.signals:
        fit_probes(features, labels, groups, pair_index, config, signals)
    if "cka" in config.signals:
        sample = cka_sample(len(texts), config.cka_examples, config.seed)
        layer_features = features.all_layers(config.pooling, sample)
        signals.cka = cka_matrix(layer_features)
        signals.angular = consecutive_angular_distance(layer_features)
    if "attribution" in config.signals:
        for capability in CAPABILITIES:
            pairs = suite.pairs(capability, "train")[: config.attribution_pairs]
            signals.attribution[capability] = dpo_gradient_attribution(
                loaded.model, loaded.tokenizer, loaded.stack, pairs, beta=config.beta,
                max_length=config.max_length, desc=f"attribution ({capability})",
            )
    return signals, features


# ---------------------------------------------------------------------------
# segmentation


def standardise_group(columns: np.ndarray) -> np.ndarray:
    """Z-score each column, then scale the group so that its total variance is 1.

    Every signal (the CKA rows, the probe curves, the attribution curves)
    then weighs the same in the segmentation cost however many columns it has.
    """
    columns = np.asarray(columns, dtype=np.float64)
    spread = columns.std(axis=0)
    scaled = (columns - columns.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    return scaled / np.sqrt(columns.shape[1])


def segmentation_features(signals: LayerSignals, cka: np.ndarray | None = None,
                          attribution: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Per-layer feature matrix for segmentation, shape (n_layers, n_features)."""
    cka = signals.cka if cka is None else cka
    attribution = attribution if attribution is not None else {c: signals.attribution_profile(c) for c in signals.attribution}
    groups = []
    if cka is not None:
        groups.append(standardise_group(cka))
    if signals.probe_selectivity:
        groups.append(standardise_group(np.stack([signals.probe_selectivity[c] for c in CAPABILITIES], axis=1)))
    if attribution:
        groups.append(standardise_group(np.stack([attribution[c] for c in CAPABILITIES], axis=1)))
    if not groups:
        raise ValueError("no signal was measured; `signals` must include probe, cka or attribution")
    return np.concatenate(groups, axis=1)


def bootstrap_feature_fn(signals: LayerSignals, features: LayerFeatures, config: DiscoverConfig):
    """Build f(indices) that recomputes the segmentation features from resampled examples.

    CKA is recomputed on a resample of the CKA examples and the attribution
    profiles on a resample of the attribution pairs; one index vector drives
    both, folded into each pool's size.
    """
    # NOTE: probe curves enter every resample unchanged, because refitting
    # cross-validated probes per resample costs minutes; the reported
    # stability therefore covers CKA and attribution noise only.
    sample = cka_sample(features.n_examples, config.cka_examples, config.seed)
    cka_features = features.all_layers(config.pooling, sample) if signals.cka is not None else None

    def feature_fn(indices: np.ndarray) -> np.ndarray:
        cka = None
        if cka_features is not None:
            picked = indices % cka_features.shape[1]
            cka = cka_matrix(cka_features[:, picked, :], progress=False)
        # The first n_pairs of the iid indices, folded into [0, n_pairs), are an iid resample of the pairs.
        attribution = {c: rows[indices[: rows.shape[0]] % rows.shape[0]].mean(axis=0)
                       for c, rows in signals.attribution.items()}
        return segmentation_features(signals, cka, attribution)

    return feature_fn, len(sample)


def block_names(k: int) -> list[str]:
    """Names by position: local first, global last, intermediate between."""
    if k == 1:
        return ["all"]
    if k == 2:
        return ["local", "global"]
    if k == 3:
        return ["local", "intermediate", "global"]
    return ["local", *[f"intermediate{i}" for i in range(1, k - 1)], "global"]


def capability_scores(signals: LayerSignals, n_layers: int) -> dict[str, np.ndarray]:
    """Per-layer score of each capability in [0, 1]: mean of max-normalised selectivity and attribution."""
    scores = {}
    for capability in CAPABILITIES:
        parts = []
        if capability in signals.probe_selectivity:
            parts.append(signals.probe_selectivity[capability])
        if capability in signals.attribution:
            parts.append(signals.attribution_profile(capability))
        normalised = [np.clip(p, 0, None) / max(float(np.max(p)), 1e-12) for p in parts]
        scores[capability] = np.mean(normalised, axis=0) if normalised else np.zeros(n_layers)
    return scores


def assign_capabilities(ranges: list[tuple[int, int]], signals: LayerSignals, n_layers: int) -> list[str | None]:
    """Give each block the capability most concentrated in it, or None.

    A capability's concentration in a block is its mean score inside the
    block minus its mean over all blocks. The block gets the capability with
    the largest positive concentration.
    """
    scores = capability_scores(signals, n_layers)
    means = {c: np.array([s[a:b].mean() for a, b in ranges]) for c, s in scores.items()}
    assigned: list[str | None] = []
    for index in range(len(ranges)):
        excess = {c: float(m[index] - m.mean()) for c, m in means.items()}
        best = max(excess, key=excess.get)
        assigned.append(best if excess[best] > 1e-9 else None)
    return assigned


def discover_partition(signals: LayerSignals, features: LayerFeatures, loaded: LoadedModel,
                       config: DiscoverConfig, data_hash: str) -> Partition:
    n_layers = loaded.num_layers
    F = segmentation_features(signals)
    if config.blocks is not None:
        k, costs = config.blocks, None
    else:
        max_blocks = min(config.max_blocks, n_layers // config.min_block)
        k, costs = choose_k(F, max_blocks, config.min_block)
    logger.info("segmenting %d layers into %d blocks (min_block=%d)", n_layers, k, config.min_block)

    ranges = segment(F, k, config.min_block)
    stability = None
    if config.n_boot > 0 and k > 1:
        feature_fn, n_examples = bootstrap_feature_fn(signals, features, config)
        stability = bootstrap_boundaries(feature_fn, n_examples, config.n_boot, k, config.min_block, config.seed)
        ranges = [tuple(block) for block in stability.blocks]

    capabilities = assign_capabilities(ranges, signals, n_layers)
    total_attribution = sum((signals.attribution_profile(c) for c in signals.attribution), np.zeros(n_layers))
    masses = attribution_mass(total_attribution, ranges) if signals.attribution else [None] * k
    if stability is not None:
        stabilities = [float(value) for value in stability.block_stability]
    else:
        # One block has no boundary to move; without a bootstrap the stability is unknown.
        stabilities = [1.0 if k == 1 else None] * k
    blocks = [
        Block(name, start, end, capability, stabilities[i], masses[i])
        for i, (name, (start, end), capability) in enumerate(zip(block_names(k), ranges, capabilities))
    ]

    method: dict[str, Any] = {
        "signals": list(config.signals), "k": k, "k_chosen_by": "fixed" if config.blocks else "penalised cost (BIC-style)",
        "min_block": config.min_block, "seed": config.seed, "data": data_hash, "pooling": config.pooling,
        "n_train_per_capability": config.n_train, "attribution_pairs": config.attribution_pairs, "n_boot": config.n_boot,
    }
    if costs is not None:
        method["cost_curve"] = [round(float(c), 5) for c in costs]
    if stability is not None:
        method["boundary_stability"] = [round(float(s), 3) for s in stability.boundary_stability]
    partition = Partition(n_layers, blocks, model_metadata(loaded), method, signals.summary(),
                          f"probe-layers {__version__}")
    partition.validate()
    return partition


def model_metadata(loaded: LoadedModel) -> dict[str, Any]:
    return {"name": loaded.spec.name, "source": loaded.spec.source, "hf_id": loaded.spec.hf_id,
            "num_layers": loaded.num_layers, "layers_path": loaded.stack.path}


def check_block_counts(config: DiscoverConfig, num_layers: int) -> None:
    """Reject --blocks, --min-block and --max-blocks that cannot fit `num_layers` layers, before any probing."""
    if config.min_block > num_layers:
        raise ValueError(f"`--min-block` must be at most the model's {num_layers} layers, got {config.min_block}")
    if config.blocks is not None and config.blocks * config.min_block > num_layers:
        raise ValueError(
            f"`--blocks` {config.blocks} times `--min-block` {config.min_block} exceeds the model's {num_layers} "
            f"layers; lower --blocks or --min-block"
        )


def write_preset_without_model(config: DiscoverConfig) -> Partition | None:
    """Write the thirds preset from the layer count an alias records, when the model cannot be loaded."""
    spec = resolve_model_spec(config.model)
    if spec.num_layers is None:
        return None
    metadata = {"name": spec.name, "source": spec.source, "hf_id": spec.hf_id, "num_layers": spec.num_layers,
                "layers_path": config.layers_path or "model.layers"}
    partition = Partition.thirds(spec.num_layers, metadata)
    partition.created_by = f"probe-layers {__version__}"
    partition.save(config.out)
    logger.warning("%s could not be loaded; wrote the thirds preset from its known layer count (%d)",
                   spec.name, spec.num_layers)
    return partition


def run_discovery(config: DiscoverConfig, loaded: LoadedModel | None = None) -> Partition:
    """Run `probe-layers`: measure, segment and write the partition and figures.

    Args:
        config: The settings.
        loaded: An already loaded model (skips loading `config.model`).

    Returns:
        The written partition.
    """
    started = time.perf_counter()
    if loaded is None:
        try:
            loaded = load_model(config.model, dtype=config.dtype, device=config.device, layers_path=config.layers_path)
        except ModelNotAvailableError:
            # The thirds preset needs only the layer count, which the aliases record.
            partition = write_preset_without_model(config) if config.preset == "thirds" else None
            if partition is None:
                raise
            return partition
    check_block_counts(config, loaded.num_layers)
    work_dir = config.resolved_work_dir()
    work_dir.mkdir(parents=True, exist_ok=True)

    if config.preset == "thirds":
        partition = Partition.thirds(loaded.num_layers, model_metadata(loaded))
        partition.created_by = f"probe-layers {__version__}"
        partition.save(config.out)
        return partition

    from probe.suite import load_suite

    suite = load_suite(seed=config.seed, n_train=config.n_train)
    key = measurement_key(config, suite.manifest_hash)
    saved = load_saved_signals(work_dir, key) if config.resume else None
    if saved is not None:
        logger.info("reusing signals measured earlier with the same settings in %s", work_dir)
        signals, features = saved
    else:
        signals, features = measure(loaded, suite, config, work_dir)
        save_signals(signals, work_dir, key)
    partition = discover_partition(signals, features, loaded, config, suite.manifest_hash)
    partition.method["seconds"] = round(time.perf_counter() - started, 1)

    partition.save(config.out)
    write_figures(partition, signals, work_dir)
    write_json_atomic(work_dir / "config.json", asdict(config))
    return partition
