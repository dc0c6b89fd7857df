"""Tests of the user preference-data loader: formats, forms, and one test per validation error."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from probe.userdata import DataValidationError, load_preference_data

GOOD = {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _conversation(answer: str) -> list[dict]:
    return [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": answer}]


def test_userdata_loads_standard_jsonl(tmp_path):
    data = load_preference_data(_jsonl(tmp_path / "d.jsonl", [GOOD, {**GOOD, "capability": "logic"}]))
    assert data.form == "standard"
    assert [r["chosen"] for r in data.rows] == ["It is 4.", "It is 4."]
    assert data.rows[1]["capability"] == "logic"
    assert data.rows[0]["capability"] is None
    assert data.report["per_capability"] == {"syntax": 0, "logic": 1, "facts": 0, "unlabelled": 1}


def test_userdata_loads_csv(tmp_path):
    data = load_preference_data(_csv(tmp_path / "d.csv", [{**GOOD, "capability": "facts"}]))
    assert data.rows[0]["prompt"] == GOOD["prompt"]
    assert data.rows[0]["capability"] == "facts"


def test_userdata_loads_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD | {"chosen": "Four."}]), path)
    assert len(load_preference_data(str(path)).rows) == 2


def test_userdata_loads_saved_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD]).save_to_disk(str(tmp_path / "single"))
    assert load_preference_data(str(tmp_path / "single")).rows[0]["rejected"] == "It is 5."

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD]),
                                   "test": datasets.Dataset.from_list([GOOD | {"chosen": "Four."}])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_preference_data(str(tmp_path / "dict"), split="heldout").rows[0]["chosen"] == "Four."
    with pytest.raises(DataValidationError, match=r"no split named dev; available: \['test', 'train'\]"):
        load_preference_data(str(tmp_path / "dict"), split="dev")


def test_userdata_conversational_explicit_prompt(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Name a prime."}],
           "chosen": [{"role": "assistant", "content": "7"}], "rejected": [{"role": "assistant", "content": "8"}]}
    data = load_preference_data(_jsonl(tmp_path / "c.jsonl", [row]))
    assert data.form == "conversational"
    assert data.rows[0]["prompt"] == row["prompt"]


def test_userdata_conversational_implicit_prompt(tmp_path):
    row = {"chosen": _conversation("7"), "rejected": _conversation("8")}
    data = load_preference_data(_jsonl(tmp_path / "c.jsonl", [row]))
    assert data.rows[0]["prompt"] == [{"role": "user", "content": "Name a prime."}]
    assert data.rows[0]["chosen"] == [{"role": "assistant", "content": "7"}]


def test_userdata_mixed_form_becomes_conversational(tmp_path):
    row = {"prompt": [{"role": "user", "content": "Name a prime."}], "chosen": "7", "rejected": "8"}
    data = load_preference_data(_jsonl(tmp_path / "c.jsonl", [row]))
    assert data.rows[0]["rejected"] == [{"role": "assistant", "content": "8"}]


def test_userdata_conversational_csv_cells(tmp_path):
    row = {"chosen": json.dumps(_conversation("7")), "rejected": json.dumps(_conversation("8"))}
    data = load_preference_data(_csv(tmp_path / "c.csv", [row]))
    assert data.form == "conversational"


def test_userdata_rejects_missing_field(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "Q", "chosen": "A"}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 2, field `rejected`: missing\. "
                                                  r"Add a `rejected` value to every row\."):
        load_preference_data(path)


def test_userdata_rejects_missing_prompt(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"chosen": "A", "rejected": "B"}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 1, field `prompt`: missing\."):
        load_preference_data(path)


def test_userdata_rejects_empty_field(tmp_path):
    path = _csv(tmp_path / "bad.csv", [GOOD, GOOD, {**GOOD, "chosen": "   "}])
    with pytest.raises(DataValidationError, match=r"bad\.csv, row 3, field `chosen`: empty text\. "
                                                  r"Fill in the text or remove the row\."):
        load_preference_data(path)


def test_userdata_rejects_identical_answers(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{**GOOD, "rejected": GOOD["chosen"]}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 1, field `rejected`: identical to `chosen`\. "
                                                  r"Give a different rejected answer or remove the row\."):
        load_preference_data(path)


def test_userdata_rejects_non_text_value(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{**GOOD, "chosen": 4}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 1, field `chosen`: expected text or a list of "
                                                  r"messages, got int 4\. Store the field as a string\."):
        load_preference_data(path)


def test_userdata_rejects_binary_parquet_value(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["Q"], "chosen": [b"\xff\xfe"], "rejected": ["B"]}), path)
    with pytest.raises(DataValidationError, match=r"bad\.parquet, row 1, field `chosen`: invalid UTF-8 in a binary "
                                                  r"value\."):
        load_preference_data(str(path))


def test_userdata_rejects_invalid_utf8_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    good_line = json.dumps(GOOD).encode("utf-8")
    bad_line = b'{"prompt": "Q", "chosen": "caf\xe9", "rejected": "B"}'
    path.write_bytes(good_line + b"\n" + bad_line + b"\n")
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 2, field `chosen`: invalid UTF-8 at character 3\. "
                                                  r"Re-encode the file as UTF-8\."):
        load_preference_data(str(path))


def test_userdata_rejects_invalid_utf8_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,chosen,rejected\nQ,A,B\nQ,A,\xff\xfe\n")
    with pytest.raises(DataValidationError, match=r"bad\.csv, row 2, field `rejected`: invalid UTF-8 at character 0"):
        load_preference_data(str(path))


def test_userdata_rejects_unknown_capability(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{**GOOD, "capability": "grammar"}])
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 1, field `capability`: unknown capability "
                                                  r"'grammar'\. Use one of syntax, logic, facts, or leave it empty\."):
        load_preference_data(path)


def test_userdata_rejects_invalid_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 2: invalid JSON"):
        load_preference_data(str(path))


def test_userdata_rejects_bad_message(tmp_path):
    row = {"chosen": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "7"}],
           "rejected": _conversation("8")}
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 1, field `chosen`: unknown role 'bot' in "
                                                  r"message 1\. Use one of system, user, assistant, tool\."):
        load_preference_data(_jsonl(tmp_path / "bad.jsonl", [row]))


def test_userdata_rejects_mixed_forms_across_rows(tmp_path):
    row = {"chosen": _conversation("7"), "rejected": _conversation("8")}
    with pytest.raises(DataValidationError, match=r"bad\.jsonl, row 2, field `chosen`: conversational form, but "
                                                  r"earlier rows use the standard form\."):
        load_preference_data(_jsonl(tmp_path / "bad.jsonl", [GOOD, row]))


def test_userdata_rejects_unknown_suffix(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"bad\.txt: unknown file type \.txt"):
        load_preference_data(str(path))


def test_userdata_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        load_preference_data(str(tmp_path / "nope.jsonl"))


def test_userdata_unreachable_hub_name():
    # conftest sets HF_HUB_OFFLINE=1, so this fails without touching the network.
    with pytest.raises(DataValidationError, match=r"hieralign-test/no-such-dataset: not a local file or directory, "
                                                  r"and loading it from the Hugging Face Hub failed"):
        load_preference_data("hieralign-test/no-such-dataset")


def test_userdata_counts_over_length_rows(tmp_path, caplog):
    long_row = {**GOOD, "chosen": "x" * 200}
    data = load_preference_data(_jsonl(tmp_path / "d.jsonl", [GOOD, long_row]), max_length_chars=100)
    assert data.report["rows"] == 2
    assert len(data.rows) == 2
    assert data.report["over_length"] == 1
    assert data.report["over_length_rows"] == [2]
    assert "1 rows are longer than 100 characters (rows [2]); they are kept" in caplog.text


def test_userdata_reports_duplicates(tmp_path, caplog):
    data = load_preference_data(_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD | {"chosen": "4"}, GOOD]))
    assert data.report["duplicates"] == 1
    assert data.report["duplicate_rows"] == [[3, 1]]
    assert len(data.rows) == 3
    assert "1 duplicate rows ([row, first row]: [[3, 1]]); they are kept" in caplog.text
