"""Turn `--strategy` / `--blocks` into the adapters a run trains."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from align.config import AlignConfig, AlignConfigError
from align.data import data_spec_for_capability
from align.lora import DEFAULT_ADAPTER
from probe.partition import Partition


@dataclass(frozen=True)
class AdapterPlan:
    """One adapter of a run.

    Attributes:
        name: PEFT adapter name: "default" for single strategies, the block name for `routed`.
        blocks: Names of the blocks it adapts.
        layers: Sorted layer indices of those blocks.
        capability: The capability it is trained on (`routed`), else None.
        data: The data spec it is trained on.
        path: Adapter directory relative to the run directory.
        checkpoints: Checkpoint directory relative to the run directory.
    """

    name: str
    blocks: list[str]
    layers: list[int]
    capability: str | None
    data: str
    path: str
    checkpoints: str

    def to_record(self) -> dict:
        """The entry of config.json's `adapters` list."""
        record = asdict(self)
        del record["checkpoints"], record["data"]
        return record


def check_block_names(partition: Partition, names: list[str], flag: str) -> None:
    unknown = [name for name in names if name not in partition.names]
    if unknown:
        raise AlignConfigError(
            f"`{flag}`: no block named {unknown[0]!r} in the partition; its blocks are {', '.join(partition.names)}"
        )


def plan_adapters(partition: Partition, config: AlignConfig) -> tuple[str, list[AdapterPlan]]:
    """Return the resolved strategy name and the adapters to train, in training order.

    Raises:
        AlignConfigError: For an unknown strategy or block name, or a `routed`
            block without a capability.
    """
    if config.strategy == "routed":
        names = config.blocks or partition.names
        check_block_names(partition, names, "blocks")
        return "routed", [routed_adapter(partition, name, config) for name in names]

    if config.blocks:
        check_block_names(partition, config.blocks, "blocks")
        strategy, names = "blocks", list(config.blocks)
    elif config.strategy == "full":
        strategy, names = "full", partition.names
    elif config.strategy in partition.names:
        strategy, names = config.strategy, [config.strategy]
    else:
        raise AlignConfigError(
            f"`strategy` must be full, routed or a block of the partition ({', '.join(partition.names)}), "
            f"got {config.strategy!r}"
        )
    capabilities = {partition.block(name).capability for name in names}
    capability = capabilities.pop() if len(capabilities) == 1 else None
    plan = AdapterPlan(DEFAULT_ADAPTER, names, partition.layers_of(names), capability, config.data, "adapter", "checkpoints")
    return strategy, [plan]


def routed_adapter(partition: Partition, name: str, config: AlignConfig) -> AdapterPlan:
    block = partition.block(name)
    if block.capability is None:
        raise AlignConfigError(
            f"`strategy` routed trains each block on its capability's pairs, but block {name!r} has no capability "
            "in the partition; set its `capability` (syntax, logic or facts) or pick blocks with --blocks"
        )
    data = data_spec_for_capability(config.data, block.capability)
    return AdapterPlan(name, [name], block.layers, block.capability, data, f"adapter/{name}", f"checkpoints/{name}")
