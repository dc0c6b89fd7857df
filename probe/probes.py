"""Per-layer linear probes with a shuffled-label control baseline.

A probe is a standardised logistic regression trained to read a label (for
example "is this sentence grammatical") from one layer's pooled hidden
states. Its cross-validated accuracy measures how linearly decodable the label is
at that layer. The same procedure on shuffled labels gives the control
accuracy, what a probe reaches without real signal. Selectivity, accuracy
minus control accuracy, is the quantity to compare across layers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

_Z_95 = 1.959963984540054
"""Two-sided 95% quantile of the standard normal distribution."""


def wilson_interval(n_correct: int, n_total: int, z: float = _Z_95) -> tuple[float, float]:
    """Compute the Wilson score interval for a binomial proportion.

    Args:
        n_correct: Number of successes, 0 <= n_correct <= n_total.
        n_total: Number of trials, at least 1.
        z: Standard normal quantile; the default gives a 95% interval.

    Returns:
        Lower and upper bound, both in [0, 1].

    Raises:
        ValueError: If the counts are outside 0 <= n_correct <= n_total, n_total >= 1.
    """
    if n_total < 1 or not 0 <= n_correct <= n_total:
        raise ValueError(
            f"counts must satisfy 0 <= n_correct <= n_total and n_total >= 1, got "
            f"n_correct={n_correct}, n_total={n_total}."
        )
    p = n_correct / n_total
    denominator = 1.0 + z**2 / n_total
    centre = (p + z**2 / (2 * n_total)) / denominator
    half_width = z * np.sqrt(p * (1 - p) / n_total + z**2 / (4 * n_total**2)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def _count_out_of_fold_correct(
    pipeline: Pipeline, features: np.ndarray, labels: np.ndarray, folds, groups: np.ndarray | None = None
) -> int:
    """Count the correct out-of-fold predictions of pipeline, pooled over all folds."""
    predictions = cross_val_predict(pipeline, features, labels, cv=folds, groups=groups)
    return int(np.sum(predictions == labels))


class LinearProbeSuite(BaseEstimator):
    """Cross-validated logistic-regression probes on every layer, with a control baseline.

    For each layer a pipeline of StandardScaler and LogisticRegression is
    evaluated by stratified k-fold cross-validation. Accuracy is pooled over
    the out-of-fold predictions of all folds, so every example is predicted
    exactly once, by a probe that did not train on it. The 95% interval is
    the Wilson score interval of that pooled accuracy; it treats the
    n_examples predictions as independent trials and ignores the variation
    between fold models.

    The control repeats the procedure with one random permutation of the
    labels, shared by all layers. Its accuracy estimates what the probe
    reaches by fitting noise, about chance level.

    Args:
        n_splits: Number of cross-validation folds, at least 2.
        C: Inverse L2 regularisation strength of LogisticRegression.
        max_iter: Iteration limit of the LogisticRegression solver.
        random_state: Seed for fold assignment and the label permutation.
            None gives different folds and permutation on every fit.
        n_jobs: Number of layers probed in parallel (joblib convention: None
            is 1, -1 is all cores).

    Attributes:
        n_layers_: Number of layers probed.
        classes_: Sorted class labels, shape (n_classes,).
        accuracy_: Out-of-fold accuracy per layer, shape (n_layers,), in [0, 1].
        accuracy_ci_: Wilson 95% interval of accuracy_, shape (n_layers, 2).
        control_accuracy_: Out-of-fold accuracy on shuffled labels, shape
            (n_layers,).
        control_accuracy_ci_: Wilson 95% interval of control_accuracy_, shape
            (n_layers, 2).
        selectivity_: accuracy_ - control_accuracy_, shape (n_layers,), in
            [-1, 1].
    """

    def __init__(
        self,
        *,
        n_splits: int = 5,
        C: float = 1.0,
        max_iter: int = 1000,
        random_state: int | None = None,
        n_jobs: int | None = None,
    ) -> None:
        self.n_splits = n_splits
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _make_pipeline(self) -> Pipeline:
        """Build a fresh scaler + logistic regression pipeline."""
        return make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))

    def _check_labels(self, labels: np.ndarray) -> np.ndarray:
        """Check that every class has enough examples for stratified cross-validation."""
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"`labels` must have shape (n_examples,), got shape {labels.shape}.")
        if self.n_splits < 2:
            raise ValueError(f"`n_splits` must be at least 2, got {self.n_splits}.")

        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                f"`labels` must contain at least 2 classes, got only {classes.tolist()}; "
                "a probe needs examples of at least two classes."
            )
        if counts.min() < self.n_splits:
            class_counts = dict(zip(classes.tolist(), counts.tolist()))
            raise ValueError(
                f"stratified {self.n_splits}-fold cross-validation needs at least "
                f"{self.n_splits} examples per class, got class counts {class_counts}; "
                "add examples of the rare class or lower `n_splits`."
            )
        return labels

    def _check_features(
        self, features: Sequence[np.ndarray] | np.ndarray, n_examples: int
    ) -> list[np.ndarray]:
        """Check per-layer features and return a list of (n_examples, d_l) float64 arrays."""
        layers = [np.asarray(layer, dtype=np.float64) for layer in features]
        if not layers:
            raise ValueError("`features` must contain at least one layer, got none.")
        for index, layer in enumerate(layers):
            if layer.ndim != 2 or layer.shape[0] != n_examples:
                raise ValueError(
                    f"`features[{index}]` must have shape (n_examples, d) with n_examples="
                    f"{n_examples} to match `labels`, got shape {layer.shape}."
                )
            if not np.all(np.isfinite(layer)):
                raise ValueError(
                    f"`features[{index}]` contains NaN or infinite values; check the activations."
                )
        return layers

    def _check_groups(self, groups: np.ndarray | None, n_examples: int) -> np.ndarray | None:
        """Check that groups, if given, match the examples and allow n_splits folds."""
        if groups is None:
            return None
        groups = np.asarray(groups)
        if groups.shape != (n_examples,):
            raise ValueError(f"`groups` must have shape ({n_examples},) to match `labels`, got shape {groups.shape}.")
        n_groups = len(np.unique(groups))
        if n_groups < self.n_splits:
            raise ValueError(
                f"group cross-validation with {self.n_splits} folds needs at least {self.n_splits} groups, "
                f"got {n_groups}; add examples or lower `n_splits`."
            )
        return groups

    def _probe_layer(
        self, features: np.ndarray, labels: np.ndarray, shuffled: np.ndarray, folds, groups: np.ndarray | None
    ) -> tuple[int, int]:
        """Return the numbers of correct out-of-fold predictions on true and on shuffled labels."""
        n_correct = _count_out_of_fold_correct(self._make_pipeline(), features, labels, folds, groups)
        n_control = _count_out_of_fold_correct(self._make_pipeline(), features, shuffled, folds, groups)
        return n_correct, n_control

    def fit(
        self, features: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
    ) -> LinearProbeSuite:
        """Probe every layer and its shuffled-label control.

        Args:
            features: Pooled hidden states, shape (n_layers, n_examples, d), or
                a sequence of n_layers arrays of shape (n_examples, d_l).
            labels: Class labels of shape (n_examples,), two or more classes,
                each with at least n_splits examples.
            groups: Optional group ids of shape (n_examples,). Examples of one
                group always land in the same fold (StratifiedGroupKFold). Pass
                the pair id when the good and the corrupted text of a pair are
                both examples: split across folds, their near-identical features
                with opposite labels push accuracy below chance.

        Returns:
            self, with the fitted attributes set.

        Raises:
            ValueError: If shapes disagree, features are not finite, there is
                only one class, or a class has fewer than n_splits examples.
        """
        labels = self._check_labels(labels)
        layers = self._check_features(features, len(labels))
        groups = self._check_groups(groups, len(labels))

        rng = np.random.default_rng(self.random_state)
        shuffled = rng.permutation(labels)
        fold_seed = int(rng.integers(2**31 - 1))
        splitter = StratifiedKFold if groups is None else StratifiedGroupKFold
        folds = splitter(n_splits=self.n_splits, shuffle=True, random_state=fold_seed)

        logger.info("probing %d layers with %d-fold cross-validation", len(layers), self.n_splits)
        results = Parallel(n_jobs=self.n_jobs)(
            delayed(self._probe_layer)(layer, labels, shuffled, folds, groups) for layer in layers
        )
        self._set_results(np.array(results), len(labels))
        self.classes_ = np.unique(labels)
        return self

    def _set_results(self, counts: np.ndarray, n_examples: int) -> None:
        """Turn correct-prediction counts of shape (n_layers, 2) into the fitted attributes."""
        self.n_layers_ = counts.shape[0]
        self.accuracy_ = counts[:, 0] / n_examples
        self.control_accuracy_ = counts[:, 1] / n_examples
        self.accuracy_ci_ = np.array([wilson_interval(c, n_examples) for c in counts[:, 0]])
        self.control_accuracy_ci_ = np.array([wilson_interval(c, n_examples) for c in counts[:, 1]])
        self.selectivity_ = self.accuracy_ - self.control_accuracy_
