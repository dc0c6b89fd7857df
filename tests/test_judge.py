"""LLM-as-judge: reply parsing, retries against a loopback endpoint, statistics and `judge_runs` end to end.

The endpoint is a `http.server` on 127.0.0.1 with an ephemeral port, started
by each test, that plays an OpenAI-compatible `/v1/chat/completions`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest

import analysis.cli as cli_module
import analysis.judge as judge_module
from analysis.judge import (
    DIMENSIONS,
    HttpJudge,
    JudgeRequest,
    JudgeRequestError,
    JudgeResponseError,
    add_judge_arguments,
    judge_markdown,
    judge_options_from_args,
    judge_runs,
    paired_summary,
    pairwise_outcome,
    pairwise_summary,
    parse_preference,
    parse_scores,
    redact_url,
)
from tests.analysis_runs import make_run

os.environ["HF_HUB_OFFLINE"] = "1"

SECRET = "sk-test-do-not-leak-4f9c2a"
SCORE_JSON = json.dumps({dimension: {"score": 7, "rationale": "reads well"} for dimension in DIMENSIONS})
PROMPTS = [
    {"id": "syntax:1", "capability": "syntax", "prompt": "Fix the grammar: he go home."},
    {"id": "logic:1", "capability": "logic", "prompt": "All cats are animals. Tom is a cat. Is Tom an animal?"},
    {"id": "facts:1", "capability": "facts", "prompt": "What is the capital of France? MALFORMED"},
]

# A reply: (HTTP status, body text, seconds to wait before answering, extra headers).
Reply = tuple[int, str, float, dict]


def completion(content: str | None) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class LoopbackEndpoint:
    """A scripted chat completions server on 127.0.0.1 that records every request it receives."""

    def __init__(self, respond: Callable[[int, dict], Reply]) -> None:
        self.respond = respond
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - name fixed by http.server
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    index = len(endpoint.requests)
                    endpoint.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    status, text, delay, headers = endpoint.respond(index, body)
                    time.sleep(delay)
                    payload = text.encode()
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up after its timeout
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

            def log_message(self, *args) -> None:
                pass

        return Handler

    def __enter__(self) -> LoopbackEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def request(request_id: str = "score/base/syntax:1") -> JudgeRequest:
    return JudgeRequest(request_id, [{"role": "user", "content": "Rate this."}])


def make_judge(url: str, **kwargs) -> HttpJudge:
    options = {"model": "judge-model", "api_key": SECRET, "timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01}
    return HttpJudge(url, **{**options, **kwargs})


# ---------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (SCORE_JSON, {"fluency": 7.0, "logical_coherence": 7.0, "factual_consistency": 7.0}),
        ('{"fluency": 8, "coherence": "6/10", "factuality": 5}',
         {"fluency": 8.0, "logical_coherence": 6.0, "factual_consistency": 5.0}),
        ('Here is my rating:\n```json\n{"fluency": 9, "logical_coherence": 4, "factual_consistency": 2}\n```\nDone.',
         {"fluency": 9.0, "logical_coherence": 4.0, "factual_consistency": 2.0}),
        ('Sure. {"scores": {"Fluency": 3, "Logical Coherence": 3, "Factual-Consistency": 10}} Hope it helps.',
         {"fluency": 3.0, "logical_coherence": 3.0, "factual_consistency": 10.0}),
        ("Fluency: 7/10 - clear\n**Logical coherence**: 6\nfactual consistency = 8 (correct capital)",
         {"fluency": 7.0, "logical_coherence": 6.0, "factual_consistency": 8.0}),
    ],
)
def test_parse_scores_accepts_formats(reply, expected):
    scores, _ = parse_scores(reply)
    assert scores == expected


@pytest.mark.parametrize(
    "reply",
    [
        '{"fluency": 7, "logical_coherence": 6',  # truncated JSON
        '{"fluency": 7, "logical_coherence": 6}',  # a dimension is missing
        '{"fluency": 11, "logical_coherence": 6, "factual_consistency": 5}',  # off the 1-10 scale
        '{"fluency": true, "logical_coherence": 6, "factual_consistency": 5}',
        "I cannot rate this answer.",
        "",
    ],
)
def test_parse_scores_rejects_unusable_replies(reply):
    scores, _ = parse_scores(reply)
    assert scores is None


def test_parse_ignores_echoed_instructions():
    assert parse_scores(judge_module.SCORE_INSTRUCTIONS) == (None, {})
    assert parse_preference(judge_module.PAIRWISE_INSTRUCTIONS) is None
    assert parse_scores("fluency: 1-10, logical coherence: 1-10, factual consistency: 1-10")[0] is None


def test_parse_scores_keeps_rationales():
    _, rationales = parse_scores(SCORE_JSON)
    assert rationales == {dimension: "reads well" for dimension in DIMENSIONS}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"winner": "A", "rationale": "more precise"}', "A"),
        ('```json\n{"winner": "Answer B"}\n```', "B"),
        ('{"winner": "tie"}', "tie"),
        ("After weighing both, my verdict: [[B]]", "B"),
        ("Winner: a tie, both are wrong.", "tie"),
        ("Better answer: Answer A", "A"),
        ("Both answers have merit.", None),
        ('{"winner": "C"} Winner: A', None),
    ],
)
def test_parse_preference_formats(reply, expected):
    assert parse_preference(reply) == expected


# ---------------------------------------------------------------------------
# HTTP judge against a loopback endpoint


def test_http_judge_sends_standard_body():
    with LoopbackEndpoint(lambda index, body: (200, completion(SCORE_JSON), 0, {})) as endpoint:
        judge = make_judge(endpoint.url + "/")
        reply = judge.complete(request())
        judge.close()

    sent = endpoint.requests[0]
    assert reply == SCORE_JSON
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert sent["body"]["model"] == "judge-model"
    assert sent["body"]["messages"] == request().messages
    assert sent["body"]["temperature"] == 0


def test_http_judge_joins_content_parts():
    parts = json.dumps({"choices": [{"message": {"content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]}}]})
    with LoopbackEndpoint(lambda index, body: (200, parts, 0, {})) as endpoint:
        assert make_judge(endpoint.url).complete(request()) == "AB"


def test_http_judge_omits_auth_without_key():
    with LoopbackEndpoint(lambda index, body: (200, completion("ok"), 0, {})) as endpoint:
        make_judge(endpoint.url, api_key=None).complete(request())
    assert "Authorization" not in endpoint.requests[0]["headers"]


def test_http_judge_retries_500_then_succeeds(caplog):
    def respond(index, body):
        return (500, "server overloaded", 0, {}) if index == 0 else (200, completion("fine"), 0, {})

    with LoopbackEndpoint(respond) as endpoint, caplog.at_level(logging.DEBUG):
        reply = make_judge(endpoint.url).complete(request("score/base/logic:1"))

    assert reply == "fine"
    assert len(endpoint.requests) == 2
    assert "judge request score/base/logic:1 failed (HTTP 500" in caplog.text
    assert "retry 1 of 2" in caplog.text
    assert SECRET not in caplog.text


def test_http_judge_retries_429_with_retry_after():
    def respond(index, body):
        return (429, "slow down", 0, {"Retry-After": "0"}) if index == 0 else (200, completion("fine"), 0, {})

    with LoopbackEndpoint(respond) as endpoint:
        reply = make_judge(endpoint.url).complete(request())
    assert reply == "fine"
    assert len(endpoint.requests) == 2


def test_http_judge_timeout_fails_after_last_retry(caplog):
    with LoopbackEndpoint(lambda index, body: (200, completion("late"), 1.0, {})) as endpoint:
        judge = make_judge(endpoint.url, timeout_s=0.2, max_retries=1)
        with caplog.at_level(logging.WARNING), pytest.raises(JudgeRequestError) as error:
            judge.complete(request("pair/run/facts:1/base-first"))

    message = str(error.value)
    assert len(endpoint.requests) == 2
    assert "judge request pair/run/facts:1/base-first" in message
    assert "failed after 2 attempts: timed out after 0.2 s" in message
    assert "--judge-timeout" in message
    assert SECRET not in message
    assert SECRET not in caplog.text


def test_http_judge_does_not_retry_400():
    with LoopbackEndpoint(lambda index, body: (400, '{"error": "unknown model"}', 0, {})) as endpoint:
        with pytest.raises(JudgeRequestError) as error:
            make_judge(endpoint.url).complete(request())
    assert len(endpoint.requests) == 1
    assert "was rejected: HTTP 400" in str(error.value)
    assert "unknown model" in str(error.value)


def test_http_judge_hides_key_echoed_by_server():
    with LoopbackEndpoint(lambda index, body: (401, f"bad key {SECRET}", 0, {})) as endpoint:
        with pytest.raises(JudgeRequestError) as error:
            make_judge(endpoint.url).complete(request())
    assert SECRET not in str(error.value)
    assert "--judge-api-key-env" in str(error.value)


def test_http_judge_rejects_non_completion_body():
    with LoopbackEndpoint(lambda index, body: (200, "<html>not an API</html>", 0, {})) as endpoint:
        with pytest.raises(JudgeResponseError) as error:
            make_judge(endpoint.url).complete(request())
    assert "is not an OpenAI chat completion" in str(error.value)


def test_http_judge_connection_refused_fails_after_retries():
    with LoopbackEndpoint(lambda index, body: (200, completion("x"), 0, {})) as endpoint:
        closed_url = endpoint.url
    with pytest.raises(JudgeRequestError) as error:
        make_judge(closed_url, max_retries=1).complete(request())
    assert "failed after 2 attempts: connection failed" in str(error.value)


def test_http_judge_limits_concurrency():
    with LoopbackEndpoint(lambda index, body: (200, completion("ok"), 0.05, {})) as endpoint:
        requests = [request(f"score/base/p{index}") for index in range(8)]
        replies = make_judge(endpoint.url, concurrency=2).complete_all(requests, desc="test")
    assert set(replies) == {item.id for item in requests}
    assert endpoint.max_in_flight == 2


def test_http_judge_rejects_url_without_scheme():
    with pytest.raises(ValueError) as error:
        HttpJudge("127.0.0.1:8000/v1", "m")
    assert str(error.value) == "`judge_url` must start with http:// or https://, got '127.0.0.1:8000/v1'"


def test_redact_url_hides_credentials():
    assert redact_url("http://user:pw@127.0.0.1:8000/v1") == "http://***@127.0.0.1:8000/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# ---------------------------------------------------------------------------
# Statistics


def test_paired_summary_delta_and_interval():
    base = {"a": 5.0, "b": 6.0, "c": 7.0, "d": 4.0}
    run = {"a": 6.0, "b": 8.0, "c": 7.0, "d": 5.0, "only-run": 10.0}
    summary = paired_summary(base, run, seed=0)
    assert summary["n"] == 4
    assert summary["base_mean"] == 5.5
    assert summary["run_mean"] == 6.5
    assert summary["delta"] == 1.0
    assert 0.0 <= summary["ci"][0] <= 1.0 <= summary["ci"][1] <= 2.0


def test_paired_summary_without_overlap():
    summary = paired_summary({"a": 5.0}, {"b": 6.0}, seed=0)
    assert summary == {"base_mean": None, "run_mean": None, "delta": None, "ci": [None, None], "n": 0}


@pytest.mark.parametrize(
    ("base_first", "run_first", "expected"),
    [
        ("B", "A", "win"),
        ("A", "B", "loss"),
        ("tie", "tie", "tie"),
        ("A", "A", "inconsistent"),  # the judge always picks the first answer
        ("B", "tie", "inconsistent"),
        (None, "A", None),
    ],
)
def test_pairwise_outcome_needs_both_orders(base_first, run_first, expected):
    assert pairwise_outcome(base_first, run_first) == expected


def test_pairwise_summary_counts_inconsistent_as_tie():
    summary = pairwise_summary(["win", "inconsistent", "loss", "tie", None])
    assert summary == {"win": 1, "loss": 1, "tie": 2, "inconsistent": 1, "inconsistent_rate": 0.25, "n": 4}


# ---------------------------------------------------------------------------
# Command-line flags


def test_judge_flags_map_to_judge_runs_options():
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    args = parser.parse_args([
        "--judge-url", "http://127.0.0.1:8000/v1", "--judge-model", "qwen", "--judge-prompts", "5",
        "--sampling", "sample", "--sampling-seed", "3", "--judge-timeout", "2.5", "--no-judge-pairwise",
    ])
    assert judge_options_from_args(args) == {
        "judge_url": "http://127.0.0.1:8000/v1", "judge_model": "qwen", "api_key_env": "HIERALIGN_JUDGE_API_KEY",
        "n_prompts": 5, "max_new_tokens": 64, "sampling": "sample", "seed": 3, "timeout_s": 2.5,
        "max_retries": 4, "concurrency": 4, "pairwise": False,
    }
    assert parser.parse_args([]).judge_model is None


# ---------------------------------------------------------------------------
# judge_runs end to end


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(judge_module, "load_heldout_prompts", lambda n_prompts: PROMPTS[:n_prompts * 3])
    return make_run(tmp_path / "runs", "local")


def scripted_judge(index: int, body: dict) -> Reply:
    """Score every answer 7 except the malformed prompt's, and always prefer answer A (a position bias)."""
    text = body["messages"][-1]["content"]
    if "MALFORMED" in text:
        return 200, completion('{"fluency": 7, "logical_coherence":'), 0, {}
    if "[Answer A]" in text:
        return 200, completion('{"winner": "A", "rationale": "first is better"}'), 0, {}
    return 200, completion(SCORE_JSON), 0, {}


def test_judge_runs_over_http(run_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HIERALIGN_JUDGE_API_KEY", SECRET)
    out_dir = tmp_path / "report"
    with LoopbackEndpoint(scripted_judge) as endpoint, caplog.at_level(logging.DEBUG):
        results = judge_runs(
            [run_dir], base_model="tiny-llama", judge_url=endpoint.url, judge_model="judge-model",
            out_dir=out_dir, n_prompts=1, max_new_tokens=4, concurrency=2,
        )

    run = results["runs"]["local"]
    assert len(endpoint.requests) == 3 + 3 + 2 * 3  # base scores, run scores, both orders per prompt
    assert run["dimensions"]["fluency"] == {"base_mean": 7.0, "run_mean": 7.0, "delta": 0.0, "ci": [0.0, 0.0], "n": 2}
    assert run["pairwise"] == {"win": 0, "loss": 0, "tie": 2, "inconsistent": 2, "inconsistent_rate": 1.0, "n": 2}
    assert run["unparseable"] == 1 + 2  # its malformed score reply and both malformed pairwise replies
    assert results["base"]["unparseable"] == 1
    assert results["judge"]["api_key_env"] == "HIERALIGN_JUDGE_API_KEY"
    assert json.loads((out_dir / "judge.json").read_text()) == results

    written = [path for path in out_dir.rglob("*") if path.is_file()]
    assert {path.relative_to(out_dir).as_posix() for path in written} == {
        "judge.json", "judgments.jsonl", "generations/base.jsonl", "generations/local.jsonl",
    }
    for path in written:
        assert SECRET not in path.read_text(encoding="utf-8"), path
    assert SECRET not in caplog.text
    assert all(request["headers"]["Authorization"] == f"Bearer {SECRET}" for request in endpoint.requests)

    table = judge_markdown(results)
    assert "| local | fluency | 7.00 | 7.00 | +0.00 [+0.00, +0.00] | 2 |" in table
    assert "| local | pairwise win/loss/tie | | | 0/0/2 (inconsistent 100%) | 2 |" in table


def test_judge_runs_reuses_cached_generations(run_dir, tmp_path, monkeypatch):
    out_dir = tmp_path / "report"
    options = {"base_model": "tiny-llama", "judge_model": "judge-model", "out_dir": out_dir,
               "n_prompts": 1, "max_new_tokens": 4, "pairwise": False}
    with LoopbackEndpoint(scripted_judge) as endpoint:
        judge_runs([run_dir], judge_url=endpoint.url, **options)

        def fail(*args, **kwargs):
            raise AssertionError("cached answers were generated again")

        monkeypatch.setattr("analysis.generate.generate_replies", fail)
        again = judge_runs([run_dir], judge_url=endpoint.url, **options)
    assert again["runs"]["local"]["pairwise"] is None
    assert len(endpoint.requests) == 2 * 6


def test_judge_runs_fails_clearly_when_endpoint_fails(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "DEFAULT_BACKOFF_S", 0.01)
    with LoopbackEndpoint(lambda index, body: (503, "unavailable", 0, {})) as endpoint:
        with pytest.raises(JudgeRequestError) as error:
            judge_runs(
                [run_dir], base_model="tiny-llama", judge_url=endpoint.url, judge_model="judge-model",
                out_dir=tmp_path / "report", n_prompts=1, max_new_tokens=4, max_retries=1, concurrency=1,
            )
    assert "failed after 2 attempts: HTTP 503" in str(error.value)
    assert not (tmp_path / "report" / "judge.json").exists()


def test_judge_runs_with_local_model(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "JUDGE_MAX_TOKENS", 8)  # a random-weight judge writes noise anyway
    results = judge_runs(
        [run_dir], base_model="tiny-llama", judge_url=None, judge_model="tiny-llama",
        out_dir=tmp_path / "report", n_prompts=1, max_new_tokens=4,
    )
    run = results["runs"]["local"]
    # A random-weight judge writes no scores: every reply is counted as unparseable, none is scored.
    assert results["judge"]["backend"] == "local"
    assert results["base"]["unparseable"] == 3
    assert run["unparseable"] == 3 + 6
    assert run["dimensions"]["fluency"]["n"] == 0
    assert run["pairwise"]["n"] == 0
    assert "| local | fluency | n/a | n/a | n/a | 0 |" in judge_markdown(results)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_prompts": 0}, "`n_prompts` must be at least 1, got 0"),
        ({"concurrency": 0}, "`concurrency` must be at least 1, got 0"),
        ({"timeout_s": 0}, "`timeout_s` must be positive, got 0"),
        ({"judge_model": " "}, "`judge_model` must not be empty: pass --judge-model NAME"),
    ],
)
def test_judge_runs_rejects_invalid_options(run_dir, tmp_path, options, message):
    arguments = {"base_model": "tiny-llama", "judge_url": None, "judge_model": "tiny-llama", "out_dir": tmp_path}
    with pytest.raises(ValueError) as error:
        judge_runs([run_dir], **{**arguments, **options})
    assert str(error.value) == message


# ---------------------------------------------------------------------------
# layer-report with a judge, end to end

JUDGE_FLAGS = (
    "--judge-model", "--judge-url", "--judge-api-key-env", "--judge-prompts", "--max-new-tokens", "--sampling",
    "--sampling-seed", "--judge-timeout", "--judge-retries", "--judge-concurrency", "--no-judge-pairwise",
)


def heldout_prompts(n_prompts: int) -> list[dict]:
    """`n_prompts` short prompts per capability, in place of the data suite's held-out split."""
    return [
        {"id": f"{capability}:{index}", "capability": capability, "prompt": f"Question {index} about {capability}?"}
        for capability in ("syntax", "logic", "facts")
        for index in range(n_prompts)
    ]


def test_layer_report_cli_with_http_judge(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setattr(judge_module, "load_heldout_prompts", heldout_prompts)
    monkeypatch.setenv("LOOPBACK_JUDGE_KEY", SECRET)
    run_dir = make_run(tmp_path / "runs", "local")
    out = tmp_path / "report"

    with LoopbackEndpoint(scripted_judge) as endpoint, caplog.at_level(logging.DEBUG):
        port = endpoint.server.server_address[1]
        status = cli_module.main([
            str(run_dir), "--out", str(out), "--no-eval",
            "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-model", "fake", "--judge-prompts", "2",
            "--judge-api-key-env", "LOOPBACK_JUDGE_KEY", "--max-new-tokens", "4", "--judge-concurrency", "2",
        ])
    output = capsys.readouterr()

    assert status == 0, output.err
    assert len(endpoint.requests) == 6 + 6 + 2 * 6  # base scores, run scores, both orders per prompt
    assert all(request["body"]["model"] == "fake" for request in endpoint.requests)
    assert all(request["headers"]["Authorization"] == f"Bearer {SECRET}" for request in endpoint.requests)

    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "## LLM-as-judge" in markdown
    for dimension in DIMENSIONS:
        assert f"| local | {dimension} | 7.00 | 7.00 | +0.00 [+0.00, +0.00] | 6 |" in markdown
    assert "| local | pairwise win/loss/tie | | | 0/0/6 (inconsistent 100%) | 6 |" in markdown

    judged = json.loads((out / "report.json").read_text(encoding="utf-8"))["judge"]
    assert judged["runs"]["local"]["dimensions"]["fluency"] == {
        "base_mean": 7.0, "run_mean": 7.0, "delta": 0.0, "ci": [0.0, 0.0], "n": 6,
    }
    assert judged["runs"]["local"]["pairwise"]["n"] == 6
    assert judged["base"]["means"] == {dimension: 7.0 for dimension in DIMENSIONS}
    assert judged["generation"]["n_prompts"] == 6
    assert judged["judge"]["api_key_env"] == "LOOPBACK_JUDGE_KEY"
    assert (out / "judge" / "judge.json").is_file()

    written = [path for path in out.rglob("*") if path.is_file()]
    assert len(written) > 4
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in output.out + output.err
    assert SECRET not in caplog.text


@pytest.mark.parametrize("argv", [["--help"], ["experiment", "--help"]])
def test_layer_report_help_lists_judge_flags(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(argv)

    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in JUDGE_FLAGS:
        assert flag in help_text, flag
