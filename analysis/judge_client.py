"""Judge backends: an OpenAI-compatible HTTP client with retries and backoff, and a local HF model.

Both take `JudgeRequest`s and return the reply text of each, keyed by request
id. Reading scores and verdicts from that text is the job of `analysis.judge_parse`.
"""

from __future__ import annotations

import gc
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Protocol, Sequence
from urllib.parse import urlsplit, urlunsplit

import httpx
from tqdm.auto import tqdm

from analysis.generate import MODEL_DEVICE, GenerationSettings, generate_replies

logger = logging.getLogger(__name__)

JUDGE_MAX_TOKENS = 256  # reply budget: three one-sentence rationales fit with room to spare
DEFAULT_BACKOFF_S = 1.0  # first retry delay; it doubles on each further retry
MAX_RETRY_AFTER_S = 60.0


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


def redact_url(url: str) -> str:
    """Hide the user and password part of a URL, so credentials in it are never logged or stored."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
