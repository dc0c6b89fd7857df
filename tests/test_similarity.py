"""Tests for probe.similarity: debiased linear CKA and angular distance."""

import numpy as np
import pytest

from probe.similarity import (
    angular_distance,
    cka_matrix,
    consecutive_angular_distance,
    debiased_linear_cka,
)


def naive_unbiased_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC estimator of Song et al. (2012), written term by term with loops."""
    n = K.shape[0]
    K = K.copy()
    L = L.copy()
    for i in range(n):
        K[i, i] = 0.0
        L[i, i] = 0.0

    trace_term = 0.0
    for i in range(n):
        for j in range(n):
            trace_term += K[i, j] * L[j, i]

    sum_k = sum(K[i, j] for i in range(n) for j in range(n))
    sum_l = sum(L[i, j] for i in range(n) for j in range(n))

    cross_term = 0.0
    for i in range(n):
        for j in range(n):
            for m in range(n):
                cross_term += K[i, j] * L[j, m]

    value = trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * cross_term / (n - 2)
    return value / (n * (n - 3))


def naive_debiased_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Debiased linear CKA from the naive HSIC estimator."""
    K = X @ X.T
    L = Y @ Y.T
    return naive_unbiased_hsic(K, L) / np.sqrt(naive_unbiased_hsic(K, K) * naive_unbiased_hsic(L, L))


def biased_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Ordinary (biased) linear CKA, for contrast with the debiased estimator."""
    X = X - X.mean(axis=0)
    Y = Y - Y.mean(axis=0)
    return np.linalg.norm(X.T @ Y) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("n_examples", [4, 5, 9, 16])
def test_cka_matches_naive_reference(n_examples):
    rng = np.random.default_rng(n_examples)
    X = rng.normal(size=(n_examples, 3))
    Y = X @ rng.normal(size=(3, 5)) + 0.7 * rng.normal(size=(n_examples, 5))

    expected = naive_debiased_cka(X, Y)

    assert debiased_linear_cka(X, Y) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cka_matrix_matches_pairwise_cka():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 6))
    layers = [base @ rng.normal(size=(6, width)) + rng.normal(size=(12, width)) for width in (4, 6, 9)]

    matrix = cka_matrix(layers)

    for i in range(3):
        for j in range(3):
            expected = 1.0 if i == j else naive_debiased_cka(layers[i], layers[j])
            assert matrix[i, j] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_cka_of_identical_inputs_is_one():
    X = np.random.default_rng(1).normal(size=(20, 7))

    assert debiased_linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_rotation_and_scaling():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(25, 8))
    Y = X[:, :5] + 0.5 * rng.normal(size=(25, 5))
    reference = debiased_linear_cka(X, Y)

    rotated = X @ random_orthogonal(8, rng)
    scaled = 37.5 * Y

    assert debiased_linear_cka(rotated, Y) == pytest.approx(reference, rel=1e-9)
    assert debiased_linear_cka(X, scaled) == pytest.approx(reference, rel=1e-9)
    assert debiased_linear_cka(rotated, scaled) == pytest.approx(reference, rel=1e-9)


def test_cka_symmetric():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(15, 4))
    Y = np.tanh(X @ rng.normal(size=(4, 10)))

    assert debiased_linear_cka(X, Y) == pytest.approx(debiased_linear_cka(Y, X), rel=1e-12)


def test_cka_near_zero_for_independent_gaussians():
    n_examples, width, n_seeds = 32, 64, 16
    debiased = []
    biased = []
    for seed in range(n_seeds):
        rng = np.random.default_rng(100 + seed)
        X = rng.normal(size=(n_examples, width))
        Y = rng.normal(size=(n_examples, width))
        debiased.append(debiased_linear_cka(X, Y))
        biased.append(biased_linear_cka(X, Y))

    # Biased CKA is far from 0 in this regime, so the bound below is not trivially met.
    assert np.mean(biased) > 0.3
    assert abs(np.mean(debiased)) < 0.05


def test_cka_no_nan_for_constant_columns():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(10, 5))
    X[:, 2] = 3.0
    Y = np.hstack([X[:, :2], np.full((10, 3), -1.0)])

    value = debiased_linear_cka(X, Y)

    assert np.isfinite(value)
    assert -1.0 <= value <= 1.0


def test_cka_constant_column_does_not_change_value():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(10, 4))
    Y = rng.normal(size=(10, 3))
    with_constant = np.hstack([X, np.full((10, 1), 5.0)])

    assert debiased_linear_cka(with_constant, Y) == pytest.approx(debiased_linear_cka(X, Y), rel=1e-9)


def test_cka_zero_for_constant_representation():
    X = np.random.default_rng(6).normal(size=(10, 4))
    constant = np.full((10, 4), 2.5)

    assert debiased_linear_cka(X, constant) == 0.0
    assert debiased_linear_cka(constant, constant) == 0.0


def test_cka_finite_for_rank_one_input():
    rng = np.random.default_rng(7)
    X = np.outer(rng.normal(size=12), rng.normal(size=6))
    Y = rng.normal(size=(12, 3))

    assert np.isfinite(debiased_linear_cka(X, Y))
    assert debiased_linear_cka(X, 2.0 * X) == pytest.approx(1.0, abs=1e-9)


def test_cka_rejects_too_few_examples():
    X = np.ones((3, 2))

    with pytest.raises(ValueError, match="debiased CKA needs at least 4 examples, got 3 in `X`"):
        debiased_linear_cka(X, X)


def test_cka_rejects_mismatched_example_counts():
    with pytest.raises(ValueError, match="same number of examples, got 5 and 6"):
        debiased_linear_cka(np.ones((5, 2)), np.ones((6, 2)))


def test_cka_rejects_nan():
    X = np.ones((5, 2))
    X[0, 0] = np.nan

    with pytest.raises(ValueError, match="`X` contains NaN or infinite values"):
        debiased_linear_cka(X, np.ones((5, 2)))


def test_cka_matrix_symmetric_with_unit_diagonal():
    rng = np.random.default_rng(8)
    features = np.cumsum(rng.normal(size=(6, 20, 5)), axis=0)  # (n_layers, n_examples, d)

    matrix = cka_matrix(features)

    assert matrix.shape == (6, 6)
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), np.ones(6))
    assert np.all(np.abs(matrix) <= 1.0)


def test_cka_matrix_degenerate_layer_has_zero_row():
    rng = np.random.default_rng(9)
    features = rng.normal(size=(3, 10, 4))
    features[1] = 1.0

    matrix = cka_matrix(features)

    assert not np.any(np.isnan(matrix))
    assert matrix[1, 1] == 1.0
    assert matrix[0, 1] == 0.0
    assert matrix[1, 2] == 0.0


def test_cka_matrix_rejects_different_example_counts():
    layers = [np.ones((5, 2)), np.ones((6, 2))]

    with pytest.raises(ValueError, match=r"same number of examples, got counts \[5, 6\]"):
        cka_matrix(layers)


def test_angular_distance_known_angles():
    X = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    Y = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])

    # Per example: 0, 1/2, 1 and 1/4 (45 degrees) of pi.
    assert angular_distance(X, Y) == pytest.approx((0.0 + 0.5 + 1.0 + 0.25) / 4)


def test_angular_distance_zero_vectors():
    X = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    Y = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])

    assert angular_distance(X, Y) == pytest.approx((0.0 + 0.5 + 0.0 + 0.0) / 4)


def test_angular_distance_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape \(n_examples, d\), got \(5, 2\) and \(5, 3\)"):
        angular_distance(np.ones((5, 2)), np.ones((5, 3)))


def test_consecutive_angular_distance_matches_pairs():
    rng = np.random.default_rng(10)
    features = rng.normal(size=(5, 8, 3))  # (n_layers, n_examples, d)

    distances = consecutive_angular_distance(features)

    assert distances.shape == (4,)
    for layer in range(4):
        assert distances[layer] == pytest.approx(angular_distance(features[layer], features[layer + 1]))
    assert np.all((distances >= 0.0) & (distances <= 1.0))


def test_consecutive_angular_distance_rejects_single_layer():
    with pytest.raises(ValueError, match="needs at least 2 layers, got 1"):
        consecutive_angular_distance(np.ones((1, 5, 2)))
