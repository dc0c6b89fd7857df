"""Benchmark activation capture against a plain `output_hidden_states=True` forward pass.

Measures, side by side in one run on the same batches:
  1. time of `probe.activations.extract_features` (hooks, pooling, early stop,
     streaming to disk) divided by the time of `model(..., output_hidden_states=True)`
     over the same batches (which also runs the final norm and the LM head);
  2. peak resident memory of a capture of N1 and N2 examples, each in a fresh
     subprocess, and the growth between them.

Usage:
    python benchmarks/bench_probe.py --model smollm2 --examples 512 --memory-examples 512,4096 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from probe.activations import extract_features
from probe.models import load_model
from probe.suite import load_suite


def benchmark_texts(n: int) -> list[str]:
    suite = load_suite()
    pool = [item["text"] for item in suite.probe_items(None, "train")]
    return [pool[i % len(pool)] for i in range(n)]


@torch.no_grad()
def time_hidden_states(loaded, texts: list[str], batch_size: int, max_length: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        encoded = loaded.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                                   truncation=True, max_length=max_length)
        loaded.model(**encoded, output_hidden_states=True, use_cache=False)
    return time.perf_counter() - started


def time_capture(loaded, texts: list[str], batch_size: int, max_length: int) -> float:
    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        extract_features(loaded.model, loaded.tokenizer, loaded.stack, texts, directory, batch_size=batch_size,
                         max_length=max_length, resume=False, progress=False)
        return time.perf_counter() - started


def peak_rss_child(model: str, n: int, batch_size: int, max_length: int) -> float:
    """Run one capture of `n` examples in a fresh process; return its peak RSS in MiB."""
    code = (
        "import json, resource, tempfile, sys; sys.path.insert(0, 'benchmarks');"
        "from bench_probe import benchmark_texts; from probe.models import load_model;"
        "from probe.activations import extract_features;"
        f"texts = benchmark_texts({n}); loaded = load_model({model!r});"
        "d = tempfile.mkdtemp();"
        f"extract_features(loaded.model, loaded.tokenizer, loaded.stack, texts, d, batch_size={batch_size}, "
        f"max_length={max_length}, resume=False, progress=False);"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model alias, HF id or path (default: %(default)s)")
    parser.add_argument("--examples", type=int, default=512, help="examples for the timing comparison (default: %(default)s)")
    parser.add_argument("--memory-examples", default="512,4096",
                        help="two example counts for the memory growth (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=128, help="truncation length in tokens")
    parser.add_argument("--memory-max-length", type=int, default=32,
                        help="truncation length in tokens for the two memory runs (short, so 4096 examples stay quick)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timing rounds; the median is reported")
    args = parser.parse_args()
    torch.manual_seed(0)

    loaded = load_model(args.model)
    texts = benchmark_texts(args.examples)
    time_capture(loaded, texts[: args.batch_size], args.batch_size, args.max_length)  # warm-up
    plain, capture = [], []
    for _ in range(args.repeats):
        plain.append(time_hidden_states(loaded, texts, args.batch_size, args.max_length))
        capture.append(time_capture(loaded, texts, args.batch_size, args.max_length))
    plain_s, capture_s = sorted(plain)[len(plain) // 2], sorted(capture)[len(capture) // 2]

    small, large = (int(n) for n in args.memory_examples.split(","))
    rss_small = peak_rss_child(args.model, small, args.batch_size, args.memory_max_length)
    rss_large = peak_rss_child(args.model, large, args.batch_size, args.memory_max_length)

    result = {
        "model": args.model, "examples": args.examples, "batch_size": args.batch_size, "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "plain_hidden_states_s": round(plain_s, 2), "capture_s": round(capture_s, 2),
        "capture_over_plain": round(capture_s / plain_s, 3),
        "memory_max_length": args.memory_max_length, f"peak_rss_mib_{small}": round(rss_small, 1), f"peak_rss_mib_{large}": round(rss_large, 1),
        "peak_rss_growth": round(rss_large / rss_small - 1, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
