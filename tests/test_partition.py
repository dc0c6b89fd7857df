"""Partition schema: validation messages, presets, exports."""

from __future__ import annotations

import json
import re

import pytest

from probe.partition import Block, Partition, PartitionError, resolve_partition


def partition_dict(blocks, num_layers=6, **extra):
    data = {"schema_version": 1, "model": {"name": "tiny", "num_layers": num_layers, "layers_path": "model.layers"},
            "blocks": blocks}
    data.update(extra)
    return data


GOOD = [{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 2, "end": 6}]


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([{"name": "b", "start": 2, "end": 6}, {"name": "a", "start": 0, "end": 2}],
         "blocks must be sorted by `start`, got starts [2, 0]"),
        ([{"name": "a", "start": 0, "end": 3}, {"name": "b", "start": 2, "end": 6}],
         "block 'b' starts at 2 and overlaps the previous block, which ends at 3"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 3, "end": 6}],
         "layers [2, 3) belong to no block (gap before 'b')"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 2, "end": 2}, {"name": "c", "start": 2, "end": 6}],
         "block 'b' is empty: `end` must be greater than `start`, got start=2 and end=2"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 2, "end": 7}],
         "block 'b' [2, 7) is outside the model's layers [0, 6)"),
        ([{"name": "a", "start": -1, "end": 2}, {"name": "b", "start": 2, "end": 6}],
         "block 'a' [-1, 2) is outside the model's layers [0, 6)"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "a", "start": 2, "end": 6}],
         "block names must be unique, got duplicates ['a']"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 2, "end": 5}],
         "layers [5, 6) belong to no block; the last block must end at num_layers=6"),
        ([{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": "2", "end": 6}],
         "blocks[1].start must be an integer layer index, got '2'"),
        ([{"name": "a", "start": 0}], "blocks[0] is missing end"),
        ([{"name": "a", "start": 0, "end": 6, "capability": "math"}], "block 'a' has unknown capability 'math'"),
    ],
)
def test_partition_rejects_bad_blocks(blocks, message):
    with pytest.raises(PartitionError, match=re.escape(message)):
        Partition.from_dict(partition_dict(blocks))


def test_partition_rejects_wrong_schema_version():
    with pytest.raises(PartitionError, match=r"`schema_version` must be 1, got 2; regenerate"):
        Partition.from_dict(partition_dict(GOOD, schema_version=2))


def test_partition_rejects_layer_count_mismatch(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(partition_dict(GOOD)))
    with pytest.raises(PartitionError, match=r"covers 6 layers \(made for tiny\), but the model has 30"):
        Partition.load(path, expected_num_layers=30)


def test_partition_load_reports_json_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 1,\n "blocks": [}')
    with pytest.raises(PartitionError, match=r"invalid JSON at line 2"):
        Partition.load(path)


def test_partition_missing_file_suggests_fix(tmp_path):
    with pytest.raises(PartitionError, match=r"not found; create one with `probe-layers --out .*`--partition thirds`"):
        Partition.load(tmp_path / "nope.json")


@pytest.mark.parametrize("num_layers", [3, 4, 5, 18, 30, 32])
def test_thirds_preset_covers_every_layer(num_layers):
    partition = Partition.thirds(num_layers)
    assert partition.names == ["local", "intermediate", "global"]
    assert partition.blocks[0].start == 0
    assert partition.blocks[-1].end == num_layers
    assert len(partition.blocks[0]) == len(partition.blocks[2]) == num_layers // 3
    assert sum(len(block) for block in partition.blocks) == num_layers


def test_thirds_preset_rejects_two_layers():
    with pytest.raises(PartitionError, match=r"at least 3 layers, got num_layers=2"):
        Partition.thirds(2)


def test_partition_round_trips_through_file(tmp_path):
    partition = Partition.thirds(30, {"name": "smollm2", "layers_path": "model.layers"})
    partition.blocks[0] = Block("local", 0, 10, "syntax", 0.9, 0.25)
    path = tmp_path / "discovered.json"
    partition.save(path)
    loaded = Partition.load(path, expected_num_layers=30)
    assert loaded.blocks == partition.blocks
    assert json.loads(path.read_text())["convention"].startswith("0-based")


def test_exports_name_the_same_layers():
    partition = Partition.from_ranges(12, [(0, 3), (3, 8), (8, 12)], ["local", "intermediate", "global"])
    partition.model = {"name": "m", "source": "org/m", "layers_path": "model.layers"}
    peft = partition.peft_kwargs(["intermediate", "global"])
    assert peft == {"layers_to_transform": list(range(3, 12)), "layers_pattern": "layers"}

    patterns = [re.compile(p) for p in partition.unfrozen_patterns(["intermediate", "global"])]
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)]
    unfrozen = [i for i, name in enumerate(names) if any(p.search(name) for p in patterns)]
    assert unfrozen == peft["layers_to_transform"]
    assert not any(p.search("model.layers.1.mlp.weight") for p in patterns)

    ranges = partition.mergekit_ranges(["intermediate", "global"])
    merged = sorted(i for r in ranges for i in range(*r["layer_range"]))
    assert merged == peft["layers_to_transform"]
    assert ranges[0]["model"] == "org/m"


def test_unknown_block_name_lists_names():
    partition = Partition.thirds(9)
    with pytest.raises(PartitionError, match=r"no block named 'middle'; this partition has blocks local, intermediate, global"):
        partition.block("middle")


def test_resolve_partition_thirds_and_file(tmp_path):
    assert resolve_partition("thirds", 9).names == ["local", "intermediate", "global"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(partition_dict(GOOD)))
    assert resolve_partition(str(path), 6).names == ["a", "b"]
