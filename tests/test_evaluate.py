"""Held-out preference metrics, bootstrap intervals and the alignment tax on tiny models."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from analysis.bootstrap import Interval, mean_interval, paired_difference_interval, perplexity_intervals
from analysis.evaluate import EvalData, EvalSettings, base_metrics, evaluate_runs, group_name, pair_values, tax_rows
from analysis.runs import load_run
from analysis.scores import score_model
from probe.models import load_model
from probe.scoring import PairScores
from tests.analysis_runs import make_run

os.environ["HF_HUB_OFFLINE"] = "1"

FAST = EvalSettings(batch_size=8, max_length=64, resamples=200, progress=False)


def small_data(n_pairs: int = 4) -> EvalData:
    pairs = {
        capability: [
            {"prompt": f"{capability} question {i}: ", "chosen": "aaaa", "rejected": "bbbb", "id": f"{capability}-{i}"}
            for i in range(n_pairs)
        ]
        for capability in ("syntax", "logic", "facts")
    }
    return EvalData(pairs, ["the cat sat on the mat.", "a short plain passage of text."])


def chosen_preferring_gpt2():
    """A tiny GPT-2 whose next-token distribution is constant and puts most mass on byte 'a'.

    With the final layer norm's weight at zero, its output is its bias whatever
    the input, so the logits are wte @ bias. The row of 'a' is made the one
    most aligned with the bias, so 'a' is the most likely token everywhere.
    """
    loaded = load_model("tiny-gpt2")
    model = loaded.model
    a_id = loaded.tokenizer.convert_tokens_to_ids("a")
    with torch.no_grad():
        direction = torch.zeros(model.config.n_embd)
        direction[0] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[a_id] = 20.0 * direction
    return loaded


def test_preferring_model_scores_one():
    loaded = chosen_preferring_gpt2()
    scores = score_model(loaded.model, loaded.tokenizer, small_data(), FAST)
    metrics = base_metrics(scores, FAST)

    for capability, entry in metrics["capabilities"].items():
        assert entry["n"] == 4, capability
        assert entry["accuracy"] == {"estimate": 1.0, "low": 1.0, "high": 1.0, "level": 0.95}
        assert entry["accuracy_normalized"]["estimate"] == 1.0
    assert metrics["perplexity"]["estimate"] > 1.0


def test_reversed_pairs_score_zero():
    loaded = chosen_preferring_gpt2()
    data = small_data()
    for pairs in data.pairs.values():
        for pair in pairs:
            pair["chosen"], pair["rejected"] = pair["rejected"], pair["chosen"]
    metrics = base_metrics(score_model(loaded.model, loaded.tokenizer, data, FAST), FAST)

    for entry in metrics["capabilities"].values():
        assert entry["accuracy"]["estimate"] == 0.0
        assert entry["accuracy_normalized"]["estimate"] == 0.0


def test_margin_uses_reference_and_beta():
    policy = PairScores(np.array([-1.0, -2.0]), np.array([-3.0, -1.0]), np.array([1, 1]), np.array([1, 1]))
    reference = PairScores(np.array([-2.0, -2.0]), np.array([-2.0, -2.0]), np.array([1, 1]), np.array([1, 1]))
    values = pair_values(policy, reference, beta=0.5)

    # 0.5 * ((-1 + 2) - (-3 + 2)) = 1.0 and 0.5 * ((-2 + 2) - (-1 + 2)) = -0.5
    np.testing.assert_allclose(values["margin"], [1.0, -0.5])
    np.testing.assert_array_equal(values["accuracy"], [1.0, 0.0])


def test_normalized_accuracy_divides_by_tokens():
    scores = PairScores(np.array([-6.0]), np.array([-4.0]), np.array([6]), np.array([2]))
    values = pair_values(scores, scores, beta=0.1)

    assert values["accuracy"][0] == 0.0
    assert values["accuracy_normalized"][0] == 1.0


@pytest.mark.parametrize("n_items", [1, 3, 50])
def test_intervals_contain_estimate(n_items):
    rng = np.random.default_rng(n_items)
    values = rng.integers(0, 2, size=(3, n_items)).astype(float)
    reference = rng.integers(0, 2, size=n_items).astype(float)
    logp = -rng.uniform(1, 5, size=(3, n_items))
    tokens = rng.integers(1, 4, size=n_items)

    intervals = [
        mean_interval(values, resamples=300),
        mean_interval(values[0], resamples=300),
        paired_difference_interval(values, reference, resamples=300),
        *(i for i in perplexity_intervals(logp, tokens, logp[0], resamples=300)),
    ]
    for interval in intervals:
        assert interval.low <= interval.estimate <= interval.high, interval


def test_pooled_mean_over_seeds():
    values = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    interval = mean_interval(values, resamples=500)

    assert interval.estimate == 0.5
    assert interval.low == 0.0  # both seeds drawn as the failing one
    assert interval.high == 1.0


def test_paired_difference_of_same_values_is_zero():
    values = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    interval = paired_difference_interval(values, values, resamples=300)

    assert interval == Interval(0.0, 0.0, 0.0)


def test_mismatched_reference_rejected():
    with pytest.raises(ValueError, match="reference must have shape"):
        paired_difference_interval(np.ones((2, 4)), np.ones(3))


def test_tax_flags_significant_drop_only():
    group = {
        "target_capabilities": ["syntax"],
        "capabilities": {
            "syntax": {"accuracy_change": Interval(0.2, 0.1, 0.3).to_dict()},
            "logic": {"accuracy_change": Interval(-0.2, -0.3, -0.1).to_dict()},
            "facts": {"accuracy_change": Interval(-0.1, -0.3, 0.1).to_dict()},
        },
        "perplexity_change": Interval(1.5, 0.5, 2.5).to_dict(),
    }
    rows = {row["measure"]: row for row in tax_rows({"local": group}, "accuracy")}

    assert rows["syntax"]["target"] is True
    assert rows["syntax"]["tax"] is False
    assert rows["logic"]["tax"] is True
    assert rows["facts"]["tax"] is False
    assert rows["general (perplexity)"]["tax"] is True


def test_group_name_strips_seed_suffix():
    assert group_name("local-seed2") == "local"
    assert group_name("global_s0") == "global"
    assert group_name("intermediate") == "intermediate"
    assert group_name("seed3") == "seed3"


def test_zero_adapter_matches_base(tmp_path):
    runs = [
        load_run(make_run(tmp_path / "runs", f"local-seed{seed}", seed=seed, set_b=lambda name, weight: weight.zero_()))
        for seed in (0, 1)
    ]
    result = evaluate_runs(runs, small_data(3), settings=FAST, cache_dir=tmp_path / "cache")

    group = result["groups"]["local"]
    assert group["runs"] == ["local-seed0", "local-seed1"]
    assert group["target_capabilities"] == ["syntax"]
    for capability, entry in group["capabilities"].items():
        base_accuracy = result["base"]["capabilities"][capability]["accuracy"]["estimate"]
        assert entry["accuracy"]["estimate"] == base_accuracy
        assert entry["accuracy_change"] == {"estimate": 0.0, "low": 0.0, "high": 0.0, "level": 0.95}
        assert entry["margin"]["estimate"] == 0.0
    assert group["perplexity"]["estimate"] == pytest.approx(result["base"]["perplexity"]["estimate"], rel=1e-12)
    assert not any(row["tax"] for row in result["tax"])
    assert len(list((tmp_path / "cache").glob("base-*.json"))) == 1


def test_base_scores_cached_and_reused(tmp_path):
    runs = [load_run(make_run(tmp_path / "runs", "local"))]
    cache = tmp_path / "cache"
    first = evaluate_runs(runs, small_data(2), settings=FAST, cache_dir=cache)
    cached = sorted(path.name for path in cache.iterdir())
    second = evaluate_runs(runs, small_data(2), settings=FAST, cache_dir=cache)

    assert [name.split("-")[0] for name in cached] == ["base", "run"]
    assert sorted(path.name for path in cache.iterdir()) == cached
    assert first == second


def test_runs_of_different_models_rejected(tmp_path):
    runs = [load_run(make_run(tmp_path, "a")), load_run(make_run(tmp_path, "b", model="tiny-gpt2"))]
    with pytest.raises(ValueError, match="share one base model"):
        evaluate_runs(runs, small_data(1), settings=FAST)
