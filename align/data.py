"""Training pairs for `align`: the capability suite or a user file, as a `datasets.Dataset` for TRL."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from align.config import AlignConfig, AlignConfigError

logger = logging.getLogger(__name__)

SUITE_PREFIX = "suite:"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def data_spec_for_capability(spec: str, capability: str) -> str:
    """Return the data spec that trains a `routed` adapter on one capability.

    Suite specs become `suite:<capability>`; a user file stays as it is and is
    filtered by its `capability` column later.
    """
    if not spec.startswith(SUITE_PREFIX):
        return spec
    if spec not in (f"{SUITE_PREFIX}all", f"{SUITE_PREFIX}{capability}"):
        logger.warning(
            "--strategy routed trains each adapter on its block's capability, so --data %s is replaced by "
            "suite:%s for this adapter; pass --data suite:all to silence this warning", spec, capability,
        )
    return f"{SUITE_PREFIX}{capability}"


def load_pairs(spec: str, config: AlignConfig, *, capability: str | None = None, split: str = "train") -> list[dict[str, Any]]:
    """Load preference pairs from a data spec, optionally only those of one capability.

    Args:
        spec: `suite:<capability>`, `suite:all`, or a JSONL/CSV/Parquet file or HF dataset directory.
        config: Supplies the suite seed and sizes.
        capability: Keep only rows whose `capability` is this value (user files need that column).
        split: "train" or "heldout".

    Raises:
        AlignConfigError: If no pair is left, or a user file lacks the `capability` column needed by `routed`.
        probe.suite.DataValidationError: For a malformed user file (names the file, row and field).
    """
    from probe.suite import load_data_spec

    rows = load_data_spec(spec, split, seed=config.seed, n_train=config.n_train, n_heldout=config.n_heldout)
    if capability is not None and not spec.startswith(SUITE_PREFIX):
        if rows and all(row.get("capability") is None for row in rows):
            raise AlignConfigError(
                f"`data`: {spec} has no `capability` values, which --strategy routed needs to give each block its "
                f"own pairs; add a `capability` column (syntax, logic or facts) or use --data suite:all"
            )
        rows = [row for row in rows if row.get("capability") == capability]
    if not rows:
        which = f" with capability {capability!r}" if capability is not None else ""
        raise AlignConfigError(f"`data`: {spec} has no {split} pairs{which}; check the file or the spec")
    return rows


def to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """Keep the columns TRL's DPOTrainer reads (prompt, chosen, rejected) and build a `Dataset`."""
    return Dataset.from_list([{column: row[column] for column in PAIR_COLUMNS} for row in rows])
