"""Statistics of judge scores: paired bootstrap deltas and two-order pairwise outcomes."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from analysis.judge_parse import Preference

BOOTSTRAP_RESAMPLES = 2000


def paired_summary(base: dict[str, float], run: dict[str, float], *, seed: int) -> dict:
    """Summarise one dimension over the prompts where both the base and the run answer were scored.

    Returns:
        {"base_mean", "run_mean", "delta", "ci", "n"}: `delta` is run minus base
        and `ci` its 95% percentile interval from a paired bootstrap over
        prompts. The values are None when no prompt has both scores.
    """
    ids = sorted(set(base) & set(run))
    if not ids:
        return {"base_mean": None, "run_mean": None, "delta": None, "ci": [None, None], "n": 0}
    base_scores = np.array([base[i] for i in ids])  # (n,)
    run_scores = np.array([run[i] for i in ids])  # (n,)
    differences = run_scores - base_scores

    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(ids), size=(BOOTSTRAP_RESAMPLES, len(ids)))  # (resamples, n)
    low, high = np.percentile(differences[resamples].mean(axis=1), [2.5, 97.5])
    return {
        "base_mean": float(base_scores.mean()),
        "run_mean": float(run_scores.mean()),
        "delta": float(differences.mean()),
        "ci": [float(low), float(high)],
        "n": len(ids),
    }


def pairwise_outcome(base_first: Preference | None, run_first: Preference | None) -> str | None:
    """Combine the verdicts of both orders into "win", "loss", "tie" or "inconsistent" for the run.

    Args:
        base_first: Verdict with the base answer as A and the run answer as B.
        run_first: Verdict with the run answer as A and the base answer as B.

    Returns:
        None when either verdict is missing.
    """
    if base_first is None or run_first is None:
        return None
    first = {"A": "loss", "B": "win", "tie": "tie"}[base_first]
    second = {"A": "win", "B": "loss", "tie": "tie"}[run_first]
    return first if first == second else "inconsistent"


def pairwise_summary(outcomes: Sequence[str | None]) -> dict:
    """Count outcomes; an inconsistent pair counts as a tie and adds to `inconsistent_rate`."""
    judged = [outcome for outcome in outcomes if outcome is not None]
    inconsistent = judged.count("inconsistent")
    return {
        "win": judged.count("win"),
        "loss": judged.count("loss"),
        "tie": judged.count("tie") + inconsistent,
        "inconsistent": inconsistent,
        "inconsistent_rate": inconsistent / len(judged) if judged else None,
        "n": len(judged),
    }
