"""Representation similarity between layers: debiased linear CKA and angular distance.

All functions take plain numpy arrays of pooled per-example hidden states, so
they can be checked against naive reference implementations in tests.

Debiased linear CKA replaces the biased HSIC estimator of ordinary CKA by the
unbiased estimator of Song et al. (2012), "Feature Selection via Dependence
Maximization", JMLR 13. With that estimator the CKA of two independent
representations is close to 0 even when n_examples is small compared with
the feature dimension, where ordinary CKA is biased towards 1.

The unbiased HSIC of kernel matrices K and L equals the scaled Frobenius
inner product of their U-centred versions (Szekely and Rizzo, 2014, "Partial
distance correlation with methods for dissimilarities", Ann. Statist. 42).
This module builds each layer's U-centred Gram matrix once and then gets
every pairwise HSIC as one O(n^2) inner product.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MIN_EXAMPLES = 4
"""Smallest n_examples for which the unbiased HSIC estimator is defined."""

_DEGENERATE_RTOL = 1e-10
"""A U-centred Gram matrix whose Frobenius norm is below this fraction of the
Gram matrix's norm is treated as zero (a representation with no variance)."""

_PROGRESS_MIN_LAYERS = 16
"""cka_matrix shows a progress bar from this many layers on."""


def _as_example_matrix(X: np.ndarray, name: str) -> np.ndarray:
    """Convert one representation to a finite float64 matrix of shape (n_examples, d)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(
            f"`{name}` must be a 2-D array of shape (n_examples, d), got shape {X.shape}; "
            "pool token positions first."
        )
    if X.shape[0] < MIN_EXAMPLES:
        raise ValueError(
            f"debiased CKA needs at least {MIN_EXAMPLES} examples, got {X.shape[0]} "
            f"in `{name}`; pass more examples."
        )
    if not np.all(np.isfinite(X)):
        raise ValueError(f"`{name}` contains NaN or infinite values; check the activations.")
    return X


def _u_centred_gram(X: np.ndarray) -> tuple[np.ndarray, bool]:
    """Build the U-centred linear Gram matrix of X.

    Args:
        X: Representation of shape (n_examples, d), float64.

    Returns:
        The U-centred Gram matrix of shape (n_examples, n_examples) with a zero
        diagonal, and whether it is degenerate (numerically zero, for example
        because every example has the same representation).
    """
    n = X.shape[0]
    gram = X @ X.T  # (n, n)
    np.fill_diagonal(gram, 0.0)

    row_sums = gram.sum(axis=1)  # (n,)
    total = row_sums.sum()
    centred = (
        gram
        - row_sums[:, None] / (n - 2)
        - row_sums[None, :] / (n - 2)
        + total / ((n - 1) * (n - 2))
    )
    np.fill_diagonal(centred, 0.0)

    degenerate = bool(np.linalg.norm(centred) <= _DEGENERATE_RTOL * np.linalg.norm(gram))
    return centred, degenerate


def _cka_from_hsic(hsic_xy: float, hsic_xx: float, hsic_yy: float) -> float:
    """Normalise a cross HSIC by the two self HSICs, clipped to [-1, 1] against rounding."""
    value = hsic_xy / np.sqrt(hsic_xx * hsic_yy)
    return float(np.clip(value, -1.0, 1.0))


def debiased_linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Compute debiased linear CKA between two representations of the same examples.

    The value is unbiased HSIC(K, L) / sqrt(HSIC(K, K) * HSIC(L, L)) with linear
    kernels K = X X^T and L = Y Y^T, computed in float64. It is invariant to
    orthogonal transforms and isotropic scaling of either input, lies in
    [-1, 1], and is about 0 for independent representations. Small negative
    values are possible and mean "no shared linear structure".

    Args:
        X: Representation of shape (n_examples, d1). Row i is example i.
        Y: Representation of shape (n_examples, d2), same examples in the same
            order as X.

    Returns:
        The debiased CKA (unitless). When X or Y is degenerate (every example
        has the same representation, so its centred Gram matrix is zero) the
        ratio is 0/0, and this function returns 0.0 instead of NaN.

    Raises:
        ValueError: If an input is not 2-D, has fewer than 4 examples, contains
            NaN or infinity, or the example counts of X and Y differ.
    """
    X = _as_example_matrix(X, "X")
    Y = _as_example_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"`X` and `Y` must have the same number of examples, got {X.shape[0]} and "
            f"{Y.shape[0]}; pass representations of the same examples."
        )

    centred_x, degenerate_x = _u_centred_gram(X)
    centred_y, degenerate_y = _u_centred_gram(Y)
    if degenerate_x or degenerate_y:
        return 0.0

    # The common factor 1 / (n (n - 3)) of the three HSIC values cancels.
    return _cka_from_hsic(
        np.vdot(centred_x, centred_y),
        np.vdot(centred_x, centred_x),
        np.vdot(centred_y, centred_y),
    )


def _as_layer_list(features: Sequence[np.ndarray] | np.ndarray, name: str) -> list[np.ndarray]:
    """Check per-layer features and return them as a list of (n_examples, d_l) float64 matrices."""
    layers = [_as_example_matrix(layer, f"{name}[{i}]") for i, layer in enumerate(features)]
    if not layers:
        raise ValueError(f"`{name}` must contain at least one layer, got none.")

    counts = {layer.shape[0] for layer in layers}
    if len(counts) != 1:
        raise ValueError(
            f"every layer in `{name}` must have the same number of examples, got counts "
            f"{sorted(counts)}; pool the same examples for every layer."
        )
    return layers


def cka_matrix(features: Sequence[np.ndarray] | np.ndarray, *, progress: bool = True) -> np.ndarray:
    """Compute debiased linear CKA between every pair of layers.

    Each layer's U-centred Gram matrix is built once (n_layers Gram builds),
    then every pair costs one O(n_examples^2) inner product.

    Args:
        features: Per-layer representations of the same examples, an array of
            shape (n_layers, n_examples, d) or a sequence of n_layers arrays of
            shape (n_examples, d_l). Widths d_l may differ between layers.
        progress: Show progress bars when there are at least 16 layers.

    Returns:
        Symmetric matrix of shape (n_layers, n_layers), float64, unitless, with
        entries in [-1, 1] and a diagonal of exactly 1. Entries in the row and
        column of a degenerate layer (one representation for every example)
        are 0 off the diagonal, as in `debiased_linear_cka`.

    Raises:
        ValueError: As `debiased_linear_cka`, for any layer, or if layers have
            different example counts.
    """
    # NOTE: all n_layers float64 matrices of n_examples^2 entries stay in memory
    # at once, about 3.8 GB for 30 layers and 4,000 examples.
    layers = _as_layer_list(features, "features")
    n_layers = len(layers)

    progress = tqdm(
        layers, desc="CKA: centred Gram matrices", unit="layer",
        disable=not progress or n_layers < _PROGRESS_MIN_LAYERS,
    )
    centred, degenerate = zip(*(_u_centred_gram(layer) for layer in progress))

    self_hsic = np.array([np.vdot(c, c) for c in centred])  # (n_layers,)
    result = np.eye(n_layers)
    pairs = tqdm(
        range(n_layers), desc="CKA: layer pairs", unit="row",
        disable=not progress or n_layers < _PROGRESS_MIN_LAYERS,
    )
    for i in pairs:
        for j in range(i + 1, n_layers):
            if degenerate[i] or degenerate[j]:
                value = 0.0
            else:
                value = _cka_from_hsic(np.vdot(centred[i], centred[j]), self_hsic[i], self_hsic[j])
            result[i, j] = result[j, i] = value
    return result


def _pair_angular_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Average arccos(cosine) / pi over the rows of two float64 matrices of equal shape."""
    dot = np.einsum("nd,nd->n", X, Y)  # (n_examples,)
    norm_x = np.linalg.norm(X, axis=1)
    norm_y = np.linalg.norm(Y, axis=1)

    both_zero = (norm_x == 0.0) & (norm_y == 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(norm_x * norm_y > 0.0, dot / (norm_x * norm_y), 0.0)
    cosine = np.where(both_zero, 1.0, np.clip(cosine, -1.0, 1.0))
    return float(np.mean(np.arccos(cosine)) / np.pi)


def _check_same_shape(X: np.ndarray, Y: np.ndarray, x_name: str, y_name: str) -> None:
    """Raise a ValueError unless two representations have the same shape."""
    if X.shape != Y.shape:
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have the same shape (n_examples, d), got "
            f"{X.shape} and {Y.shape}; angular distance compares vectors of the same space."
        )


def angular_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Compute the mean angular distance between paired rows of two representations.

    For each example i the distance is arccos(cos(X[i], Y[i])) / pi, where cos
    is the cosine similarity. The result is its mean over examples.

    Args:
        X: Representation of shape (n_examples, d).
        Y: Representation of shape (n_examples, d), same examples in the same
            order and the same space as X (for example the residual stream
            after two layers).

    Returns:
        Mean angular distance in units of pi radians, in [0, 1]: 0 for parallel
        vectors, 0.5 for orthogonal ones, 1 for opposite ones. A zero vector
        paired with a non-zero one counts as orthogonal (0.5); two zero vectors
        count as identical (0).

    Raises:
        ValueError: If an input is not 2-D, has fewer than 4 examples, contains
            NaN or infinity, or the two shapes differ.
    """
    X = _as_example_matrix(X, "X")
    Y = _as_example_matrix(Y, "Y")
    _check_same_shape(X, Y, "X", "Y")
    return _pair_angular_distance(X, Y)


def consecutive_angular_distance(features: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Compute the angular distance between each layer's output and the next layer's.

    A small distance means layer l + 1 changed its input little. Scores of
    this kind ("block influence") are used to rank layers for removal.

    Args:
        features: Per-layer representations of the same examples, an array of
            shape (n_layers, n_examples, d) or a sequence of arrays of shape
            (n_examples, d). n_layers must be at least 2.

    Returns:
        Array of shape (n_layers - 1,), float64, in units of pi radians in
        [0, 1]. Entry l is `angular_distance(features[l], features[l + 1])`.

    Raises:
        ValueError: As `angular_distance`, or if there are fewer than 2 layers.
    """
    layers = _as_layer_list(features, "features")
    if len(layers) < 2:
        raise ValueError(
            f"consecutive angular distance needs at least 2 layers, got {len(layers)}."
        )

    distances = np.empty(len(layers) - 1)
    for layer in range(len(layers) - 1):
        _check_same_shape(
            layers[layer], layers[layer + 1], f"features[{layer}]", f"features[{layer + 1}]"
        )
        distances[layer] = _pair_angular_distance(layers[layer], layers[layer + 1])
    return distances
