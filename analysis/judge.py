"""LLM-as-judge scoring of base and aligned answers, over an OpenAI-compatible API or a local model.

Every answer gets a 1-10 score with a short rationale on fluency, logical
coherence and factual consistency. With `pairwise=True` the judge also
compares the base and run answers to each prompt in both orders, and a
preference counts only when both orders agree.

Example, with a vLLM, llama.cpp or Ollama server on this machine:

    judge_runs([Path("runs/global")], base_model="smollm2",
               judge_url="http://127.0.0.1:8000/v1", judge_model="qwen2.5-7b-instruct",
               out_dir=Path("reports/global"))

This module runs the pipeline and re-exports the public names of its parts:
`analysis.judge_client` (HTTP and local judges), `analysis.judge_parse`
(prompts and reply parsing), `analysis.judge_stats` (bootstrap and pairwise
counts) and `analysis.judge_options` (command-line flags).
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from analysis.generate import (
    GenerationCache,
    GenerationSettings,
    base_generator,
    cached_answers,
    load_heldout_prompts,
    load_runs,
    run_generator,
)
from analysis.judge_client import (
    DEFAULT_BACKOFF_S,
    JUDGE_MAX_TOKENS,
    MAX_RETRY_AFTER_S,
    HttpJudge,
    Judge,
    JudgeRequest,
    JudgeRequestError,
    JudgeResponseError,
    LocalJudge,
    completion_text,
    redact_url,
    status_hint,
)
from analysis.judge_options import DEFAULT_API_KEY_ENV, add_judge_arguments, judge_options_from_args
from analysis.judge_parse import (
    DIMENSIONS,
    PAIRWISE_INSTRUCTIONS,
    SCORE_INSTRUCTIONS,
    Preference,
    pairwise_messages,
    parse_preference,
    parse_scores,
    score_messages,
)
from analysis.judge_stats import BOOTSTRAP_RESAMPLES, paired_summary, pairwise_outcome, pairwise_summary
from analysis.runs import RunInfo
from probe.io import write_json_atomic, write_text_atomic

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "DEFAULT_API_KEY_ENV",
    "DEFAULT_BACKOFF_S",
    "DIMENSIONS",
    "JUDGE_MAX_TOKENS",
    "MAX_RETRY_AFTER_S",
    "PAIRWISE_INSTRUCTIONS",
    "SCORE_INSTRUCTIONS",
    "HttpJudge",
    "Judge",
    "JudgeRequest",
    "JudgeRequestError",
    "JudgeResponseError",
    "LocalJudge",
    "Preference",
    "add_judge_arguments",
    "completion_text",
    "judge_markdown",
    "judge_options_from_args",
    "judge_runs",
    "paired_summary",
    "pairwise_messages",
    "pairwise_outcome",
    "pairwise_summary",
    "parse_preference",
    "parse_scores",
    "redact_url",
    "score_messages",
    "status_hint",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Entry point


def judge_runs(
    run_dirs: list[Path],
    *,
    base_model: str,
    judge_url: str | None,
    judge_model: str,
    out_dir: Path,
    api_key_env: str = DEFAULT_API_KEY_ENV,
    n_prompts: int = 20,
    max_new_tokens: int = 64,
    sampling: str = "greedy",
    seed: int = 0,
    timeout_s: float = 60.0,
    max_retries: int = 4,
    concurrency: int = 4,
    pairwise: bool = True,
) -> dict:
    """Generate base and run answers to held-out prompts, have a judge score them, and compare.

    Args:
        run_dirs: Run directories written by `align`; each needs config.json and its adapter.
        base_model: Alias or path of the base model the runs were trained on.
        judge_url: Base URL of an OpenAI-compatible API, or None to run `judge_model` locally.
        judge_model: Model name at the endpoint, or a local alias or path when `judge_url` is None.
        out_dir: Receives judge.json, judgments.jsonl and generations/<model>.jsonl.
        api_key_env: Name of the environment variable that contains the API key. An unset variable sends no key.
        n_prompts: Held-out prompts per capability.
        max_new_tokens: Maximum new tokens per generated answer.
        sampling: "greedy" or "sample" (seeded by `seed`).
        seed: Seed of sampling and of the bootstrap.
        timeout_s: Timeout of one judge HTTP request, in seconds.
        max_retries: Retries per judge request after the first attempt.
        concurrency: Maximum judge requests in flight.
        pairwise: Also compare base and run answers head to head, in both orders.

    Returns:
        The content of judge.json: {"judge", "generation", "base", "runs"}, where
        runs[name] = {"dimensions": {dimension: paired_summary}, "pairwise":
        pairwise_summary or None, "unparseable": int}.

    Raises:
        ValueError: For invalid options or run directories.
        JudgeRequestError: When a judge request fails after its last retry.
    """
    names = validate_options(run_dirs, judge_model, n_prompts, timeout_s, max_retries, concurrency)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)  # type: ignore[arg-type]
    runs = load_runs(run_dirs, base_model)
    out_dir = Path(out_dir)

    prompts = load_heldout_prompts(n_prompts)
    answers = generate_all(prompts, runs, base_model, settings, out_dir)

    requests = build_requests(prompts, answers, names, pairwise)
    judge = build_judge(judge_url, judge_model, api_key_env, timeout_s, max_retries, concurrency)
    try:
        replies = judge.complete_all(requests, desc="judging")
    finally:
        judge.close()

    results = summarise(prompts, names, replies, pairwise, seed)
    results["judge"] = judge_settings(judge_url, judge_model, api_key_env, timeout_s, max_retries, concurrency, pairwise)
    results["generation"] = {**settings.__dict__, "settings_key": settings.key(), "n_prompts": len(prompts)}
    write_outputs(out_dir, results, requests, replies)
    return results


def validate_options(
    run_dirs: Sequence[Path], judge_model: str, n_prompts: int, timeout_s: float, max_retries: int, concurrency: int,
) -> list[str]:
    """Check the options of `judge_runs` and return the run names (directory names)."""
    if not run_dirs:
        raise ValueError("`run_dirs` must name at least one run directory")
    names = [Path(run_dir).name for run_dir in run_dirs]
    if len(set(names)) != len(names) or "base" in names:
        raise ValueError(f"run directory names must be unique and not 'base', got {names}")
    if not judge_model or not judge_model.strip():
        raise ValueError("`judge_model` must not be empty: pass --judge-model NAME")
    checks = [
        ("n_prompts", n_prompts, n_prompts >= 1, "at least 1"),
        ("timeout_s", timeout_s, timeout_s > 0, "positive"),
        ("max_retries", max_retries, max_retries >= 0, "0 or more"),
        ("concurrency", concurrency, concurrency >= 1, "at least 1"),
    ]
    for name, value, valid, rule in checks:
        if not valid:
            raise ValueError(f"`{name}` must be {rule}, got {value}")
    return names


def generate_all(
    prompts: list[dict], runs: Sequence[RunInfo], base_model: str, settings: GenerationSettings, out_dir: Path,
) -> dict[str, list[str]]:
    """Return the answers of the base model and of each run, keyed "base" or run name, from cache or generated."""
    cache_dir = out_dir / "generations"
    base_cache = GenerationCache(cache_dir / "base.jsonl", model_id=base_model, settings=settings)
    answers = {"base": cached_answers(prompts, base_cache, base_generator(base_model, settings), desc="base")}
    for run in runs:
        cache = GenerationCache(cache_dir / f"{run.name}.jsonl", model_id=str(run.path.resolve()), settings=settings)
        answers[run.name] = cached_answers(prompts, cache, run_generator(run, settings), desc=run.name)
        gc.collect()
    return answers


def build_requests(
    prompts: Sequence[dict], answers: dict[str, list[str]], names: Sequence[str], pairwise: bool,
) -> list[JudgeRequest]:
    """Build the score requests of every model and, with `pairwise`, two comparison requests per run and prompt."""
    requests = []
    for label in ("base", *names):
        for prompt, answer in zip(prompts, answers[label]):
            requests.append(JudgeRequest(f"score/{label}/{prompt['id']}", score_messages(prompt["prompt"], answer)))
    if not pairwise:
        return requests
    for name in names:
        for prompt, base_answer, run_answer in zip(prompts, answers["base"], answers[name]):
            text = prompt["prompt"]
            requests.append(JudgeRequest(f"pair/{name}/{prompt['id']}/base-first", pairwise_messages(text, base_answer, run_answer)))
            requests.append(JudgeRequest(f"pair/{name}/{prompt['id']}/run-first", pairwise_messages(text, run_answer, base_answer)))
    return requests


def build_judge(
    judge_url: str | None, judge_model: str, api_key_env: str, timeout_s: float, max_retries: int, concurrency: int,
) -> HttpJudge | LocalJudge:
    if judge_url is None:
        logger.info("judging with the local model %s", judge_model)
        return LocalJudge(judge_model, max_tokens=JUDGE_MAX_TOKENS)

    api_key = os.environ.get(api_key_env)
    if not api_key:
        logger.info("environment variable %s is not set; sending judge requests without an API key", api_key_env)
    logger.info("judging with %s at %s", judge_model, redact_url(judge_url))
    return HttpJudge(
        judge_url, judge_model, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries,
        backoff_s=DEFAULT_BACKOFF_S, concurrency=concurrency, max_tokens=JUDGE_MAX_TOKENS,
    )


def summarise(prompts: Sequence[dict], names: Sequence[str], replies: dict[str, str], pairwise: bool, seed: int) -> dict:
    """Parse every reply and reduce them to per-dimension comparisons and pairwise counts."""
    scores, base_unparseable = parsed_scores(prompts, "base", replies)
    runs = {}
    for name in names:
        run_scores, unparseable = parsed_scores(prompts, name, replies)
        dimensions = {
            dimension: paired_summary(scores[dimension], run_scores[dimension], seed=seed) for dimension in DIMENSIONS
        }
        pairwise_result = None
        if pairwise:
            outcomes = []
            for prompt in prompts:
                base_first = parse_preference(replies[f"pair/{name}/{prompt['id']}/base-first"])
                run_first = parse_preference(replies[f"pair/{name}/{prompt['id']}/run-first"])
                unparseable += (base_first is None) + (run_first is None)
                outcomes.append(pairwise_outcome(base_first, run_first))
            pairwise_result = pairwise_summary(outcomes)
        runs[name] = {"dimensions": dimensions, "pairwise": pairwise_result, "unparseable": unparseable}

    if base_unparseable or any(run["unparseable"] for run in runs.values()):
        logger.warning(
            "unparseable judge replies: base %d, %s; they are left out of the scores",
            base_unparseable, ", ".join(f"{name} {run['unparseable']}" for name, run in runs.items()),
        )
    base_means = {
        dimension: (float(np.mean(list(scores[dimension].values()))) if scores[dimension] else None)
        for dimension in DIMENSIONS
    }
    return {"base": {"means": base_means, "unparseable": base_unparseable}, "runs": runs}


def parsed_scores(prompts: Sequence[dict], label: str, replies: dict[str, str]) -> tuple[dict[str, dict[str, float]], int]:
    """Return {dimension: {prompt id: score}} of one model and its number of unparseable replies."""
    by_dimension: dict[str, dict[str, float]] = {dimension: {} for dimension in DIMENSIONS}
    unparseable = 0
    for prompt in prompts:
        scores, _ = parse_scores(replies[f"score/{label}/{prompt['id']}"])
        if scores is None:
            unparseable += 1
            continue
        for dimension, score in scores.items():
            by_dimension[dimension][prompt["id"]] = score
    return by_dimension, unparseable


def judge_settings(
    judge_url: str | None, judge_model: str, api_key_env: str, timeout_s: float, max_retries: int,
    concurrency: int, pairwise: bool,
) -> dict:
    """Describe the judge for judge.json: the name of the key's variable is stored, never the key."""
    return {
        "backend": "local" if judge_url is None else "http",
        "url": None if judge_url is None else redact_url(judge_url),
        "model": judge_model,
        "api_key_env": api_key_env,
        "timeout_s": timeout_s,
        "max_retries": max_retries,
        "concurrency": concurrency,
        "pairwise": pairwise,
        "max_tokens": JUDGE_MAX_TOKENS,
        "dimensions": list(DIMENSIONS),
        "scale": [1, 10],
    }


def write_outputs(out_dir: Path, results: dict, requests: Sequence[JudgeRequest], replies: dict[str, str]) -> None:
    """Write judge.json and judgments.jsonl (each request id with the judge's reply and what was parsed from it)."""
    lines = []
    for request in requests:
        reply = replies[request.id]
        if request.id.startswith("score/"):
            scores, rationales = parse_scores(reply)
            parsed = {"scores": scores, "rationales": rationales}
        else:
            parsed = {"preference": parse_preference(reply)}
        lines.append(json.dumps({"id": request.id, **parsed, "reply": reply}, ensure_ascii=False))
    write_text_atomic(out_dir / "judgments.jsonl", "".join(line + "\n" for line in lines))
    write_json_atomic(out_dir / "judge.json", results)
    logger.info("wrote judge results to %s", out_dir / "judge.json")


def judge_markdown(results: dict) -> str:
    """Render `judge_runs` results as a Markdown table: one row per run and dimension, then the pairwise counts."""
    lines = [
        "| run | dimension | base | run | delta [95% CI] | n |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        for dimension, summary in run["dimensions"].items():
            lines.append(f"| {name} | {dimension} | {format_cell(summary, 'base_mean')} | "
                         f"{format_cell(summary, 'run_mean')} | {format_delta(summary)} | {summary['n']} |")
        pairwise = run["pairwise"]
        if pairwise is not None:
            rate = "n/a" if pairwise["inconsistent_rate"] is None else f"{pairwise['inconsistent_rate']:.0%}"
            lines.append(f"| {name} | pairwise win/loss/tie | | | {pairwise['win']}/{pairwise['loss']}/"
                         f"{pairwise['tie']} (inconsistent {rate}) | {pairwise['n']} |")
        lines.append(f"| {name} | unparseable replies | | | {run['unparseable']} | |")
    return "\n".join(lines) + "\n"


def format_cell(summary: dict, key: str) -> str:
    return "n/a" if summary[key] is None else f"{summary[key]:.2f}"


def format_delta(summary: dict) -> str:
    if summary["delta"] is None:
        return "n/a"
    low, high = summary["ci"]
    return f"{summary['delta']:+.2f} [{low:+.2f}, {high:+.2f}]"
