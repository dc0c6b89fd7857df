"""LLM-as-judge scoring of base and aligned answers, over an OpenAI-compatible API or a local model.

Every answer gets a 1-10 score with a short rationale on fluency, logical
coherence and factual consistency. With `pairwise=True` the judge also
compares the base and run answers to each prompt in both orders, and a
preference counts only when both orders agree.

Example, with a vLLM, llama.cpp or Ollama server on this machine:

    judge_runs([Path("runs/global")], base_model="smollm2",
               judge_url="http://127.0.0.1:8000/v1", judge_model="qwen2.5-7b-instruct",
               out_dir=Path("reports/global"))
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
from tqdm.auto import tqdm

from analysis.generate import (
    MODEL_DEVICE,
    SAMPLING_MODES,
    GenerationCache,
    GenerationSettings,
    base_generator,
    cached_answers,
    generate_replies,
    load_heldout_prompts,
    load_runs,
    run_generator,
)
from analysis.runs import RunInfo
from probe.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

DIMENSIONS: tuple[str, ...] = ("fluency", "logical_coherence", "factual_consistency")
DEFAULT_API_KEY_ENV = "HIERALIGN_JUDGE_API_KEY"
JUDGE_MAX_TOKENS = 256  # reply budget: three one-sentence rationales fit with room to spare
DEFAULT_BACKOFF_S = 1.0  # first retry delay; it doubles on each further retry
MAX_RETRY_AFTER_S = 60.0
BOOTSTRAP_RESAMPLES = 2000
Preference = Literal["A", "B", "tie"]

# The reply formats use placeholders, not example numbers, because weak judges copy an example verbatim.
SCORE_INSTRUCTIONS = (
    "You are a strict evaluator of answers written by a language model. Rate the answer below on three "
    "dimensions, each with an integer from 1 (very poor) to 10 (excellent):\n"
    "- fluency: grammar, word choice and readability.\n"
    "- logical_coherence: whether the statements and reasoning follow from each other without contradiction.\n"
    "- factual_consistency: whether the stated facts are true and agree with the question.\n"
    "Reply with one JSON object and nothing else, in this form:\n"
    '{"fluency": {"score": <1-10>, "rationale": "<one sentence>"}, '
    '"logical_coherence": {"score": <1-10>, "rationale": "<one sentence>"}, '
    '"factual_consistency": {"score": <1-10>, "rationale": "<one sentence>"}}'
)
PAIRWISE_INSTRUCTIONS = (
    "You compare two answers to the same question, each written by a language model. Decide which "
    "answer is better overall, weighing fluency, logical coherence and factual consistency. The order "
    "and the length of the answers must not decide. Reply with one JSON object and nothing else, in "
    'this form: {"winner": "<A, B or tie>", "rationale": "<one sentence>"}'
)


class JudgeRequestError(RuntimeError):
    """A judge request failed permanently: the status is not retryable, or the last retry failed."""


class JudgeResponseError(RuntimeError):
    """The judge endpoint returned a body that is not an OpenAI chat completion."""


class _RetryableFailure(Exception):
    """A transient failure of one attempt; `retry_after_s` is the server's Retry-After, if any."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class JudgeRequest:
    """One chat request to the judge.

    Attributes:
        id: Unique id used in logs and errors, e.g. "score/base/facts-0003".
        messages: The chat messages, each {"role", "content"}.
    """

    id: str
    messages: list[dict[str, str]]


class Judge(Protocol):
    def complete_all(self, requests: Sequence[JudgeRequest], *, desc: str) -> dict[str, str]:
        """Return the reply text of each request, keyed by request id."""


# ---------------------------------------------------------------------------
# Judges


class HttpJudge:
    """A judge behind an OpenAI-compatible `/chat/completions` endpoint (vLLM, llama.cpp, Ollama, hosted APIs).

    Args:
        url: Base URL of the API, e.g. "http://127.0.0.1:8000/v1".
        model: Model name sent in the request body.
        api_key: Sent as a bearer token when set. It is never logged or stored.
        timeout_s: Timeout of one HTTP request, in seconds.
        max_retries: Retries after the first attempt on timeouts, connection
            errors, HTTP 429 and 5xx. Other 4xx responses are not retried.
        backoff_s: Delay before the first retry, in seconds; it doubles on each retry.
        concurrency: Maximum number of requests in flight.
        max_tokens: Reply budget sent as `max_tokens`.
    """

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        backoff_s: float = DEFAULT_BACKOFF_S,
        concurrency: int = 4,
        max_tokens: int = JUDGE_MAX_TOKENS,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"`judge_url` must start with http:// or https://, got {redact_url(url)!r}")
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self._api_key = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def close(self) -> None:
        self._client.close()

    def complete_all(self, requests: Sequence[JudgeRequest], *, desc: str) -> dict[str, str]:
        """Send all requests with at most `concurrency` in flight; raise on the first request that fails."""
        replies: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.complete, request): request.id for request in requests}
            try:
                for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="request"):
                    replies[futures[future]] = future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return replies

    def complete(self, request: JudgeRequest) -> str:
        """Send one request, retrying transient failures with exponential backoff, and return the reply text.

        Raises:
            JudgeRequestError: On a non-retryable status, or when the last retry fails.
            JudgeResponseError: When the body is not a chat completion.
        """
        body = {
            "model": self.model,
            "messages": request.messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._attempt(request, body)
            except _RetryableFailure as error:
                failure = error
            if attempt + 1 == attempts:
                break
            delay = self.backoff_s * 2**attempt
            if failure.retry_after_s is not None:
                delay = max(delay, min(failure.retry_after_s, MAX_RETRY_AFTER_S))
            logger.warning(
                "judge request %s failed (%s); retry %d of %d in %.1f s",
                request.id, failure, attempt + 1, self.max_retries, delay,
            )
            time.sleep(delay)

        logger.error("judge request %s failed after %d attempts: %s", request.id, attempts, failure)
        raise JudgeRequestError(
            f"judge request {request.id} to {self.endpoint} failed after {attempts} attempts: {failure}. "
            "Check that the server is running and that --judge-url is right, or raise --judge-timeout "
            "or --judge-retries"
        )

    def _attempt(self, request: JudgeRequest, body: dict) -> str:
        """Send one attempt and return the reply text.

        Raises:
            _RetryableFailure: On a timeout, a connection error, HTTP 429 or 5xx.
            JudgeRequestError: On any other HTTP error status.
        """
        try:
            response = self._client.post(self.endpoint, json=body)
        except httpx.TimeoutException:
            raise _RetryableFailure(f"timed out after {self.timeout_s:g} s") from None
        except httpx.TransportError as error:
            raise _RetryableFailure(self._redact(f"connection failed: {type(error).__name__}: {error}")) from None

        status = response.status_code
        if status < 400:
            return completion_text(response, request.id, self.endpoint)
        failure = self._redact(f"HTTP {status}: {response.text[:300]!r}")
        if status == 429 or status >= 500:
            retry_after = response.headers.get("retry-after", "")
            seconds = float(retry_after) if re.fullmatch(r"\d+(\.\d+)?", retry_after) else None
            raise _RetryableFailure(failure, seconds)

        logger.error("judge request %s was rejected with HTTP %d; not retrying", request.id, status)
        raise JudgeRequestError(
            f"judge request {request.id} to {self.endpoint} was rejected: {failure}. {status_hint(status)}"
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text


def completion_text(response: httpx.Response, request_id: str, endpoint: str) -> str:
    """Return the text of `choices[0].message.content` of a chat completion; a null content gives ""."""
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise JudgeResponseError(
            f"judge request {request_id}: {endpoint} returned a body that is not an OpenAI chat completion "
            f"({type(error).__name__}; body starts {response.text[:200]!r}). Check --judge-url: it should "
            "be the API base that ends before /chat/completions, e.g. http://127.0.0.1:8000/v1"
        ) from error
    if isinstance(content, list):
        # Some servers return the content as a list of typed parts, e.g. [{"type": "text", "text": "..."}].
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def status_hint(status: int) -> str:
    if status in (401, 403):
        return "Check the API key in the environment variable named by --judge-api-key-env."
    if status == 404:
        return "Check --judge-url (the API base, e.g. http://127.0.0.1:8000/v1) and --judge-model."
    return "Check --judge-model and the server's log."


class LocalJudge:
    """A judge that runs a local HF model (an alias such as `smollm2`, a path or a hub id) with greedy decoding.

    Args:
        model_name: Passed to `probe.models.load_model`.
        max_tokens: Maximum new tokens per reply.
        batch_size: Requests per `generate` call.
    """

    def __init__(self, model_name: str, *, max_tokens: int = JUDGE_MAX_TOKENS, batch_size: int = 8) -> None:
        from probe.models import load_model

        loaded = load_model(model_name, device=MODEL_DEVICE)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.settings = GenerationSettings(max_new_tokens=max_tokens, sampling="greedy", batch_size=batch_size)

    def complete_all(self, requests: Sequence[JudgeRequest], *, desc: str) -> dict[str, str]:
        # Similar lengths in a batch waste less compute on padding.
        ordered = sorted(requests, key=lambda request: sum(len(m["content"]) for m in request.messages))
        replies = generate_replies(
            self.model, self.tokenizer, [request.messages for request in ordered], self.settings, desc=desc,
        )
        return {request.id: reply for request, reply in zip(ordered, replies)}

    def close(self) -> None:
        del self.model
        gc.collect()


# ---------------------------------------------------------------------------
# Prompts and reply parsing


# Instructions go into the user turn, because some chat templates reject a system role (Gemma 2's
# raises "System role not supported").
def score_messages(prompt: str, answer: str) -> list[dict[str, str]]:
    content = f"{SCORE_INSTRUCTIONS}\n\nQuestion:\n{prompt}\n\nAnswer:\n{answer or '(empty answer)'}"
    return [{"role": "user", "content": content}]


def pairwise_messages(prompt: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    content = (
        f"{PAIRWISE_INSTRUCTIONS}\n\nQuestion:\n{prompt}\n\n[Answer A]\n{answer_a or '(empty answer)'}\n\n"
        f"[Answer B]\n{answer_b or '(empty answer)'}"
    )
    return [{"role": "user", "content": content}]


DIMENSION_ALIASES = {
    "fluency": "fluency",
    "coherence": "logical_coherence",
    "logical_coherence": "logical_coherence",
    "logic": "logical_coherence",
    "factual_consistency": "factual_consistency",
    "factuality": "factual_consistency",
    "factual_accuracy": "factual_consistency",
    "consistency": "factual_consistency",
}
_FENCED_BLOCK = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
# The separators exclude "<" so that an echoed placeholder such as `"score": <1-10>` is not read as a
# score, and the lookahead rejects a range such as "1-10".
_SCORE_LINE = re.compile(
    r"(?i:\b(fluency|logical[ _-]?coherence|coherence|factual[ _-]?consistency|factuality)\b)"
    r"[^\w\n<]*(?i:score[^\w\n<]*)?(\d+(?:\.\d+)?)(?!\s*-\s*\d)(?:\s*/\s*10)?[^\w\n]*(.*)"
)
_VERDICT_BRACKETS = re.compile(r"\[\[\s*([AB]|(?i:tie))\s*\]\]")
_VERDICT_LINE = re.compile(
    r"(?i:\b(?:winner|better answer|preference|verdict)\b)[^\w\n<]*(?i:an?\s+|answer\s+)?([AB]|(?i:tie|draw|equal))\b"
)
VERDICT_KEYS = ("winner", "preference", "better", "verdict", "choice")


def json_objects(text: str) -> Iterator[dict]:
    """Yield the JSON objects in a reply: the whole text, then fenced code blocks, then objects inside prose."""
    decoder = json.JSONDecoder()
    candidates = [text.strip(), *(block.strip() for block in _FENCED_BLOCK.findall(text))]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            yield value


def parse_scores(reply: str) -> tuple[dict[str, float] | None, dict[str, str]]:
    """Read the 1-10 score and rationale of every dimension from a judge reply.

    Strict JSON is tried first, then JSON in code fences or prose, then lines
    such as "Fluency: 7/10 - reads well".

    Returns:
        (scores, rationales). `scores` is None unless every dimension has a
        score between 1 and 10, so a partial or out-of-range reply counts as
        unparseable rather than as a low score.
    """
    for value in json_objects(reply):
        scores, rationales = scores_from_object(value)
        if scores is not None:
            return scores, rationales
    return scores_from_lines(reply)


def scores_from_object(value: dict) -> tuple[dict[str, float] | None, dict[str, str]]:
    if isinstance(value.get("scores"), dict):
        nested = dict(value["scores"])
        nested.setdefault("rationale", value.get("rationale"))
        value = nested
    scores: dict[str, float] = {}
    rationales: dict[str, str] = {}
    for key, item in value.items():
        dimension = DIMENSION_ALIASES.get(re.sub(r"[\s-]+", "_", str(key).strip().lower()))
        if dimension is None:
            continue
        if isinstance(item, dict):
            rationale = item.get("rationale") or item.get("reason") or item.get("explanation")
            if rationale:
                rationales[dimension] = str(rationale)
            item = item.get("score", item.get("rating"))
        score = score_value(item)
        if score is not None:
            scores[dimension] = score
    if isinstance(value.get("rationale"), str):
        rationales.setdefault("overall", value["rationale"])
    return (scores if set(scores) == set(DIMENSIONS) else None), rationales


def scores_from_lines(reply: str) -> tuple[dict[str, float] | None, dict[str, str]]:
    scores: dict[str, float] = {}
    rationales: dict[str, str] = {}
    for match in _SCORE_LINE.finditer(reply):
        dimension = DIMENSION_ALIASES[re.sub(r"[\s-]+", "_", match.group(1).lower())]
        score = score_value(match.group(2))
        if score is None or dimension in scores:
            continue
        scores[dimension] = score
        if match.group(3).strip():
            rationales[dimension] = match.group(3).strip()
    return (scores if set(scores) == set(DIMENSIONS) else None), rationales


def score_value(item: Any) -> float | None:
    """Return a score in [1, 10] from a number or a string such as "7" or "7/10", else None."""
    if isinstance(item, bool):
        return None
    if isinstance(item, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", item)
        item = float(match.group(1)) if match else None
    if isinstance(item, (int, float)) and 1 <= item <= 10:
        return float(item)
    return None


def parse_preference(reply: str) -> Preference | None:
    """Read the verdict "A", "B" or "tie" of a pairwise reply, or None when there is none.

    A JSON verdict key with an invalid value gives None, without falling back
    to the line patterns, because the JSON is what the judge was asked for.
    """
    found_key = False
    for value in json_objects(reply):
        for key in VERDICT_KEYS:
            if key in value:
                found_key = True
                verdict = normalise_verdict(value[key])
                if verdict is not None:
                    return verdict
    if found_key:
        return None
    for pattern in (_VERDICT_BRACKETS, _VERDICT_LINE):
        match = pattern.search(reply)
        if match:
            return normalise_verdict(match.group(1))
    return None


def normalise_verdict(value: Any) -> Preference | None:
    text = re.sub(r"[\[\]\"'().]", "", str(value)).strip().lower()
    text = re.sub(r"^answer\s+", "", text)
    if text in ("a", "b"):
        return text.upper()  # type: ignore[return-value]
    if text in ("tie", "draw", "equal", "both", "neither", "none"):
        return "tie"
    return None


# ---------------------------------------------------------------------------
# Statistics


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


def redact_url(url: str) -> str:
    """Hide the user and password part of a URL, so credentials in it are never logged or stored."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


# ---------------------------------------------------------------------------
# Command-line flags


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the LLM-as-judge flags to `parser`; judging is on when --judge-model is given."""
    group = parser.add_argument_group("LLM-as-judge (runs when --judge-model is given)")
    group.add_argument(
        "--judge-model", default=None, metavar="NAME",
        help="judge model: the model name served at --judge-url, or without --judge-url a local model "
        "alias or path (e.g. smollm2). Default: none, so no judging",
    )
    group.add_argument(
        "--judge-url", default=None, metavar="URL",
        help="base URL of an OpenAI-compatible API (vLLM, llama.cpp server, Ollama, hosted); requests go "
        "to URL/chat/completions, e.g. http://127.0.0.1:8000/v1. Default: none, judge with a local model",
    )
    group.add_argument(
        "--judge-api-key-env", default=DEFAULT_API_KEY_ENV, metavar="VAR",
        help=f"name of the environment variable that contains the judge API key, sent as a bearer token "
        f"when set (default: {DEFAULT_API_KEY_ENV})",
    )

    group.add_argument("--judge-prompts", type=int, default=20, metavar="N",
                       help="held-out prompts per capability to answer and judge (default: 20)")
    group.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                       help="maximum new tokens per generated answer (default: 64)")
    group.add_argument("--sampling", choices=SAMPLING_MODES, default="greedy",
                       help="decoding of the answers: greedy, or sample with --sampling-seed (default: greedy)")
    group.add_argument("--sampling-seed", type=int, default=0, metavar="N",
                       help="seed of sampling and of the bootstrap intervals (default: 0)")

    group.add_argument("--judge-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="timeout of one judge HTTP request, in seconds (default: 60)")
    group.add_argument("--judge-retries", type=int, default=4, metavar="N",
                       help="retries per judge request on timeouts, connection errors, HTTP 429 and 5xx, "
                       "with exponential backoff from 1 s (default: 4)")
    group.add_argument("--judge-concurrency", type=int, default=4, metavar="N",
                       help="maximum judge HTTP requests in flight (default: 4)")
    group.add_argument("--no-judge-pairwise", dest="judge_pairwise", action="store_false",
                       help="skip the head-to-head comparison of base and run answers (default: compare, in both orders)")


def judge_options_from_args(args: argparse.Namespace) -> dict:
    """Return the keyword arguments of `judge_runs` set by the flags of `add_judge_arguments`.

    The caller adds `run_dirs`, `base_model` and `out_dir`, and calls
    `judge_runs` only when `args.judge_model` is set.
    """
    return {
        "judge_url": args.judge_url,
        "judge_model": args.judge_model,
        "api_key_env": args.judge_api_key_env,
        "n_prompts": args.judge_prompts,
        "max_new_tokens": args.max_new_tokens,
        "sampling": args.sampling,
        "seed": args.sampling_seed,
        "timeout_s": args.judge_timeout,
        "max_retries": args.judge_retries,
        "concurrency": args.judge_concurrency,
        "pairwise": args.judge_pairwise,
    }
