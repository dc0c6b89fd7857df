"""The partition file: named contiguous blocks of decoder layers.

A *block* is a half-open range `[start, end)` of 0-based layer indices. A
*partition* is an ordered list of named blocks that covers `[0, num_layers)`
with no gap and no overlap. `probe-layers` writes it as `discovered.json`,
`align` reads it. Exports give PEFT keyword arguments, unfrozen-parameter
patterns and mergekit layer ranges, all naming the same layer sets.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from probe.io import write_json_atomic

SCHEMA_VERSION = 1
CONVENTION = "0-based layer index; blocks are half-open [start, end)"
CAPABILITIES = ("syntax", "logic", "facts")
THIRDS_NAMES = ("local", "intermediate", "global")
THIRDS_CAPABILITIES = ("syntax", "logic", "facts")


class PartitionError(ValueError):
    """A partition is malformed: the message names the value and the fix."""


@dataclass(frozen=True)
class Block:
    """A named block of layers `[start, end)`.

    Attributes:
        name: Unique block name, e.g. "local".
        start: First layer, 0-based, inclusive.
        end: One past the last layer.
        capability: The capability whose signal peaks inside the block, or None.
        stability: Bootstrap stability in [0, 1], or None when not measured.
        attribution_mass: Share of the DPO gradient attribution that falls in
            the block, in [0, 1], or None when not measured.
    """

    name: str
    start: int
    end: int
    capability: str | None = None
    stability: float | None = None
    attribution_mass: float | None = None

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Partition:
    """An ordered list of blocks that covers every decoder layer once.

    Construct with `Partition(...)` and call `validate()`, or use `thirds()`,
    `from_dict()` or `load()`, which validate.
    """

    num_layers: int
    blocks: list[Block]
    model: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    signals: dict[str, Any] = field(default_factory=dict)
    created_by: str = ""

    # -- construction -------------------------------------------------------

    @classmethod
    def thirds(cls, num_layers: int, model: dict[str, Any] | None = None) -> "Partition":
        """Build the equal-thirds preset (local, intermediate, global) by position.

        When `num_layers` is not divisible by 3, the middle block takes the
        extra layers, so `local` and `global` keep the same size.
        """
        if num_layers < 3:
            raise PartitionError(f"the thirds preset needs at least 3 layers, got num_layers={num_layers}")
        outer = num_layers // 3
        bounds = [0, outer, num_layers - outer, num_layers]
        blocks = [
            Block(name, bounds[i], bounds[i + 1], capability)
            for i, (name, capability) in enumerate(zip(THIRDS_NAMES, THIRDS_CAPABILITIES))
        ]
        partition = cls(num_layers, blocks, dict(model or {}), {"preset": "thirds"})
        partition.validate()
        return partition

    @classmethod
    def from_ranges(cls, num_layers: int, ranges: list[tuple[int, int]], names: list[str] | None = None) -> "Partition":
        names = names or [f"block{i}" for i in range(len(ranges))]
        partition = cls(num_layers, [Block(n, s, e) for n, (s, e) in zip(names, ranges)])
        partition.validate()
        return partition

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "partition") -> "Partition":
        """Parse and validate a partition dictionary (the JSON file's content)."""
        if not isinstance(data, dict):
            raise PartitionError(f"{source}: a partition must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PartitionError(
                f"{source}: `schema_version` must be {SCHEMA_VERSION}, got {version!r}; "
                "regenerate the file with probe-layers"
            )
        model = data.get("model") or {}
        num_layers = model.get("num_layers")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise PartitionError(f"{source}: `model.num_layers` must be a positive integer, got {num_layers!r}")
        raw_blocks = data.get("blocks")
        if not isinstance(raw_blocks, list) or not raw_blocks:
            raise PartitionError(f"{source}: `blocks` must be a non-empty list, got {raw_blocks!r}")

        blocks = [parse_block(raw, index, source) for index, raw in enumerate(raw_blocks)]
        partition = cls(
            num_layers, blocks, dict(model), dict(data.get("method") or {}),
            dict(data.get("signals") or {}), str(data.get("created_by", "")),
        )
        partition.validate(source)
        return partition

    @classmethod
    def load(cls, path: str | Path, expected_num_layers: int | None = None) -> "Partition":
        """Read and validate a partition file.

        Args:
            path: The JSON file.
            expected_num_layers: The layer count of the model it will be used
                with; a mismatch is an error.
        """
        path = Path(path)
        if not path.is_file():
            raise PartitionError(
                f"partition file {str(path)!r} not found; create one with `probe-layers --out {path}` "
                "or use the preset `--partition thirds`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PartitionError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
        partition = cls.from_dict(data, source=str(path))
        if expected_num_layers is not None:
            partition.check_num_layers(expected_num_layers, source=str(path))
        return partition

    # -- validation ---------------------------------------------------------

    def validate(self, source: str = "partition") -> None:
        """Check coverage, order and names; raise `PartitionError` naming the first problem."""
        names = [block.name for block in self.blocks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise PartitionError(f"{source}: block names must be unique, got duplicates {duplicates}; rename them")

        for block in self.blocks:
            if block.end <= block.start:
                raise PartitionError(
                    f"{source}: block {block.name!r} is empty: `end` must be greater than `start`, "
                    f"got start={block.start} and end={block.end}"
                )
            if block.start < 0 or block.end > self.num_layers:
                raise PartitionError(
                    f"{source}: block {block.name!r} [{block.start}, {block.end}) is outside the model's "
                    f"layers [0, {self.num_layers}); indices are 0-based and `end` is exclusive"
                )

        starts = [block.start for block in self.blocks]
        if starts != sorted(starts):
            raise PartitionError(f"{source}: blocks must be sorted by `start`, got starts {starts}; reorder them")

        expected_start = 0
        for block in self.blocks:
            if block.start > expected_start:
                raise PartitionError(
                    f"{source}: layers [{expected_start}, {block.start}) belong to no block (gap before "
                    f"{block.name!r}); every layer must be in exactly one block"
                )
            if block.start < expected_start:
                raise PartitionError(
                    f"{source}: block {block.name!r} starts at {block.start} and overlaps the previous block, "
                    f"which ends at {expected_start}; blocks must not overlap"
                )
            expected_start = block.end
        if expected_start != self.num_layers:
            raise PartitionError(
                f"{source}: layers [{expected_start}, {self.num_layers}) belong to no block; the last block "
                f"must end at num_layers={self.num_layers}"
            )

        for block in self.blocks:
            if block.capability is not None and block.capability not in CAPABILITIES:
                raise PartitionError(
                    f"{source}: block {block.name!r} has unknown capability {block.capability!r}; "
                    f"use one of {', '.join(CAPABILITIES)} or null"
                )

    def check_num_layers(self, num_layers: int, source: str = "partition") -> None:
        if num_layers != self.num_layers:
            model_name = self.model.get("name", "another model")
            raise PartitionError(
                f"{source}: the partition covers {self.num_layers} layers (made for {model_name}), but the "
                f"model has {num_layers}; re-run probe-layers on this model or use `--partition thirds`"
            )

    # -- access -------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [block.name for block in self.blocks]

    def block(self, name: str) -> Block:
        for block in self.blocks:
            if block.name == name:
                return block
        raise PartitionError(f"no block named {name!r}; this partition has blocks {', '.join(self.names)}")

    def layers_of(self, names: list[str]) -> list[int]:
        """Return the sorted layer indices of the named blocks."""
        return sorted({layer for name in names for layer in self.block(name).layers})

    def block_of_layer(self, layer: int) -> Block:
        for block in self.blocks:
            if block.start <= layer < block.end:
                return block
        raise PartitionError(f"layer {layer} is outside [0, {self.num_layers})")

    # -- exports ------------------------------------------------------------

    def peft_kwargs(self, names: list[str], layers_pattern: str | None = None) -> dict[str, Any]:
        """Return `LoraConfig` keyword arguments that restrict LoRA to the named blocks.

        Args:
            names: Block names.
            layers_pattern: The name of the layer list attribute ("layers",
                "h"); PEFT needs it when the model's module names are ambiguous.
        """
        kwargs: dict[str, Any] = {"layers_to_transform": self.layers_of(names)}
        pattern = layers_pattern or self.model.get("layers_path", "").rsplit(".", 1)[-1]
        if pattern:
            kwargs["layers_pattern"] = pattern
        return kwargs

    def unfrozen_patterns(self, names: list[str], layers_path: str | None = None) -> list[str]:
        """Return parameter-name regexes that match exactly the named blocks' layers."""
        path = (layers_path or self.model.get("layers_path") or "model.layers").replace(".", r"\.")
        return [rf"(^|\.){path}\.{layer}\." for layer in self.layers_of(names)]

    def mergekit_ranges(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Return mergekit-style slices, `layer_range` half-open like ours, one per block."""
        chosen = names or self.names
        model_name = self.model.get("hf_id") or self.model.get("source") or self.model.get("name", "")
        return [{"model": model_name, "layer_range": [self.block(n).start, self.block(n).end]} for n in chosen]

    # -- serialisation ------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        model = {**self.model, "num_layers": self.num_layers}
        return {
            "schema_version": SCHEMA_VERSION,
            "model": model,
            "convention": CONVENTION,
            "blocks": [{k: v for k, v in asdict(block).items() if v is not None or k == "capability"} for block in self.blocks],
            "method": self.method,
            "signals": self.signals,
            "created_by": self.created_by,
        }

    def save(self, path: str | Path) -> None:
        """Validate and write the partition atomically."""
        self.validate()
        write_json_atomic(path, self.to_dict())

    def describe(self) -> list[str]:
        """Describe each block in one line: name, layer range, size, capability, stability."""
        lines = []
        for block in self.blocks:
            stability = f"{block.stability:.2f}" if block.stability is not None else "n/a"
            lines.append(
                f"{block.name:<14} layers [{block.start:>2}, {block.end:>2})  {len(block):>2} layers  "
                f"capability={block.capability or '-':<7} stability={stability}"
            )
        return lines


def parse_block(raw: Any, index: int, source: str) -> Block:
    if not isinstance(raw, dict):
        raise PartitionError(f"{source}: blocks[{index}] must be an object with name, start and end, got {raw!r}")
    missing = [key for key in ("name", "start", "end") if key not in raw]
    if missing:
        raise PartitionError(f"{source}: blocks[{index}] is missing {', '.join(missing)}; each block needs name, start, end")
    for key in ("start", "end"):
        value = raw[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise PartitionError(f"{source}: blocks[{index}].{key} must be an integer layer index, got {value!r}")
    if not isinstance(raw["name"], str) or not raw["name"].strip():
        raise PartitionError(f"{source}: blocks[{index}].name must be a non-empty string, got {raw['name']!r}")
    return Block(
        raw["name"], raw["start"], raw["end"], raw.get("capability"),
        optional_float(raw.get("stability")), optional_float(raw.get("attribution_mass")),
    )


def optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def resolve_partition(spec: str, num_layers: int, model: dict[str, Any] | None = None) -> Partition:
    """Turn a `--partition` value into a validated partition for a model of `num_layers` layers.

    Args:
        spec: "thirds" for the equal-thirds preset, or a partition JSON file.
        num_layers: Layer count of the model the partition will be used with.
        model: Model metadata to record in a preset partition.
    """
    if spec == "thirds":
        return Partition.thirds(num_layers, model)
    return Partition.load(spec, expected_num_layers=num_layers)
