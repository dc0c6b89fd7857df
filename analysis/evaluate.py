"""Held-out preference accuracy, reward margin, alignment tax and perplexity: base model vs trained runs.

For each capability the base model and every run score the same held-out
pairs with `probe.scoring.score_pairs` (summed completion log-probabilities in
nats, tokenized as TRL's DPOTrainer does). From those scores:

- accuracy: share of pairs where log p(chosen) > log p(rejected), summed over
  completion tokens; `accuracy_normalized` compares per-token means instead.
- margin: mean implicit DPO reward margin
  beta * ((logp_c - ref_logp_c) - (logp_r - ref_logp_r)) in nats, with the
  base model as reference.
- alignment tax: per run and capability, the paired change in accuracy against
  the base model; a drop whose interval excludes zero is flagged.
- perplexity on held-out plain text (Brown passages), a general-ability check
  that no capability suite covers.

Runs whose names differ only by a seed suffix ("-seed0", "_s1") pool into one
group, reported as the mean over seeds with a bootstrap interval over seeds
and items (see `analysis.bootstrap`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from analysis.bootstrap import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    mean_interval,
    paired_difference_interval,
    perplexity_intervals,
)
from analysis.runs import RunInfo
from analysis.scores import ModelScores, load_or_score_base, load_or_score_run
from probe.scoring import PairScores

logger = logging.getLogger(__name__)

TaxMetric = Literal["accuracy", "accuracy_normalized"]
SEED_SUFFIX = re.compile(r"[-_](?:seed|s)\d+$")


@dataclass
class EvalData:
    """The held-out data every model is scored on.

    Attributes:
        pairs: Preference pairs per capability, each a dict with `prompt`,
            `chosen` and `rejected` (and optionally `id`).
        texts: Plain-text passages for perplexity.
        source: Where the data came from, recorded in the report.
    """

    pairs: dict[str, list[dict[str, Any]]]
    texts: list[str]
    source: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Return a sha256 hex digest of every prompt, completion and text, in order."""
        digest = hashlib.sha256()
        for capability in sorted(self.pairs):
            for pair in self.pairs[capability]:
                record = [capability, pair["prompt"], pair["chosen"], pair["rejected"]]
                digest.update(json.dumps(record, sort_keys=True).encode())
        for text in self.texts:
            digest.update(json.dumps(["text", text]).encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint(),
            "pairs_per_capability": {capability: len(pairs) for capability, pairs in self.pairs.items()},
            "texts": len(self.texts),
            "source": self.source,
        }


def eval_data_from_suite(seed: int = 0, n_train: int = 300, n_heldout: int = 100, n_texts: int = 100) -> EvalData:
    """Load the held-out pairs of every capability and Brown passages from the capability suite.

    Args:
        seed: Suite seed (the same as training uses, so held-out pairs stay unseen).
        n_train: Train pairs per capability, as training used; the suite is built from both counts.
        n_heldout: Held-out pairs per capability.
        n_texts: Maximum number of Brown passages for perplexity.
    """
    from probe.suite import CAPABILITIES, load_suite

    suite = load_suite(seed=seed, n_train=n_train, n_heldout=n_heldout)
    pairs = {capability: list(suite.pairs(capability, "heldout")) for capability in CAPABILITIES}
    texts = list(suite.brown_passages("heldout"))[:n_texts]
    source = {"suite_manifest_hash": suite.manifest_hash, "suite_seed": seed, "n_heldout": n_heldout, "split": "heldout"}
    return EvalData(pairs, texts, source)


def group_name(run_name: str) -> str:
    """Return the run name without a trailing seed suffix ("-seed0", "_s1"), so the runs of several seeds pool."""
    return SEED_SUFFIX.sub("", run_name) or run_name


def group_runs(runs: list[RunInfo]) -> dict[str, list[RunInfo]]:
    """Group runs by `group_name`, keeping the order in which groups first appear."""
    groups: dict[str, list[RunInfo]] = {}
    for run in runs:
        groups.setdefault(group_name(run.name), []).append(run)
    return groups


@dataclass
class EvalSettings:
    """Settings for scoring models and drawing intervals.

    Attributes:
        batch_size: Sequences per forward pass.
        max_length: Token limit per prompt + completion; longer sequences keep their start.
        device: "cpu", "cuda" or "auto".
        dtype: Parameter dtype for scoring.
        resamples: Bootstrap replicates per interval.
        level: Interval coverage.
        seed: Seed of the bootstrap generator.
        tax_metric: Accuracy used for the alignment tax table.
        progress: Show progress bars.
    """

    batch_size: int = 8
    max_length: int = 512
    device: str = "cpu"
    dtype: str = "float32"
    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0
    tax_metric: TaxMetric = "accuracy"
    progress: bool = True


def evaluate_runs(
    runs: list[RunInfo],
    data: EvalData,
    *,
    settings: EvalSettings | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score the base model and every run on `data` and compute all metrics with intervals.

    Args:
        runs: Parsed run directories, all trained from the same base model.
        data: Held-out pairs and texts.
        settings: Scoring and bootstrap settings.
        cache_dir: Directory for cached scores; the base model's scores are
            keyed by model and data fingerprint, so several reports reuse them.

    Returns:
        A JSON-ready dict with `base`, `groups` (one per pooled group of runs)
        and `tax` (rows of the alignment tax table). See `docs/analysis.md`.

    Raises:
        ValueError: If the runs were trained from different base models.
    """
    settings = settings or EvalSettings()
    models = sorted({run.model_name for run in runs})
    if len(models) != 1:
        raise ValueError(f"all runs must share one base model to be compared against it, got {', '.join(models)}")

    base = load_or_score_base(models[0], runs[0].layers_path, data, settings, cache_dir)
    groups = {}
    for name, members in group_runs(runs).items():
        scores = [load_or_score_run(run, data, settings, cache_dir) for run in members]
        groups[name] = group_metrics(members, scores, base, settings)

    return {
        "model": models[0],
        "data": data.summary(),
        "settings": {"resamples": settings.resamples, "level": settings.level, "seed": settings.seed,
                     "max_length": settings.max_length, "tax_metric": settings.tax_metric},
        "base": base_metrics(base, settings),
        "groups": groups,
        "tax": tax_rows(groups, settings.tax_metric),
    }


def pair_values(scores: PairScores, reference: PairScores, beta: float) -> dict[str, np.ndarray]:
    """Per-pair values whose means are the reported metrics, each of shape (n_pairs,)."""
    return {
        "accuracy": scores.wins,
        "accuracy_normalized": scores.wins_normalized,
        "margin": scores.margins(reference, beta),
    }


def base_metrics(base: ModelScores, settings: EvalSettings) -> dict[str, Any]:
    capabilities = {}
    for capability, scores in base.pairs.items():
        values = pair_values(scores, scores, beta=0.0)
        capabilities[capability] = {
            "accuracy": interval(values["accuracy"], settings).to_dict(),
            "accuracy_normalized": interval(values["accuracy_normalized"], settings).to_dict(),
            "margin": None,
            "n": len(scores),
        }
    perplexity, _ = perplexity_intervals(
        base.text_logp, base.text_tokens, resamples=settings.resamples, level=settings.level, seed=settings.seed
    )
    return {"capabilities": capabilities, "perplexity": perplexity.to_dict()}


def group_metrics(runs: list[RunInfo], scores: list[ModelScores], base: ModelScores, settings: EvalSettings) -> dict[str, Any]:
    """Pool the scores of one group's runs (one per seed) into metrics with intervals and changes vs base."""
    capabilities = {}
    for capability, base_scores in base.pairs.items():
        per_seed = [pair_values(run_scores.pairs[capability], base_scores, run.beta) for run, run_scores in zip(runs, scores)]
        base_values = pair_values(base_scores, base_scores, beta=0.0)
        entry: dict[str, Any] = {"n": len(base_scores)}
        for metric in ("accuracy", "accuracy_normalized", "margin"):
            stacked = np.stack([values[metric] for values in per_seed])  # (n_seeds, n_pairs)
            entry[metric] = interval(stacked, settings).to_dict()
            if metric != "margin":
                entry[f"{metric}_change"] = difference(stacked, base_values[metric], settings).to_dict()
        capabilities[capability] = entry

    text_logp = np.stack([run_scores.text_logp for run_scores in scores])  # (n_seeds, n_texts)
    perplexity, change = perplexity_intervals(
        text_logp, base.text_tokens, base.text_logp,
        resamples=settings.resamples, level=settings.level, seed=settings.seed,
    )
    return {
        "runs": [run.name for run in runs],
        "seeds": [run.seed for run in runs],
        "strategy": runs[0].strategy,
        "target_capabilities": runs[0].target_capabilities,
        "adapted_layers": runs[0].adapted_layers,
        "capabilities": capabilities,
        "perplexity": perplexity.to_dict(),
        "perplexity_change": change.to_dict(),
    }


def interval(values: np.ndarray, settings: EvalSettings) -> Interval:
    return mean_interval(values, resamples=settings.resamples, level=settings.level, seed=settings.seed)


def difference(values: np.ndarray, reference: np.ndarray, settings: EvalSettings) -> Interval:
    return paired_difference_interval(values, reference, resamples=settings.resamples, level=settings.level, seed=settings.seed)


def tax_rows(groups: dict[str, dict[str, Any]], metric: TaxMetric) -> list[dict[str, Any]]:
    """Build the alignment tax table: per group, the change on every capability and in perplexity.

    A row is flagged as a tax when the capability's accuracy dropped and the
    interval of the change excludes zero, or when perplexity rose and its
    interval excludes zero.
    """
    rows = []
    for name, group in groups.items():
        for capability, entry in group["capabilities"].items():
            change = Interval.from_dict(entry[f"{metric}_change"])
            rows.append({
                "group": name,
                "measure": capability,
                "metric": metric,
                "target": capability in group["target_capabilities"],
                "change": change.to_dict(),
                "tax": change.estimate < 0.0 and change.excludes_zero(),
            })
        change = Interval.from_dict(group["perplexity_change"])
        rows.append({
            "group": name,
            "measure": "general (perplexity)",
            "metric": "perplexity",
            "target": False,
            "change": change.to_dict(),
            "tax": change.estimate > 0.0 and change.excludes_zero(),
        })
    return rows
