"""Helpers shared by the capability builders: split assignment, quotas, length statistics, file IO."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

CAPABILITIES = ("syntax", "logic", "facts")
Split = Literal["train", "heldout"]
SPLITS: tuple[Split, Split] = ("train", "heldout")

# Fraction of source units (Brown documents, LogiQA passages, countries, ...) that go to the held-out split.
HELDOUT_FRACTION = 0.25


def stable_fraction(key: str) -> float:
    """Map a string to a number in [0, 1) that is the same on every machine and Python run."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return int(digest[:12], 16) / float(16**12)


def split_of(key: str) -> Split:
    """Assign a source unit to a split from its key alone, so the split does not depend on the seed or the counts."""
    return "heldout" if stable_fraction("split:" + key) < HELDOUT_FRACTION else "train"


def allocate(total: int, capacity: Mapping[str, int], weights: Mapping[str, float], what: str) -> dict[str, int]:
    """Divide `total` items among kinds in proportion to `weights`, capped by `capacity`.

    Kinds with weight 0 only receive items once every weighted kind is full.

    Args:
        total: Number of items to allocate.
        capacity: Maximum number of items each kind can supply.
        weights: Relative share of each kind; missing kinds count as 0.
        what: Name of the pool, used in the error message.

    Returns:
        Number of items per kind, summing to `total`.

    Raises:
        ValueError: If the kinds together cannot supply `total` items.
    """
    available = sum(capacity.values())
    if total > available:
        raise ValueError(
            f"{what}: requested {total} items but the sources supply at most {available} "
            f"({dict(capacity)}); lower the item count."
        )
    counts = {kind: 0 for kind in capacity}
    for _ in range(total):
        open_weighted = [k for k in capacity if weights.get(k, 0) > 0 and counts[k] < capacity[k]]
        if open_weighted:
            kind = min(open_weighted, key=lambda k: counts[k] / weights[k])
        else:
            kind = next(k for k in capacity if counts[k] < capacity[k])
        counts[kind] += 1
    return counts


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def length_stats(pairs: list[dict]) -> dict[str, float]:
    """Measure mean chosen and rejected length in whitespace tokens and characters."""
    stats = {
        "n": len(pairs),
        "chosen_tokens": mean(len(p["chosen"].split()) for p in pairs),
        "rejected_tokens": mean(len(p["rejected"].split()) for p in pairs),
        "chosen_chars": mean(len(p["chosen"]) for p in pairs),
        "rejected_chars": mean(len(p["rejected"]) for p in pairs),
        "chosen_longer_fraction": mean(float(len(p["chosen"]) > len(p["rejected"])) for p in pairs),
        "rejected_longer_fraction": mean(float(len(p["rejected"]) > len(p["chosen"])) for p in pairs),
    }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file in the target directory, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def jsonl_bytes(rows: Iterable[Mapping]) -> bytes:
    """Serialise rows as JSON Lines with sorted keys, so equal content gives equal bytes."""
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True) for row in rows]
    return ("\n".join(lines) + "\n" if lines else "").encode("utf-8")


def write_jsonl(path: Path, rows: Iterable[Mapping]) -> None:
    atomic_write_bytes(path, jsonl_bytes(rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
