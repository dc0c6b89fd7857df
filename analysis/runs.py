"""Read the run directories that `align` writes.

A run directory contains `config.json` (the resolved `AlignConfig`, a copy of
the partition, the model and the adapters) and one or more PEFT adapters. This
module turns it into a `RunInfo` and checks what the analysis needs, so every
other module can rely on the fields being there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probe.partition import Partition, PartitionError

logger = logging.getLogger(__name__)

DEFAULT_BETA = 0.1
CREATE_HINT = "create one with `align --output-dir runs --run-name <name>` (or `layer-report experiment`)"


class RunError(ValueError):
    """A run directory is missing or malformed: the message names the path and the fix."""


@dataclass(frozen=True)
class AdapterInfo:
    """One PEFT adapter of a run.

    Attributes:
        name: Adapter name ("default" for single-adapter strategies, else the block name).
        path: Absolute path of the adapter directory.
        blocks: Names of the partition blocks the adapter covers.
        layers: 0-based layer indices the adapter covers.
        capability: The capability the adapter was trained for, or None.
    """

    name: str
    path: Path
    blocks: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    capability: str | None = None


@dataclass
class RunInfo:
    """Settings and files of one run directory that the analysis reads.

    Attributes:
        path: The run directory.
        name: Directory name, used as the run label.
        strategy: Training strategy ("full", "local", "routed", ...), or "base".
        seed: Training seed, or None when not recorded.
        model_name: Model alias or id that `probe.models.load_model` accepts.
        num_layers: Number of decoder layers of the model.
        layers_path: Dotted path of the decoder layers, e.g. "model.layers".
        partition: The partition the run was trained with, or None.
        adapters: The run's adapters (empty for the base model).
        beta: DPO beta of the run, used for the implicit reward margin.
        config: The whole parsed `config.json`.
    """

    path: Path
    name: str
    strategy: str
    seed: int | None
    model_name: str
    num_layers: int
    layers_path: str
    partition: Partition | None
    adapters: list[AdapterInfo]
    beta: float = DEFAULT_BETA
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def adapted_layers(self) -> list[int]:
        """Sorted layer indices that any adapter of the run covers."""
        return sorted({layer for adapter in self.adapters for layer in adapter.layers})

    @property
    def target_capabilities(self) -> list[str]:
        """Capabilities the run was trained for, from its adapters, else from its blocks."""
        found = [adapter.capability for adapter in self.adapters if adapter.capability]
        if not found and self.partition is not None:
            blocks = {name for adapter in self.adapters for name in adapter.blocks}
            found = [block.capability for block in self.partition.blocks if block.name in blocks and block.capability]
        return sorted(set(found))

    @property
    def label(self) -> str:
        """The strategy name without the seed, so runs of several seeds pool under one label."""
        return self.strategy


def load_run(path: str | Path) -> RunInfo:
    """Parse and check a run directory.

    Args:
        path: A directory written by `align` (with `config.json` and `adapter/`).

    Raises:
        RunError: If the directory, `config.json` or an adapter is missing, or a
            required key is absent.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise RunError(f"run directory {str(path)!r} not found; {CREATE_HINT}")
    if not config_path.is_file():
        raise RunError(f"run directory {str(path)!r} has no config.json, so it is not an align run; {CREATE_HINT}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"{config_path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error

    model = require(config, "model", dict, config_path)
    model_name = require(model, "name", str, config_path, prefix="model.")
    num_layers = require(model, "num_layers", int, config_path, prefix="model.")
    run_config = config.get("config") or {}

    return RunInfo(
        path=path,
        name=path.name,
        strategy=str(config.get("strategy") or run_config.get("strategy") or "unknown"),
        seed=run_config.get("seed"),
        model_name=model_name,
        num_layers=num_layers,
        layers_path=str(model.get("layers_path") or "model.layers"),
        partition=parse_partition(config.get("partition"), config_path),
        adapters=parse_adapters(config.get("adapters"), path, config_path),
        beta=float(run_config.get("beta", DEFAULT_BETA)),
        config=config,
    )


def require(data: dict, key: str, kind: type, source: Path, prefix: str = "") -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RunError(f"{source}: `{prefix}{key}` must be a {kind.__name__}, got {value!r}; re-create the run with align")
    return value


def parse_partition(data: Any, source: Path) -> Partition | None:
    if data is None:
        return None
    try:
        return Partition.from_dict(data, source=f"{source} (partition)")
    except PartitionError as error:
        raise RunError(str(error)) from error


def parse_adapters(data: Any, run_path: Path, source: Path) -> list[AdapterInfo]:
    if not isinstance(data, list) or not data:
        raise RunError(f"{source}: `adapters` must be a non-empty list of adapter records; re-create the run with align")

    adapters = []
    for index, record in enumerate(data):
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise RunError(f"{source}: adapters[{index}] must be an object with a `path`, got {record!r}")
        adapter_dir = run_path / record["path"]
        if not (adapter_dir / "adapter_config.json").is_file():
            raise RunError(
                f"adapter directory {str(adapter_dir)!r} (adapters[{index}] of {source}) has no adapter_config.json; "
                "the run is incomplete, re-run align"
            )
        adapters.append(AdapterInfo(
            name=str(record.get("name") or "default"),
            path=adapter_dir,
            blocks=tuple(record.get("blocks") or ()),
            layers=tuple(int(layer) for layer in record.get("layers") or ()),
            capability=record.get("capability"),
        ))
    return adapters
