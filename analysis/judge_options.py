"""Command-line flags of the LLM judge, kept apart from the HTTP client so a CLI can build its parser cheaply.

`add_judge_arguments` adds the flags and `judge_options_from_args` turns the
parsed flags into keyword arguments of `analysis.judge.judge_runs`.
"""

from __future__ import annotations

import argparse

from analysis.generate import SAMPLING_MODES

DEFAULT_API_KEY_ENV = "HIERALIGN_JUDGE_API_KEY"


def int_at_least(minimum: int):
    """Return an argparse `type` that parses an integer and rejects values below `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """Parse a number of seconds that must be greater than 0, as an argparse `type`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


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

    group.add_argument("--judge-prompts", type=int_at_least(1), default=20, metavar="N",
                       help="held-out prompts per capability to answer and judge (default: 20)")
    group.add_argument("--max-new-tokens", type=int_at_least(1), default=64, metavar="N",
                       help="maximum new tokens per generated answer (default: 64)")
    group.add_argument("--sampling", choices=SAMPLING_MODES, default="greedy",
                       help="decoding of the answers: greedy, or sample with --sampling-seed (default: greedy)")
    group.add_argument("--sampling-seed", type=int, default=0, metavar="N",
                       help="seed of sampling and of the bootstrap intervals (default: 0)")

    group.add_argument("--judge-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                       help="timeout of one judge HTTP request, in seconds (default: 60)")
    group.add_argument("--judge-retries", type=int_at_least(0), default=4, metavar="N",
                       help="retries per judge request on timeouts, connection errors, HTTP 429 and 5xx, "
                       "with exponential backoff from 1 s (default: 4)")
    group.add_argument("--judge-concurrency", type=int_at_least(1), default=4, metavar="N",
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
