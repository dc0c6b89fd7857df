"""Tests for probe.segment: exact contiguous segmentation, choice of K and bootstrap stability."""

import itertools

import numpy as np
import pytest

from probe.segment import (
    BoundaryStability,
    bootstrap_boundaries,
    choose_k,
    segment,
    segment_cost_matrix,
    segment_similarity,
    segmentation_cost,
)


def block_diagonal_similarity(
    starts: list[int], n_layers: int, noise: float, rng: np.random.Generator
) -> np.ndarray:
    """Symmetric similarity matrix: 0.9 within blocks, 0.2 between, 1 on the diagonal, plus noise."""
    similarity = np.full((n_layers, n_layers), 0.2)
    edges = [0, *starts, n_layers]
    for start, end in zip(edges[:-1], edges[1:]):
        similarity[start:end, start:end] = 0.9
    np.fill_diagonal(similarity, 1.0)

    noise_matrix = rng.normal(scale=noise, size=(n_layers, n_layers))
    return similarity + (noise_matrix + noise_matrix.T) / 2


def blocks_from_starts(starts: list[int], n_layers: int) -> list[tuple[int, int]]:
    edges = [0, *starts, n_layers]
    return list(zip(edges[:-1], edges[1:]))


def naive_cost(F: np.ndarray, blocks: list[tuple[int, int]]) -> float:
    """Within-block sum of squared deviations from the block mean, computed directly."""
    total = 0.0
    for start, end in blocks:
        rows = F[start:end]
        total += float(np.sum((rows - rows.mean(axis=0)) ** 2))
    return total


def all_segmentations(n_layers: int, k: int, min_block: int):
    """Every split of [0, n_layers) into k contiguous blocks of at least min_block layers."""
    for starts in itertools.combinations(range(1, n_layers), k - 1):
        blocks = blocks_from_starts(list(starts), n_layers)
        if all(end - start >= min_block for start, end in blocks):
            yield blocks


# L in {4, 6, 12, 32} with known block starts.
KNOWN_STRUCTURES = [
    (4, [2]),
    (6, [2, 4]),
    (12, [3, 8]),
    (32, [5, 14, 25]),
]


@pytest.mark.parametrize(("n_layers", "starts"), KNOWN_STRUCTURES)
@pytest.mark.parametrize("noise", [0.0, 0.1, 0.2])
def test_segment_similarity_recovers_blocks(n_layers, starts, noise):
    rng = np.random.default_rng(n_layers)
    similarity = block_diagonal_similarity(starts, n_layers, noise, rng)

    blocks = segment_similarity(similarity, k=len(starts) + 1)

    assert blocks == blocks_from_starts(starts, n_layers)


@pytest.mark.parametrize(("n_layers", "starts"), KNOWN_STRUCTURES)
def test_choose_k_recovers_block_count(n_layers, starts):
    max_blocks = min(6, n_layers)
    selected = []
    for seed in range(20):
        similarity = block_diagonal_similarity(starts, n_layers, 0.1, np.random.default_rng(seed))
        k, costs = choose_k(similarity, max_blocks=max_blocks)
        selected.append(k)

    assert costs.shape == (max_blocks,)
    assert np.mean(np.array(selected) == len(starts) + 1) >= 0.9


@pytest.mark.parametrize("n_layers", [6, 12, 32])
def test_choose_k_single_block_for_noise(n_layers):
    selected = []
    for seed in range(20):
        F = np.random.default_rng(seed).normal(size=(n_layers, 10))
        k, _ = choose_k(F, max_blocks=min(6, n_layers))
        selected.append(k)

    assert np.mean(np.array(selected) == 1) >= 0.8


def test_choose_k_costs_non_increasing():
    F = np.random.default_rng(0).normal(size=(15, 4))

    _, costs = choose_k(F, max_blocks=8, min_block=1)

    assert np.all(np.diff(costs) <= 1e-12)
    assert costs[0] == pytest.approx(naive_cost(F, [(0, 15)]))


def test_choose_k_larger_penalty_fewer_blocks():
    rng = np.random.default_rng(1)
    similarity = block_diagonal_similarity([4, 8], 12, 0.1, rng)

    k_default, _ = choose_k(similarity, max_blocks=6)
    k_strict, _ = choose_k(similarity, max_blocks=6, penalty_scale=1e6)
    k_free, _ = choose_k(similarity, max_blocks=6, penalty_scale=0.0)

    assert k_default == 3
    assert k_strict == 1
    assert k_free == 6


@pytest.mark.parametrize(("n_layers", "k", "min_block"), [
    (2, 1, 1), (2, 2, 1), (3, 2, 1), (5, 2, 2), (6, 3, 2), (7, 3, 1), (8, 4, 2), (8, 2, 3),
])
def test_segment_matches_brute_force(n_layers, k, min_block):
    rng = np.random.default_rng(10 * n_layers + k)
    F = rng.normal(size=(n_layers, 3))

    blocks = segment(F, k, min_block)
    brute_force = min(all_segmentations(n_layers, k, min_block), key=lambda b: naive_cost(F, b))

    assert blocks == brute_force
    assert naive_cost(F, blocks) == pytest.approx(naive_cost(F, brute_force))
    assert all(end - start >= min_block for start, end in blocks)


def test_segment_cost_matrix_matches_direct_cost():
    rng = np.random.default_rng(2)
    F = 1000.0 + rng.normal(size=(7, 4))

    cost = segment_cost_matrix(F)

    for start in range(7):
        for end in range(start + 1, 8):
            assert cost[start, end] == pytest.approx(naive_cost(F, [(start, end)]), abs=1e-8)
    assert np.isinf(cost[3, 3])
    assert np.isinf(cost[4, 2])


def test_segmentation_cost_matches_direct_cost():
    F = np.random.default_rng(3).normal(size=(6, 2))
    blocks = [(0, 2), (2, 5), (5, 6)]

    assert segmentation_cost(F, blocks) == pytest.approx(naive_cost(F, blocks))


def test_segmentation_cost_rejects_gap():
    with pytest.raises(ValueError, match="blocks must be non-empty and contiguous from layer 0"):
        segmentation_cost(np.zeros((6, 2)), [(0, 2), (3, 6)])


@pytest.mark.parametrize("n_layers", range(1, 9))
def test_segment_tiny_layer_counts(n_layers):
    F = np.random.default_rng(n_layers).normal(size=(n_layers, 2))

    one_block = segment(F, 1)
    one_layer_each = segment(F, n_layers)

    assert one_block == [(0, n_layers)]
    assert one_layer_each == [(layer, layer + 1) for layer in range(n_layers)]


def test_segment_accepts_one_dimensional_curve():
    curve = np.array([0.1, 0.1, 0.12, 0.9, 0.88, 0.91])

    assert segment(curve, 2) == [(0, 3), (3, 6)]


def test_segment_returns_contiguous_cover():
    F = np.random.default_rng(4).normal(size=(20, 5))

    blocks = segment(F, 5, min_block=3)

    assert blocks[0][0] == 0
    assert blocks[-1][1] == 20
    for (_, end), (next_start, _) in zip(blocks[:-1], blocks[1:]):
        assert end == next_start
    assert all(end - start >= 3 for start, end in blocks)


def test_segment_rejects_too_many_blocks():
    message = r"`k` \* `min_block` must be at most the number of layers, got k=4, min_block=3 and 10 layers; lower k or min_block\."
    with pytest.raises(ValueError, match=message):
        segment(np.zeros((10, 2)), k=4, min_block=3)


def test_segment_rejects_zero_blocks():
    with pytest.raises(ValueError, match=r"^`k` must be at least 1, got 0\.$"):
        segment(np.zeros((5, 2)), k=0)


def test_segment_rejects_zero_min_block():
    with pytest.raises(ValueError, match=r"^`min_block` must be at least 1, got 0\.$"):
        segment(np.zeros((5, 2)), k=2, min_block=0)


def test_segment_rejects_nan():
    F = np.zeros((5, 2))
    F[1, 1] = np.nan

    with pytest.raises(ValueError, match="`F` contains NaN or infinite values"):
        segment(F, 2)


def test_segment_similarity_rejects_non_square():
    with pytest.raises(ValueError, match=r"must be a square matrix of shape \(n_layers, n_layers\), got shape \(4, 5\)"):
        segment_similarity(np.zeros((4, 5)), 2)


def test_choose_k_rejects_too_many_blocks():
    message = r"`max_blocks` \* `min_block` must be at most the number of layers, got max_blocks=5, min_block=2 and 8 layers"
    with pytest.raises(ValueError, match=message):
        choose_k(np.zeros((8, 2)), max_blocks=5, min_block=2)


def make_example_features(
    starts: list[int], n_layers: int, n_examples: int, noise: float, seed: int
) -> np.ndarray:
    """Per-example, per-layer features of shape (n_examples, n_layers, 4): block means plus noise."""
    rng = np.random.default_rng(seed)
    block_means = rng.normal(scale=3.0, size=(len(starts) + 1, 4))
    layer_means = np.repeat(block_means, np.diff([0, *starts, n_layers]), axis=0)  # (n_layers, 4)
    return layer_means[None] + rng.normal(scale=noise, size=(n_examples, n_layers, 4))


def test_bootstrap_clean_blocks_fully_stable():
    examples = make_example_features([4, 9], 12, n_examples=40, noise=0.5, seed=0)

    result = bootstrap_boundaries(
        lambda indices: examples[indices].mean(axis=0), n_examples=40, n_boot=20, k=3, min_block=2, seed=0
    )

    assert isinstance(result, BoundaryStability)
    assert result.blocks == [(0, 4), (4, 9), (9, 12)]
    np.testing.assert_array_equal(result.boundaries, [4, 9])
    np.testing.assert_array_equal(result.boundary_stability, [1.0, 1.0])
    np.testing.assert_array_equal(result.block_stability, [1.0, 1.0, 1.0])
    assert result.resampled_boundaries.shape == (20, 2)


def test_bootstrap_noise_less_stable():
    examples = np.random.default_rng(1).normal(size=(40, 12, 4))  # no block structure

    result = bootstrap_boundaries(
        lambda indices: examples[indices].mean(axis=0), n_examples=40, n_boot=20, k=3, min_block=2, seed=0
    )

    assert result.boundary_stability.shape == (2,)
    assert result.block_stability.shape == (3,)
    assert result.boundary_stability.mean() < 0.9
    assert result.block_stability.mean() < 0.9


def test_bootstrap_block_stability_from_both_ends():
    examples = make_example_features([6], 12, n_examples=30, noise=0.5, seed=2)

    result = bootstrap_boundaries(
        lambda indices: examples[indices].mean(axis=0), n_examples=30, n_boot=5, k=2, seed=3
    )

    # With one boundary, each block's stability is that boundary's stability.
    np.testing.assert_array_equal(result.block_stability, [result.boundary_stability[0]] * 2)


def test_bootstrap_deterministic_with_seed():
    examples = np.random.default_rng(4).normal(size=(25, 10, 3))

    def features(indices):
        return examples[indices].mean(axis=0)

    first = bootstrap_boundaries(features, n_examples=25, n_boot=8, k=3, seed=7)
    second = bootstrap_boundaries(features, n_examples=25, n_boot=8, k=3, seed=7)

    np.testing.assert_array_equal(first.resampled_boundaries, second.resampled_boundaries)


def test_bootstrap_rejects_changing_layer_count():
    def features(indices):
        return np.zeros((10 if len(np.unique(indices)) == len(indices) else 9, 2))

    with pytest.raises(ValueError, match="same number of layers for every resample, got 9 after 10"):
        bootstrap_boundaries(features, n_examples=20, n_boot=3, k=2, seed=0)


def test_bootstrap_rejects_zero_resamples():
    with pytest.raises(ValueError, match=r"^`n_boot` must be at least 1, got 0\.$"):
        bootstrap_boundaries(lambda indices: np.zeros((4, 1)), n_examples=5, n_boot=0, k=2)
