"""Tests for probe.probes: per-layer linear probes with a shuffled-label control."""

import numpy as np
import pytest

from probe.probes import LinearProbeSuite, wilson_interval

N_EXAMPLES = 120


def make_layers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three layers of shape (n_examples, 6): label encoded linearly, pure noise, weakly encoded."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], N_EXAMPLES // 2)
    rng.shuffle(labels)
    signs = 2.0 * labels - 1.0

    encoded = rng.normal(size=(N_EXAMPLES, 6))
    encoded[:, 0] += 4.0 * signs
    noise = rng.normal(size=(N_EXAMPLES, 6))
    weak = rng.normal(size=(N_EXAMPLES, 6))
    weak[:, 3] += 0.8 * signs

    features = np.stack([encoded, noise, weak])  # (n_layers, n_examples, d)
    return features, labels


@pytest.fixture(scope="module")
def fitted():
    features, labels = make_layers()
    return LinearProbeSuite(n_splits=5, random_state=0).fit(features, labels)


def test_probe_encoded_layer_near_perfect(fitted):
    assert fitted.accuracy_[0] >= 0.95
    assert fitted.selectivity_[0] >= 0.3


def test_probe_noise_layer_near_chance(fitted):
    assert abs(fitted.accuracy_[1] - 0.5) <= 0.15
    assert abs(fitted.selectivity_[1]) <= 0.25


def test_probe_weak_layer_between(fitted):
    assert fitted.accuracy_[1] < fitted.accuracy_[2] < fitted.accuracy_[0]


def test_probe_control_near_chance(fitted):
    assert np.all(np.abs(fitted.control_accuracy_ - 0.5) <= 0.15)


def test_probe_attribute_shapes(fitted):
    assert fitted.n_layers_ == 3
    assert fitted.accuracy_.shape == (3,)
    assert fitted.accuracy_ci_.shape == (3, 2)
    assert fitted.control_accuracy_.shape == (3,)
    assert fitted.control_accuracy_ci_.shape == (3, 2)
    np.testing.assert_array_equal(fitted.classes_, [0, 1])


def test_probe_selectivity_is_difference(fitted):
    np.testing.assert_allclose(fitted.selectivity_, fitted.accuracy_ - fitted.control_accuracy_)


def test_probe_interval_contains_estimate(fitted):
    lower, upper = fitted.accuracy_ci_.T
    assert np.all(lower <= fitted.accuracy_)
    assert np.all(fitted.accuracy_ <= upper)
    assert np.all((lower >= 0.0) & (upper <= 1.0))
    control_lower, control_upper = fitted.control_accuracy_ci_.T
    assert np.all(control_lower <= fitted.control_accuracy_)
    assert np.all(fitted.control_accuracy_ <= control_upper)


def test_probe_deterministic_with_seed():
    features, labels = make_layers(seed=1)

    first = LinearProbeSuite(random_state=3).fit(features, labels)
    second = LinearProbeSuite(random_state=3).fit(features, labels)

    np.testing.assert_array_equal(first.accuracy_, second.accuracy_)
    np.testing.assert_array_equal(first.control_accuracy_, second.control_accuracy_)


def test_probe_parallel_matches_serial():
    features, labels = make_layers(seed=2)

    serial = LinearProbeSuite(random_state=0, n_jobs=1).fit(features, labels)
    parallel = LinearProbeSuite(random_state=0, n_jobs=2).fit(features, labels)

    np.testing.assert_array_equal(serial.accuracy_, parallel.accuracy_)
    np.testing.assert_array_equal(serial.control_accuracy_, parallel.control_accuracy_)


def test_probe_accepts_layers_of_different_width():
    features, labels = make_layers()
    layers = [features[0], features[1][:, :2]]

    suite = LinearProbeSuite(random_state=0).fit(layers, labels)

    assert suite.accuracy_.shape == (2,)


def test_probe_fit_returns_self():
    features, labels = make_layers()
    suite = LinearProbeSuite(random_state=0)

    assert suite.fit(features, labels) is suite


def test_probe_constructor_keyword_only():
    with pytest.raises(TypeError):
        LinearProbeSuite(5)


def test_probe_rejects_too_few_per_class():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(2, 13, 3))
    labels = np.array([0] * 10 + [1] * 3)

    message = (
        r"stratified 5-fold cross-validation needs at least 5 examples per class, "
        r"got class counts \{0: 10, 1: 3\}; add examples of the rare class or lower `n_splits`\."
    )
    with pytest.raises(ValueError, match=message):
        LinearProbeSuite(n_splits=5).fit(features, labels)


def test_probe_rejects_single_class():
    with pytest.raises(ValueError, match=r"`labels` must contain at least 2 classes, got only \[1\]"):
        LinearProbeSuite().fit(np.zeros((1, 10, 2)), np.ones(10, dtype=int))


def test_probe_rejects_label_count_mismatch():
    labels = np.array([0, 1] * 10)

    with pytest.raises(ValueError, match=r"`features\[0\]` must have shape \(n_examples, d\) with n_examples=20"):
        LinearProbeSuite().fit(np.zeros((1, 19, 2)), labels)


def test_probe_rejects_one_fold():
    labels = np.array([0, 1] * 10)

    with pytest.raises(ValueError, match=r"`n_splits` must be at least 2, got 1\."):
        LinearProbeSuite(n_splits=1).fit(np.zeros((1, 20, 2)), labels)


def test_wilson_interval_known_value():
    # 8 of 10 correct: the 95% Wilson interval is about (0.490, 0.943).
    lower, upper = wilson_interval(8, 10)

    assert lower == pytest.approx(0.4902, abs=1e-4)
    assert upper == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_extremes_stay_in_range():
    assert wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(20, 20)[0] < 1.0


def test_wilson_interval_rejects_invalid_counts():
    with pytest.raises(ValueError, match="got n_correct=11, n_total=10"):
        wilson_interval(11, 10)


def _paired_noise(n_pairs: int = 60, d: int = 20, seed: int = 0):
    """Pairs of near-identical vectors with opposite labels and no label signal."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n_pairs, d))
    features = np.repeat(shared, 2, axis=0) + 0.01 * rng.normal(size=(2 * n_pairs, d))
    labels = np.tile([1, 0], n_pairs)
    pair_ids = np.repeat(np.arange(n_pairs), 2)
    return features[None], labels, pair_ids


def test_probe_groups_keep_pairs_in_one_fold():
    features, labels, pair_ids = _paired_noise()
    ungrouped = LinearProbeSuite(random_state=0).fit(features, labels)
    grouped = LinearProbeSuite(random_state=0).fit(features, labels, groups=pair_ids)
    # Split across folds, a pair's twin with the opposite label drags accuracy below chance.
    assert ungrouped.accuracy_[0] < 0.35
    assert 0.35 <= grouped.accuracy_[0] <= 0.65


def test_probe_groups_shape_and_count_checked():
    features, labels, pair_ids = _paired_noise(n_pairs=6)
    with pytest.raises(ValueError, match=r"`groups` must have shape \(12,\) to match `labels`, got shape \(11,\)"):
        LinearProbeSuite().fit(features, labels, groups=pair_ids[:11])
    with pytest.raises(ValueError, match=r"needs at least 5 groups, got 3"):
        LinearProbeSuite().fit(features, labels, groups=pair_ids // 2)
