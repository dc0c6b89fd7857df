"""Bootstrap intervals for per-pair statistics, pooled over training seeds.

Every statistic here is a mean over held-out items (pairs or texts) of a
per-item value, averaged over the runs of several seeds. One bootstrap
replicate draws the seeds with replacement and, independently, the items with
replacement. The same item draw is used for every seed and for the base model,
because all of them are scored on the same items, so differences against the
base model are paired. With one seed, the interval covers only the sampling of
items, not the variation between training runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval.

    Attributes:
        estimate: The statistic on the data as observed.
        low: Lower end of the interval.
        high: Upper end of the interval.
        level: Coverage of the interval, e.g. 0.95.
    """

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> "Interval":
        return cls(data["estimate"], data["low"], data["high"], data.get("level", DEFAULT_LEVEL))

    def format(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def percentile_interval(replicates: np.ndarray, estimate: float, level: float) -> Interval:
    """Build an interval from bootstrap replicates of shape (n_resamples,).

    The percentile interval is widened to include `estimate` when ties make
    it miss (possible with very few items), so it always contains the estimate.
    """
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Interval(float(estimate), float(min(low, estimate)), float(max(high, estimate)), level)


def draw_indices(rng: np.random.Generator, n_items: int, n_seeds: int, n_resamples: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw item and seed indices with replacement.

    Returns:
        Item indices, int array of shape (n_resamples, n_items), and seed
        indices, int array of shape (n_resamples, n_seeds).
    """
    if n_items < 1:
        raise ValueError(f"a bootstrap needs at least one item, got n_items={n_items}")
    items = rng.integers(0, n_items, size=(n_resamples, n_items))
    seeds = rng.integers(0, n_seeds, size=(n_resamples, n_seeds))
    return items, seeds


def resampled_means(values: np.ndarray, items: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Mean over items, then over seeds, for every replicate.

    Args:
        values: Per-item values, shape (n_seeds, n_items).
        items: Item indices, shape (n_resamples, n_items).
        seeds: Seed indices, shape (n_resamples, n_seeds).

    Returns:
        Replicate means, shape (n_resamples,).
    """
    per_seed = values[:, items].mean(axis=2)  # (n_seeds, n_resamples)
    replicate = np.arange(items.shape[0])[:, None]
    return per_seed.T[replicate, seeds].mean(axis=1)


def as_seed_matrix(values: np.ndarray) -> np.ndarray:
    """Turn per-item values of shape (n_items,) or (n_seeds, n_items) into shape (n_seeds, n_items)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return values[None, :]
    if values.ndim != 2:
        raise ValueError(f"values must have shape (n_items,) or (n_seeds, n_items), got {values.shape}")
    return values


def mean_interval(
    values: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed: int = 0
) -> Interval:
    """Mean of per-item values pooled over seeds, with a bootstrap interval.

    Args:
        values: Per-item values, shape (n_items,) or (n_seeds, n_items), for
            example 1.0 where a pair is ranked correctly.
        resamples: Number of bootstrap replicates.
        level: Interval coverage.
        seed: Seed of the resampling generator.
    """
    values = as_seed_matrix(values)
    items, seeds = draw_indices(np.random.default_rng(seed), values.shape[1], values.shape[0], resamples)
    return percentile_interval(resampled_means(values, items, seeds), float(values.mean()), level)


def paired_difference_interval(
    values: np.ndarray,
    reference: np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Difference of means (runs minus reference) over the same items, with a paired bootstrap interval.

    Args:
        values: Per-item values of the runs, shape (n_items,) or (n_seeds, n_items).
        reference: Per-item values of the reference (the base model), shape (n_items,).
        resamples: Number of bootstrap replicates.
        level: Interval coverage.
        seed: Seed of the resampling generator.
    """
    values = as_seed_matrix(values)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (values.shape[1],):
        raise ValueError(f"reference must have shape ({values.shape[1]},) to pair with the runs, got {reference.shape}")

    items, seeds = draw_indices(np.random.default_rng(seed), values.shape[1], values.shape[0], resamples)
    replicates = resampled_means(values, items, seeds) - reference[items].mean(axis=1)
    estimate = float(values.mean() - reference.mean())
    return percentile_interval(replicates, estimate, level)


def perplexity_replicates(logp: np.ndarray, tokens: np.ndarray, items: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Token-weighted perplexity per replicate, averaged over the drawn seeds.

    Args:
        logp: Summed log-probability of each text in nats, shape (n_seeds, n_texts).
        tokens: Scored tokens of each text, shape (n_texts,).
        items: Text indices, shape (n_resamples, n_texts).
        seeds: Seed indices, shape (n_resamples, n_seeds).

    Returns:
        Perplexities, shape (n_resamples,).
    """
    total_tokens = tokens[items].sum(axis=1)  # (n_resamples,)
    per_seed = np.exp(-logp[:, items].sum(axis=2) / total_tokens)  # (n_seeds, n_resamples)
    replicate = np.arange(items.shape[0])[:, None]
    return per_seed.T[replicate, seeds].mean(axis=1)


def perplexity_intervals(
    logp: np.ndarray,
    tokens: np.ndarray,
    reference_logp: np.ndarray | None = None,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> tuple[Interval, Interval | None]:
    """Perplexity exp(-sum logp / sum tokens) pooled over seeds, and its paired change against a reference.

    Args:
        logp: Summed log-probability per text in nats, shape (n_texts,) or (n_seeds, n_texts).
        tokens: Scored tokens per text, shape (n_texts,).
        reference_logp: The base model's summed log-probability per text, shape (n_texts,), or None.
        resamples: Number of bootstrap replicates.
        level: Interval coverage.
        seed: Seed of the resampling generator.

    Returns:
        The perplexity interval, and the interval of (perplexity - reference
        perplexity), or None without a reference.
    """
    logp = as_seed_matrix(logp)
    tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.sum() <= 0:
        raise ValueError("perplexity needs at least one scored token; every text is empty")

    items, seeds = draw_indices(np.random.default_rng(seed), logp.shape[1], logp.shape[0], resamples)
    replicates = perplexity_replicates(logp, tokens, items, seeds)
    estimate = float(np.exp(-logp.sum(axis=1) / tokens.sum()).mean())
    perplexity = percentile_interval(replicates, estimate, level)
    if reference_logp is None:
        return perplexity, None

    reference = as_seed_matrix(reference_logp)
    reference_replicates = perplexity_replicates(reference, tokens, items, np.zeros_like(seeds[:, :1]))
    reference_estimate = float(np.exp(-reference.sum() / tokens.sum()))
    change = percentile_interval(replicates - reference_replicates, estimate - reference_estimate, level)
    return perplexity, change
