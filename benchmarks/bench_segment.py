"""Time exact contiguous segmentation for an 80-layer model.

Run with `python benchmarks/bench_segment.py`. The features imitate the
real input: each layer's row of an 80 x 80 similarity matrix next to three
probe selectivity curves, so n_features is 83. Each cell is the median
wall-clock time of several runs of `probe.segment.segment`, in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from probe.segment import choose_k, segment

TARGET_MS = 50.0


def make_features(n_layers: int, n_curves: int, seed: int) -> np.ndarray:
    """Build a noisy block-structured feature matrix of shape (n_layers, n_layers + n_curves)."""
    rng = np.random.default_rng(seed)
    block_of_layer = np.arange(n_layers) * 5 // n_layers  # 5 blocks of near-equal size
    similarity = np.where(block_of_layer[:, None] == block_of_layer[None, :], 0.9, 0.3)
    curves = rng.uniform(size=(n_curves, 5))[:, block_of_layer].T  # (n_layers, n_curves)
    features = np.hstack([similarity, curves])
    return features + rng.normal(scale=0.05, size=features.shape)


def median_ms(function, repeats: int) -> float:
    """Return the median wall-clock time of function() over repeats runs, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=80, help="number of layers L (default 80)")
    parser.add_argument("--max-k", type=int, default=8, help="maximum number of blocks K (default 8)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per cell (default 20)")
    args = parser.parse_args()

    features = make_features(args.layers, n_curves=3, seed=0)
    print(f"L={args.layers}, n_features={features.shape[1]}, median of {args.repeats} runs, "
          f"target {TARGET_MS:.0f} ms")
    print(f"{'K':>3} {'min_block':>9} {'segment ms':>11}")
    for k in range(1, args.max_k + 1):
        for min_block in (1, 4):
            elapsed = median_ms(lambda: segment(features, k, min_block), args.repeats)
            print(f"{k:>3} {min_block:>9} {elapsed:>11.2f}")

    elapsed = median_ms(lambda: choose_k(features, args.max_k, 1), args.repeats)
    print(f"choose_k over K=1..{args.max_k}: {elapsed:.2f} ms")


if __name__ == "__main__":
    main()
