"""Load and validate the user's own preference data for DPO.

Accepted inputs: a JSONL (or JSON array) file, a CSV file, a Parquet file, a directory written by
`datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`), or a Hugging Face Hub dataset name
when the hub is reachable.

Accepted row forms, following TRL's preference formats:

- standard: `prompt`, `chosen`, `rejected` are strings;
- conversational: each is a list of `{"role", "content"}` messages. Without a `prompt` column, the
  prompt is the longest common prefix of the `chosen` and `rejected` conversations (implicit prompt).
- mixed: a conversational prompt with string answers (or the reverse) becomes conversational.

An optional `capability` column assigns rows to `syntax`, `logic` or `facts`. In CSV files,
conversational fields are JSON-encoded lists in the cells.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.data.common import CAPABILITIES

logger = logging.getLogger(__name__)

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
FILE_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
HELDOUT_SPLIT_NAMES = ("heldout", "test", "validation")
_REPORT_ROW_LIMIT = 20


class DataValidationError(ValueError):
    """Preference data failed validation; the message names the file, the 1-based row and the field."""


@dataclass
class PreferenceData:
    """Validated preference rows and a report of what was counted along the way.

    Attributes:
        rows: Dicts with `prompt`, `chosen`, `rejected` (all strings, or all message lists),
            `capability` (str or None), `id` and `source`.
        report: Counts: `rows`, `duplicates`, `over_length`, `per_capability`, plus the row
            numbers of the first duplicates and over-length rows.
        form: `standard` or `conversational`.
    """

    rows: list[dict]
    report: dict
    form: str
    source: str = ""
    warnings: list[str] = field(default_factory=list)


def _fail(source: str, row: int, name: str, problem: str, fix: str) -> DataValidationError:
    return DataValidationError(f"{source}, row {row}, field `{name}`: {problem}. {fix}")


# ---------------------------------------------------------------------------------------------
# Readers: each returns (row number, raw dict) pairs, row numbers 1-based.


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise DataValidationError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}. "
                                      "Fix the syntax, or write one JSON object per line (JSONL).") from error
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DataValidationError(f"{path}, row {number}: invalid JSON ({error.msg} at column {error.colno}). "
                                      "Write one JSON object per line.") from error
    return rows


def _parse_cell(value: str) -> Any:
    """Decode a CSV cell that contains a JSON list of messages; leave any other text unchanged."""
    stripped = value.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _read_csv(path: Path) -> list[tuple[int, Any]]:
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for number, record in enumerate(reader, start=1):
        rows.append((number, {k: _parse_cell(v) for k, v in record.items() if k is not None and v is not None}))
    return rows


def _read_parquet(path: Path) -> list[tuple[int, Any]]:
    import pyarrow.parquet as pq

    return list(enumerate(pq.read_table(path).to_pylist(), start=1))


def _select_split(dataset: Any, split: str | None, source: str) -> Any:
    """Pick one split of a `DatasetDict`; `heldout` also matches `test` and `validation`."""
    if not hasattr(dataset, "keys"):
        return dataset
    wanted = [split or "train"]
    if wanted[0] == "heldout":
        wanted = list(HELDOUT_SPLIT_NAMES)
    for name in wanted:
        if name in dataset:
            return dataset[name]
    raise DataValidationError(f"{source}: no split named {' or '.join(wanted)}; available: {sorted(dataset.keys())}. "
                              "Pass one of them as the split.")


def _read_saved_dataset(path: Path, split: str | None) -> list[tuple[int, Any]]:
    import datasets

    dataset = _select_split(datasets.load_from_disk(str(path)), split, str(path))
    return list(enumerate(dataset.to_list(), start=1))


def _read_hub(name: str, split: str | None) -> list[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types for an unreachable hub
        raise DataValidationError(
            f"{name}: not a local file or directory, and loading it from the Hugging Face Hub failed "
            f"({type(error).__name__}: {error}). Check the path, or where the hub is unreachable, save the data "
            "as JSONL, CSV, Parquet or with `Dataset.save_to_disk` and pass that path."
        ) from error
    dataset = _select_split(dataset, split, name)
    return list(enumerate(dataset.to_list(), start=1))


def read_raw_rows(path_or_name: str, split: str | None = None) -> list[tuple[int, Any]]:
    """Read rows from a file, a saved `datasets` directory or a hub dataset, without validation.

    Raises:
        FileNotFoundError: If the argument has a data-file suffix but no such file exists.
        DataValidationError: If the file cannot be parsed or a hub dataset cannot be loaded.
    """
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES and not path.exists():
        raise FileNotFoundError(f"{path}: no such file. Check the path.")
    if path.is_file():
        kind = FILE_SUFFIXES.get(suffix)
        if kind is None:
            raise DataValidationError(f"{path}: unknown file type {suffix or '(none)'}; use "
                                      f"{', '.join(sorted(FILE_SUFFIXES))} or a saved `datasets` directory.")
        return {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind](path)
    return _read_hub(path_or_name, split)


# ---------------------------------------------------------------------------------------------
# Validation of one row.


def _check_text(value: str, source: str, row: int, name: str, what: str = "") -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _fail(source, row, name, f"invalid UTF-8{what} at character {error.start}",
                    "Re-encode the file as UTF-8.") from error
    if not value.strip():
        raise _fail(source, row, name, f"empty text{what}", "Fill in the text or remove the row.")


def _check_messages(value: list, source: str, row: int, name: str) -> None:
    if not value:
        raise _fail(source, row, name, "empty message list", "Give at least one {\"role\", \"content\"} message.")
    for index, message in enumerate(value):
        where = f" in message {index}"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise _fail(source, row, name, f"invalid message{where}: expected a dict with a string `content`",
                        "Write each message as {\"role\": ..., \"content\": \"...\"}.")
        if message.get("role") not in MESSAGE_ROLES:
            raise _fail(source, row, name, f"unknown role {message.get('role')!r}{where}",
                        f"Use one of {', '.join(MESSAGE_ROLES)}.")
        _check_text(message["content"], source, row, name, where)


def _check_field(record: dict, name: str, source: str, row: int) -> str | list:
    if name not in record or record[name] is None:
        raise _fail(source, row, name, "missing", f"Add a `{name}` value to every row.")
    value = record[name]
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _fail(source, row, name, "invalid UTF-8 in a binary value", "Store the field as UTF-8 text.") from error
        raise _fail(source, row, name, "binary value, expected text", "Store the field as a string column.")
    if isinstance(value, str):
        _check_text(value, source, row, name)
    elif isinstance(value, list):
        _check_messages(value, source, row, name)
    else:
        raise _fail(source, row, name, f"expected text or a list of messages, got {type(value).__name__} {value!r}",
                    "Store the field as a string.")
    return value


def _common_prefix(chosen: list, rejected: list) -> int:
    length = 0
    while length < min(len(chosen), len(rejected)) and chosen[length] == rejected[length]:
        length += 1
    return length


def _split_implicit_prompt(chosen: list, rejected: list, source: str, row: int) -> tuple[list, list, list]:
    """Extract the shared leading messages of two conversations as the prompt, as TRL does."""
    shared = _common_prefix(chosen, rejected)
    if shared == 0:
        raise _fail(source, row, "prompt", "missing, and `chosen` and `rejected` share no leading messages",
                    "Add a `prompt` column, or start both conversations with the same prompt messages.")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _as_messages(value: str | list, role: str) -> list:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _normalise_row(record: Any, source: str, row: int) -> tuple[str | list, str | list, str | list]:
    """Validate one row and return (prompt, chosen, rejected) in a single form."""
    if not isinstance(record, dict):
        raise DataValidationError(f"{source}, row {row}: expected an object with `prompt`, `chosen` and "
                                  f"`rejected`, got {type(record).__name__}. Write one object per row.")
    chosen = _check_field(record, "chosen", source, row)
    rejected = _check_field(record, "rejected", source, row)
    if record.get("prompt") is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, source, row)
    else:
        prompt = _check_field(record, "prompt", source, row)
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        prompt = _as_messages(prompt, "user")
        chosen, rejected = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
    if not chosen or not rejected:
        raise _fail(source, row, "chosen" if not chosen else "rejected", "empty after the shared prompt",
                    "Give each conversation at least one answer message after the prompt.")
    if _text_of(chosen).strip() == _text_of(rejected).strip():
        raise _fail(source, row, "rejected", "identical to `chosen`",
                    "Give a different rejected answer or remove the row.")
    return prompt, chosen, rejected


def _check_capability(record: dict, source: str, row: int) -> str | None:
    value = record.get("capability")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str) or value.strip() not in CAPABILITIES:
        raise _fail(source, row, "capability", f"unknown capability {value!r}",
                    f"Use one of {', '.join(CAPABILITIES)}, or leave it empty.")
    return value.strip()


def _text_of(value: str | list) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


# ---------------------------------------------------------------------------------------------
# Whole-file checks and the public loader.


def _report(rows: list[dict], source: str, form: str, max_length_chars: int | None) -> dict:
    """Count rows, duplicates and over-length rows; neither kind of row is removed."""
    first_seen: dict[str, int] = {}
    duplicates, over_length = [], []
    per_capability = {name: 0 for name in (*CAPABILITIES, "unlabelled")}
    for row in rows:
        number = row["row"]
        key = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True, ensure_ascii=False)
        if key in first_seen:
            duplicates.append([number, first_seen[key]])
        else:
            first_seen[key] = number
        length = len(_text_of(row["prompt"])) + max(len(_text_of(row["chosen"])), len(_text_of(row["rejected"])))
        if max_length_chars is not None and length > max_length_chars:
            over_length.append(number)
        per_capability[row["capability"] or "unlabelled"] += 1
    return {
        "source": source,
        "form": form,
        "rows": len(rows),
        "duplicates": len(duplicates),
        "duplicate_rows": duplicates[:_REPORT_ROW_LIMIT],
        "max_length_chars": max_length_chars,
        "over_length": len(over_length),
        "over_length_rows": over_length[:_REPORT_ROW_LIMIT],
        "per_capability": per_capability,
    }


def _warnings(report: dict) -> list[str]:
    messages = []
    if report["duplicates"]:
        messages.append(f"{report['source']}: {report['duplicates']} duplicate rows ([row, first row]: "
                        f"{report['duplicate_rows']}); they are kept. Remove them to avoid weighting those pairs twice.")
    if report["over_length"]:
        messages.append(f"{report['source']}: {report['over_length']} rows are longer than {report['max_length_chars']} "
                        f"characters (rows {report['over_length_rows']}); they are kept and the trainer truncates "
                        "them. Shorten them or raise the limit.")
    return messages


def load_preference_data(path_or_name: str, *, max_length_chars: int | None = None,
                         split: str | None = None) -> PreferenceData:
    """Load preference pairs, validate every row and report duplicates and over-length rows.

    Args:
        path_or_name: A `.jsonl`, `.json`, `.csv` or `.parquet` file, a saved `datasets` directory,
            or a Hugging Face Hub dataset name.
        max_length_chars: Length limit in characters of prompt plus the longer answer; longer rows
            are counted in the report and kept.
        split: Split of a saved `DatasetDict` or hub dataset (default `train`; `heldout` also
            matches `test` and `validation`). Ignored for single files.

    Raises:
        DataValidationError: On the first invalid row, naming the file, the 1-based row and the field.
        FileNotFoundError: If a file path does not exist.
    """
    if max_length_chars is not None and max_length_chars < 1:
        raise ValueError(f"`max_length_chars` must be a positive integer or None, got {max_length_chars}.")
    source = str(path_or_name)
    raw = read_raw_rows(path_or_name, split)
    if not raw:
        raise DataValidationError(f"{source}: no rows found. Check that the file contains preference data.")

    rows, form = [], None
    for number, record in raw:
        prompt, chosen, rejected = _normalise_row(record, source, number)
        row_form = "conversational" if isinstance(chosen, list) else "standard"
        if form is not None and row_form != form:
            raise _fail(source, number, "chosen", f"{row_form} form, but earlier rows use the {form} form",
                        "Use one form for all rows.")
        form = row_form
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "capability": _check_capability(record, source, number),
                     "id": f"{Path(source).name}:{number}", "source": source, "row": number})

    report = _report(rows, source, form, max_length_chars)
    messages = _warnings(report)
    for message in messages:
        logger.warning(message)
    for row in rows:
        del row["row"]
    return PreferenceData(rows=rows, report=report, form=form, source=source, warnings=messages)

