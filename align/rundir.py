"""The run directory: config.json, metrics.jsonl, adapters, checkpoints and resuming.

Layout of `runs/<name>/`:

    config.json     resolved config, partition copy, package versions, coverage
    adapter/        PEFT adapter (`routed`: one subfolder per block)
    metrics.jsonl   one line per logging step
    eval.json       held-out preference accuracy per capability
    checkpoints/    Trainer checkpoints (`routed`: one subfolder per block)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from align.config import CONFIG_FILE, AlignConfig, AlignConfigError
from probe.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
# Settings that may change when a run is resumed: they do not affect the trained weights.
# `run_name` is compared as the resolved directory name, and `output_dir` may differ after the runs were moved.
RESUMABLE_CHANGES = frozenset({
    "resume", "report_to", "eval_heldout", "n_heldout", "device", "logging_steps", "output_dir", "run_name",
})
VERSIONED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "hieralign")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_directory(config: AlignConfig) -> Path:
    return Path(config.output_dir) / config.resolved_run_name


def check_run_directory(run_dir: Path, config: AlignConfig) -> None:
    """Reject a fresh run over an existing one, and a resume whose settings changed.

    Raises:
        AlignConfigError: If `run_dir` contains a run and `resume` is false, if
            `resume` is true and there is no run, or if a setting that
            affects training differs from the saved run.
    """
    saved_path = run_dir / CONFIG_FILE
    if not config.resume:
        if saved_path.exists():
            raise AlignConfigError(
                f"`run_name`: the run directory {run_dir} already contains a run; continue it with "
                f"`align --output-dir {config.output_dir} --run-name {config.resolved_run_name} --resume`, "
                "or choose another --run-name or --output-dir"
            )
        return
    if not saved_path.exists():
        raise AlignConfigError(
            f"`resume`: {run_dir} has no {CONFIG_FILE}, so there is no run to resume; check --output-dir and "
            "--run-name, or drop --resume"
        )

    saved = json.loads(saved_path.read_text(encoding="utf-8")).get("config", {})
    current = config.to_dict()
    changed = sorted(key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key])
    details = [f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in changed]
    saved_name = AlignConfig.from_dict(saved, source=str(saved_path)).resolved_run_name
    if saved_name != config.resolved_run_name:
        details.insert(0, f"run name: {saved_name!r} -> {config.resolved_run_name!r}")
    if details:
        raise AlignConfigError(
            f"`resume`: settings differ from the saved run in {run_dir} ({', '.join(details)}); drop those flags "
            "to resume with the saved settings, or start a new run with another --run-name"
        )


def write_run_config(run_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(run_dir / CONFIG_FILE, record)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_complete_checkpoint(directory: Path) -> Path | None:
    """Return the newest checkpoint that finished saving (it has trainer_state.json), or None.

    The Trainer writes a checkpoint's files one by one, so a process killed
    while saving can leave a newer checkpoint without its state; it is skipped.
    """
    if not directory.is_dir():
        return None
    candidates = sorted((p for p in directory.iterdir() if checkpoint_step(p) >= 0), key=checkpoint_step, reverse=True)
    for candidate in candidates:
        if (candidate / "trainer_state.json").is_file():
            return candidate
        logger.warning("skipping incomplete checkpoint %s (no trainer_state.json)", candidate)
    return None


def trim_metrics(path: Path, adapter: str, last_step: int) -> None:
    """Drop metrics lines of `adapter` after `last_step`, which a resumed run will log again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if record.get("adapter") == adapter and record.get("step", 0) > last_step:
            continue
        kept.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def save_adapter_atomically(peft_model: Any, target: Path, adapter_name: str) -> None:
    """Save one adapter as a standalone PEFT adapter directory and move it into place in one rename.

    The adapter is saved under PEFT's root name, so `PeftModel.from_pretrained(base, target)` loads it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(str(staging), selected_adapters=[adapter_name])
    nested = staging / adapter_name
    if adapter_name != "default" and nested.is_dir():
        # PEFT saves a non-default adapter in a subfolder named after it; lift it to the root.
        for item in nested.iterdir():
            os.replace(item, staging / item.name)
        nested.rmdir()
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
