"""Exact contiguous segmentation of layers into blocks, choice of K, and bootstrap stability.

A layer is described by one row of a feature matrix F of shape
(n_layers, n_features), for example its row of the CKA matrix next to its
probe selectivity per capability. A segmentation into K blocks is scored by
the within-block sum of squared deviations of the rows from their block mean
(the K-means objective restricted to contiguous blocks). Dynamic programming
finds the exact minimum in O(K L^2) steps, and prefix sums make each
segment's cost O(n_features).

A similarity matrix such as a CKA matrix is segmented the same way, with its
rows as the features: layers in one block have similar similarity profiles.

Blocks are half-open ranges [start, end) of 0-based layer indices that
cover [0, n_layers) in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Block = tuple[int, int]
"""A half-open range [start, end) of 0-based layer indices."""


def _as_feature_matrix(F: np.ndarray, name: str = "F") -> np.ndarray:
    """Check per-layer features and return them as finite float64, shape (n_layers, n_features)."""
    F = np.asarray(F, dtype=np.float64)
    if F.ndim == 1:
        F = F[:, None]
    if F.ndim != 2 or F.shape[0] == 0 or F.shape[1] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty 2-D array of shape (n_layers, n_features), "
            f"got shape {F.shape}."
        )
    if not np.all(np.isfinite(F)):
        raise ValueError(f"`{name}` contains NaN or infinite values; check the per-layer signals.")
    return F


def _check_block_counts(k: int, min_block: int, n_layers: int, k_name: str = "k") -> None:
    """Raise a ValueError unless k blocks of at least min_block layers fit into n_layers."""
    if k < 1:
        raise ValueError(f"`{k_name}` must be at least 1, got {k}.")
    if min_block < 1:
        raise ValueError(f"`min_block` must be at least 1, got {min_block}.")
    if k * min_block > n_layers:
        raise ValueError(
            f"`{k_name}` * `min_block` must be at most the number of layers, got "
            f"{k_name}={k}, min_block={min_block} and {n_layers} layers; "
            f"lower {k_name} or min_block."
        )


def segment_cost_matrix(F: np.ndarray) -> np.ndarray:
    """Compute the within-block cost of every candidate block from prefix sums.

    Args:
        F: Per-layer features of shape (n_layers, n_features).

    Returns:
        Matrix of shape (n_layers + 1, n_layers + 1), float64. Entry [i, j] for
        i < j is the sum over layers in [i, j) of the squared Euclidean
        distance between the layer's row and the block's mean row, in squared
        units of F. Entries with j <= i are +inf.
    """
    F = _as_feature_matrix(F)
    n_layers = F.shape[0]

    # Centring the columns leaves every cost unchanged and avoids cancellation
    # in the prefix-sum differences when F has a large mean.
    F = F - F.mean(axis=0)
    sums = np.vstack([np.zeros(F.shape[1]), np.cumsum(F, axis=0)])  # (L + 1, n_features)
    square_sums = np.concatenate([[0.0], np.cumsum(np.einsum("lf,lf->l", F, F))])  # (L + 1,)

    # ||sums[j] - sums[i]||^2 from the Gram matrix of the prefix sums.
    gram = sums @ sums.T  # (L + 1, L + 1)
    diag = np.diag(gram)
    block_sum_norms = diag[None, :] + diag[:, None] - 2.0 * gram

    index = np.arange(n_layers + 1)
    lengths = index[None, :] - index[:, None]  # lengths[i, j] = j - i
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = square_sums[None, :] - square_sums[:, None] - block_sum_norms / lengths
    cost = np.where(lengths > 0, np.maximum(cost, 0.0), np.inf)
    return cost


def _optimal_tables(cost: np.ndarray, max_k: int, min_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Fill the dynamic-programming tables for 1..max_k blocks.

    Args:
        cost: Block costs of shape (n_layers + 1, n_layers + 1) from
            `segment_cost_matrix`.
        max_k: Maximum number of blocks.
        min_block: Minimum number of layers per block.

    Returns:
        best of shape (max_k + 1, n_layers + 1), where best[k, j] is the lowest
        cost of splitting layers [0, j) into k blocks (+inf if impossible), and
        split of the same shape, where split[k, j] is the start of the last
        block in that optimum.
    """
    size = cost.shape[0]
    index = np.arange(size)
    allowed = (index[None, :] - index[:, None]) >= min_block
    block_cost = np.where(allowed, cost, np.inf)

    best = np.full((max_k + 1, size), np.inf)
    best[0, 0] = 0.0
    split = np.zeros((max_k + 1, size), dtype=np.int64)
    for k in range(1, max_k + 1):
        # candidates[i, j]: best k - 1 blocks over [0, i), then one block [i, j).
        candidates = best[k - 1][:, None] + block_cost
        split[k] = np.argmin(candidates, axis=0)
        best[k] = candidates[split[k], index]
    return best, split


def _trace_blocks(split: np.ndarray, k: int, n_layers: int) -> list[Block]:
    """Read the optimal k blocks back from the split table."""
    blocks: list[Block] = []
    end = n_layers
    for blocks_left in range(k, 0, -1):
        start = int(split[blocks_left, end])
        blocks.append((start, end))
        end = start
    assert end == 0, "dynamic programming trace must end at layer 0"
    return blocks[::-1]


def segment(F: np.ndarray, k: int, min_block: int = 1) -> list[Block]:
    """Split layers into k contiguous blocks with the least within-block squared deviation.

    The result is an exact optimum of: the sum over blocks of the summed
    squared Euclidean distances between each layer's row of F and the block's
    mean row. When several segmentations tie, the one found first (earlier
    boundaries) is returned.

    Args:
        F: Per-layer features of shape (n_layers, n_features), or a 1-D curve
            of shape (n_layers,). Features on different scales should be
            standardised by the caller, because every column counts equally.
        k: Number of blocks, at least 1.
        min_block: Minimum number of layers per block, at least 1.

    Returns:
        k half-open blocks (start, end) of 0-based layer indices, in order,
        covering [0, n_layers) with no gap or overlap.

    Raises:
        ValueError: If F is not a finite non-empty matrix, k < 1,
            min_block < 1, or k * min_block > n_layers.
    """
    F = _as_feature_matrix(F)
    n_layers = F.shape[0]
    _check_block_counts(k, min_block, n_layers)

    _, split = _optimal_tables(segment_cost_matrix(F), k, min_block)
    return _trace_blocks(split, k, n_layers)


def _as_similarity_matrix(similarity: np.ndarray) -> np.ndarray:
    """Check that a similarity matrix is square and finite, and return it as float64."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(
            "`similarity` must be a square matrix of shape (n_layers, n_layers), got shape "
            f"{similarity.shape}."
        )
    return _as_feature_matrix(similarity, "similarity")


def segment_similarity(similarity: np.ndarray, k: int, min_block: int = 1) -> list[Block]:
    """Split layers into k contiguous blocks from a layer-by-layer similarity matrix.

    Each layer is described by its row of the matrix (its similarity to every
    layer), and `segment` groups layers with similar rows. A block-diagonal
    matrix therefore splits at the edges of its diagonal blocks. Using rows
    as features, rather than maximising mean within-block similarity, does
    not favour one-layer blocks, whose self-similarity is always 1.

    Args:
        similarity: Matrix of shape (n_layers, n_layers), for example from
            `probe.similarity.cka_matrix`. It need not be symmetric.
        k: Number of blocks, at least 1.
        min_block: Minimum number of layers per block, at least 1.

    Returns:
        k half-open blocks (start, end), as `segment` returns.

    Raises:
        ValueError: If the matrix is not square and finite, or as `segment`.
    """
    return segment(_as_similarity_matrix(similarity), k, min_block)


def segmentation_cost(F: np.ndarray, blocks: list[Block]) -> float:
    """Compute the within-block sum of squared deviations of a given segmentation.

    Args:
        F: Per-layer features of shape (n_layers, n_features).
        blocks: Half-open blocks (start, end) covering [0, n_layers) in order.

    Returns:
        The objective that `segment` minimises, in squared units of F.

    Raises:
        ValueError: If the blocks do not cover [0, n_layers) in order without
            gaps, overlaps or empty blocks.
    """
    F = _as_feature_matrix(F)
    expected_start = 0
    for start, end in blocks:
        if start != expected_start or end <= start:
            raise ValueError(
                f"blocks must be non-empty and contiguous from layer 0, got {blocks}."
            )
        expected_start = end
    if expected_start != F.shape[0]:
        raise ValueError(
            f"blocks must end at the number of layers {F.shape[0]}, got {blocks}."
        )

    cost = segment_cost_matrix(F)
    return float(sum(cost[start, end] for start, end in blocks))


def estimate_noise_variance(F: np.ndarray) -> float:
    """Estimate the per-feature noise variance of F from consecutive layer differences.

    If rows are block means plus independent noise of variance sigma^2 per
    feature, the squared distance between two consecutive rows of one block
    is 2 * sigma^2 times a chi-squared variable with n_features degrees of
    freedom. Dividing the median over consecutive pairs by the median of that
    distribution ignores the few pairs that straddle a boundary, as long as
    fewer than half of them do.

    Args:
        F: Per-layer features of shape (n_layers, n_features), n_layers >= 2.

    Returns:
        The estimate of sigma^2, in squared units of F.
    """
    F = _as_feature_matrix(F)
    jumps = np.sum(np.diff(F, axis=0) ** 2, axis=1)  # (n_layers - 1,)
    return float(np.median(jumps) / (2.0 * chi2.median(F.shape[1])))


def choose_k(
    F: np.ndarray,
    max_blocks: int,
    min_block: int = 1,
    *,
    penalty_scale: float = 1.5,
) -> tuple[int, np.ndarray]:
    """Choose the number of blocks by a BIC-style penalised cost.

    The selected k minimises cost(k) + k * penalty with penalty =
    penalty_scale * sigma^2 * (n_features + 1) * log(n_layers): each extra
    block adds n_features mean values and one boundary, and sigma^2 comes from
    `estimate_noise_variance`. This is the Bayesian information criterion for
    a piecewise-constant mean with Gaussian noise of known variance when
    penalty_scale is 1. Unlike an elbow rule, it is defined for every k from 1
    to max_blocks, including a structure with a single block. Ties go to the
    smaller k.

    The default penalty_scale of 1.5 is an empirical choice. In simulations
    on pure Gaussian noise with 1 to 3 features and 6 to 32 layers, scale 1
    selected extra blocks in up to 30% of draws. The noise estimate from few
    layers varies, and the best boundary is a maximum over positions.

    NOTE: CKA rows are correlated features, not independent noise, so the
    penalty is a heuristic there. On smoothly drifting signals without sharp
    boundaries it selects many blocks (8 of at most 8 for the 30-layer matrix
    exp(-|i - j| / 10)), so check the returned cost curve too.

    Args:
        F: Per-layer features of shape (n_layers, n_features), or a square
            similarity matrix segmented by rows as in `segment_similarity`.
        max_blocks: Maximum number of blocks to consider, at least 1.
        min_block: Minimum number of layers per block, at least 1.
        penalty_scale: Multiplier for the penalty; larger values select fewer
            blocks.

    Returns:
        The selected k, and the cost curve of shape (max_blocks,), float64,
        where entry k - 1 is the optimal within-block cost with k blocks.

    Raises:
        ValueError: If max_blocks < 1, min_block < 1,
            max_blocks * min_block > n_layers, or penalty_scale < 0.
    """
    F = _as_feature_matrix(F)
    n_layers, n_features = F.shape
    _check_block_counts(max_blocks, min_block, n_layers, k_name="max_blocks")
    if penalty_scale < 0:
        raise ValueError(f"`penalty_scale` must be non-negative, got {penalty_scale}.")

    best, _ = _optimal_tables(segment_cost_matrix(F), max_blocks, min_block)
    costs = best[1:, n_layers].copy()  # (max_blocks,)
    if n_layers < 2:
        return 1, costs

    # The floor keeps rounding differences from deciding when the data have no noise.
    noise_variance = max(estimate_noise_variance(F), 1e-12 * costs[0] / (n_layers * n_features))
    penalty = penalty_scale * noise_variance * (n_features + 1) * np.log(n_layers)
    penalised = costs + penalty * np.arange(1, max_blocks + 1)
    chosen = int(np.argmin(penalised)) + 1
    logger.debug(
        "choose_k: costs %s, penalty per block %.4g, selected k=%d", costs, penalty, chosen
    )
    return chosen, costs


@dataclass(frozen=True)
class BoundaryStability:
    """Bootstrap stability of a reference segmentation.

    Attributes:
        blocks: Reference blocks (start, end) from all examples.
        boundaries: Interior boundaries of the reference, shape (k - 1,): the
            start layer of every block after the first.
        boundary_stability: Shape (k - 1,), in [0, 1]. Entry b is the fraction
            of resamples with some boundary within `tolerance` layers of
            boundaries[b].
        block_stability: Shape (k,), in [0, 1]. Entry b is the fraction of
            resamples in which both ends of block b were found within
            `tolerance` layers. The ends 0 and n_layers always match.
        resampled_boundaries: Shape (n_boot, k - 1), the interior boundaries
            found on each resample.
        tolerance: Maximum distance in layers at which a boundary counts as
            found.
    """

    blocks: list[Block]
    boundaries: np.ndarray
    boundary_stability: np.ndarray
    block_stability: np.ndarray
    resampled_boundaries: np.ndarray
    tolerance: int


def _interior_boundaries(blocks: list[Block]) -> np.ndarray:
    """Return the start layers of every block after the first, shape (k - 1,)."""
    return np.array([start for start, _ in blocks[1:]], dtype=np.int64)


def _boundary_hits(reference: np.ndarray, resampled: np.ndarray, tolerance: int) -> np.ndarray:
    """Mark which reference boundaries each resample found.

    Args:
        reference: Reference boundaries of shape (k - 1,).
        resampled: Boundaries of shape (n_boot, k - 1).
        tolerance: Maximum distance in layers that counts as a match.

    Returns:
        Boolean array of shape (n_boot, k - 1).
    """
    distance = np.abs(resampled[:, None, :] - reference[None, :, None])  # (n_boot, k-1, k-1)
    return np.any(distance <= tolerance, axis=2)


def _block_hits(boundary_hits: np.ndarray) -> np.ndarray:
    """Mark, per resample, the blocks whose two ends were both found, shape (n_boot, k)."""
    n_boot = boundary_hits.shape[0]
    always = np.ones((n_boot, 1), dtype=bool)
    ends_found = np.hstack([always, boundary_hits, always])  # (n_boot, k + 1)
    return ends_found[:, :-1] & ends_found[:, 1:]


def _features_for(
    feature_fn: Callable[[np.ndarray], np.ndarray], indices: np.ndarray, n_layers: int | None
) -> np.ndarray:
    """Call feature_fn on example indices and check the shape of its result."""
    F = _as_feature_matrix(feature_fn(indices), "feature_fn(indices)")
    if n_layers is not None and F.shape[0] != n_layers:
        raise ValueError(
            f"`feature_fn` must return the same number of layers for every resample, got "
            f"{F.shape[0]} after {n_layers}."
        )
    return F


def bootstrap_boundaries(
    feature_fn: Callable[[np.ndarray], np.ndarray],
    n_examples: int,
    n_boot: int,
    k: int,
    min_block: int = 1,
    seed: int = 0,
    *,
    tolerance: int = 1,
) -> BoundaryStability:
    """Measure how stable the optimal segmentation is under resampling of examples.

    The reference segmentation uses all examples, feature_fn(arange(n_examples)).
    Each of n_boot resamples draws n_examples indices with replacement,
    recomputes the features with feature_fn and segments them with the same
    k and min_block.

    Args:
        feature_fn: Maps example indices of shape (n_examples,), int64,
            possibly with repeats, to per-layer features of shape
            (n_layers, n_features) computed from those examples only.
        n_examples: Number of examples available, at least 1.
        n_boot: Number of bootstrap resamples, at least 1.
        k: Number of blocks.
        min_block: Minimum number of layers per block.
        seed: Seed of the resampling generator.
        tolerance: Maximum distance in layers at which a resampled boundary
            matches a reference boundary, at least 0.

    Returns:
        The reference blocks with per-boundary and per-block stability.

    Raises:
        ValueError: If a count is below its minimum, feature_fn returns a
            different number of layers for some resample, or as `segment`.
    """
    for name, value, minimum in (("n_examples", n_examples, 1), ("n_boot", n_boot, 1),
                                 ("tolerance", tolerance, 0)):
        if value < minimum:
            raise ValueError(f"`{name}` must be at least {minimum}, got {value}.")

    reference_features = _features_for(feature_fn, np.arange(n_examples), None)
    n_layers = reference_features.shape[0]
    blocks = segment(reference_features, k, min_block)
    reference = _interior_boundaries(blocks)

    rng = np.random.default_rng(seed)
    resampled = np.empty((n_boot, k - 1), dtype=np.int64)
    for boot in tqdm(range(n_boot), desc="bootstrap segmentation", unit="resample"):
        indices = rng.integers(0, n_examples, size=n_examples)
        features = _features_for(feature_fn, indices, n_layers)
        resampled[boot] = _interior_boundaries(segment(features, k, min_block))

    boundary_hits = _boundary_hits(reference, resampled, tolerance)
    return BoundaryStability(
        blocks=blocks,
        boundaries=reference,
        boundary_stability=boundary_hits.mean(axis=0),
        block_stability=_block_hits(boundary_hits).mean(axis=0),
        resampled_boundaries=resampled,
        tolerance=tolerance,
    )
