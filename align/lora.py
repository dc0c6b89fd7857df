"""LoRA restricted to blocks of a partition, and a read-back check of what PEFT adapted.

`build_lora_config` turns a partition and the chosen block names into a PEFT
`LoraConfig` that names the layers explicitly (`layers_to_transform`), with
optional per-block ranks (`rank_pattern`, `alpha_pattern`). `check_coverage`
walks the wrapped model afterwards and compares the adapted layers, ranks and
alphas with the request, so a pattern that silently matched too much or too
little stops the run before training.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from align.config import AlignConfig, AlignConfigError
from probe.layers import LayerStack
from probe.partition import Partition

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "default"


class CoverageError(RuntimeError):
    """The adapted modules differ from the requested layers, ranks or alphas."""


def default_target_modules(stack: LayerStack) -> list[str]:
    """Return the names of every linear layer inside the first decoder layer (attention and MLP).

    GPT-2 style models use `Conv1D` instead of `nn.Linear`; both count.
    """
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in stack.layers[0].named_modules()
        if name and isinstance(module, (nn.Linear, Conv1D))
    }
    if not names:
        raise AlignConfigError(
            f"`target_modules`: no linear layer found in {stack.path}.0; pass the module names with --target-modules"
        )
    return sorted(names)


def block_scales(partition: Partition, block_names: list[str]) -> dict[str, float]:
    """Return each block's attribution mass divided by the mean mass of the chosen blocks.

    Raises:
        AlignConfigError: If a chosen block has no `attribution_mass` or all masses are 0.
    """
    masses = {}
    for name in block_names:
        mass = partition.block(name).attribution_mass
        if mass is None:
            raise AlignConfigError(
                f"`rank_by`: block {name!r} has no attribution_mass in the partition; run probe-layers with the "
                "attribution signal, or drop --rank-by"
            )
        masses[name] = float(mass)
    mean = sum(masses.values()) / len(masses)
    if mean <= 0:
        raise AlignConfigError(f"`rank_by`: the chosen blocks' attribution masses are all 0 ({masses}); drop --rank-by")
    return {name: mass / mean for name, mass in masses.items()}


def layer_ranks(
    partition: Partition, block_names: list[str], config: AlignConfig, *, scale_over: list[str] | None = None
) -> dict[int, tuple[int, float]]:
    """Return the requested (rank, alpha) of every adapted layer.

    With `rank_by="attribution"` a block's rank is `lora_r` times its scale
    (at least 1) and its alpha keeps the ratio `lora_alpha / lora_r`, so the
    update scale is unchanged and only the capacity follows the data.
    `scale_over` names the blocks whose mean mass is the unit (default:
    `block_names`); `routed` passes all its blocks, because each of its
    adapters covers one block.
    """
    uniform = (config.lora_r, float(config.lora_alpha))
    if config.rank_by != "attribution":
        return {layer: uniform for layer in partition.layers_of(block_names)}

    scales = block_scales(partition, scale_over or block_names)
    ranks: dict[int, tuple[int, float]] = {}
    for name in block_names:
        rank = max(1, round(config.lora_r * scales[name]))
        alpha = config.lora_alpha * rank / config.lora_r
        for layer in partition.block(name).layers:
            ranks[layer] = (rank, alpha)
    return ranks


def layer_group_pattern(layers_path: str, layers: list[int]) -> str:
    """Regex for PEFT's `rank_pattern` that matches every module inside the given layers."""
    indices = "|".join(str(layer) for layer in sorted(layers))
    return rf"{re.escape(layers_path)}\.(?:{indices})\..*"


def build_lora_config(
    partition: Partition, strategy_blocks: list[str], stack: LayerStack, config: AlignConfig,
    *, scale_over: list[str] | None = None,
) -> LoraConfig:
    """Build a `LoraConfig` that adapts only the layers of `strategy_blocks`.

    Args:
        partition: The validated partition.
        strategy_blocks: Names of the blocks this adapter covers.
        stack: The model's decoder layers (for the module path and `layers_pattern`).
        config: LoRA rank, alpha, dropout, target modules and `rank_by`.
        scale_over: Blocks whose mean attribution mass is the unit of `rank_by` (default: `strategy_blocks`).
    """
    targets = config.target_modules or default_target_modules(stack)
    ranks = layer_ranks(partition, strategy_blocks, config, scale_over=scale_over)

    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    if config.rank_by == "attribution":
        for name in strategy_blocks:
            rank, alpha = ranks[partition.block(name).start]
            pattern = layer_group_pattern(stack.path, partition.block(name).layers)
            rank_pattern[pattern] = rank
            alpha_pattern[pattern] = alpha

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        layers_to_transform=partition.layers_of(strategy_blocks),
        layers_pattern=stack.layers_pattern,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        # GPT-2 style Conv1D layers store the weight transposed, which PEFT must know.
        fan_in_fan_out=uses_conv1d(stack, targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def uses_conv1d(stack: LayerStack, targets: list[str]) -> bool:
    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, module in stack.layers[0].named_modules()
    )


# ---------------------------------------------------------------------------
# Read-back check


@dataclass
class CoverageReport:
    """The LoRA modules of one adapter, read back from the wrapped model.

    Attributes:
        adapter: The adapter name checked.
        layers: Sorted indices of the decoder layers that contain a LoRA module.
        modules: Layer index -> sorted module names (relative to the layer) with LoRA.
        ranks: Layer index -> (rank, alpha) found there.
        trainable_params: Layer index -> number of trainable LoRA parameters.
        total_trainable: Trainable parameters in the whole model.
    """

    adapter: str
    layers: list[int]
    modules: dict[int, list[str]] = field(default_factory=dict)
    ranks: dict[int, tuple[int, float]] = field(default_factory=dict)
    trainable_params: dict[int, int] = field(default_factory=dict)
    total_trainable: int = 0

    def by_block(self, partition: Partition) -> list[dict[str, Any]]:
        """Summarise per block: adapted layers, module count, rank, alpha and trainable parameters."""
        rows = []
        for block in partition.blocks:
            layers = [layer for layer in block.layers if layer in self.modules]
            ranks = sorted({self.ranks[layer] for layer in layers})
            rows.append({
                "block": block.name,
                "layers": layers,
                "modules": sum(len(self.modules[layer]) for layer in layers),
                "rank": ranks[0][0] if len(ranks) == 1 else [rank for rank, _ in ranks] or None,
                "alpha": ranks[0][1] if len(ranks) == 1 else [alpha for _, alpha in ranks] or None,
                "trainable_params": sum(self.trainable_params.get(layer, 0) for layer in layers),
            })
        return rows

    def to_dict(self, partition: Partition | None = None) -> dict[str, Any]:
        data = asdict(self)
        data["modules"] = {str(k): v for k, v in self.modules.items()}
        data["ranks"] = {str(k): list(v) for k, v in self.ranks.items()}
        data["trainable_params"] = {str(k): v for k, v in self.trainable_params.items()}
        if partition is not None:
            data["blocks"] = self.by_block(partition)
        return data

    def describe(self, partition: Partition) -> list[str]:
        lines = []
        for row in self.by_block(partition):
            if not row["layers"]:
                lines.append(f"{row['block']:<14} frozen")
                continue
            lines.append(
                f"{row['block']:<14} layers [{row['layers'][0]}, {row['layers'][-1] + 1})  {row['modules']:>3} LoRA modules  "
                f"r={row['rank']} alpha={row['alpha']}  {row['trainable_params']:,} trainable parameters"
            )
        return lines


def layer_index(module_name: str, layers_path: str) -> int | None:
    """Return the decoder layer index in a (possibly PEFT-prefixed) module name, or None outside the layers."""
    match = re.search(rf"(?:^|\.){re.escape(layers_path)}\.(\d+)(?:\.|$)", module_name)
    return int(match.group(1)) if match is not None else None


def expected_value(value: int | float | Mapping[int, Any], layer: int) -> Any:
    return value[layer] if isinstance(value, Mapping) else value


def check_coverage(
    peft_model: nn.Module,
    expected_layers: list[int],
    r: int | Mapping[int, int],
    alpha: float | Mapping[int, float],
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    layers_path: str | None = None,
) -> CoverageReport:
    """Read back the LoRA modules of `adapter_name` and compare them with the request.

    Args:
        peft_model: The PEFT-wrapped model.
        expected_layers: Layer indices that must be adapted, and no others.
        r: Requested rank, for every layer or per layer index.
        alpha: Requested alpha, for every layer or per layer index.
        adapter_name: The adapter to check.
        layers_path: Dotted path of the decoder layers (default: resolved from the model).

    Raises:
        CoverageError: If the adapted layer set differs, a module has another
            rank or alpha, a LoRA module sits outside the decoder layers, or
            parameters other than this adapter's LoRA weights are trainable.
    """
    if layers_path is None:
        from probe.layers import resolve_layers

        layers_path = resolve_layers(peft_model).path

    report = collect_lora_modules(peft_model, adapter_name, layers_path)
    problems = []
    expected = sorted(set(expected_layers))
    if report.layers != expected:
        problems.append(
            f"adapted layers {report.layers} differ from the requested layers {expected} "
            f"(missing {sorted(set(expected) - set(report.layers))}, extra {sorted(set(report.layers) - set(expected))})"
        )
    for layer, (found_r, found_alpha) in sorted(report.ranks.items()):
        if layer not in expected:
            continue
        want_r, want_alpha = expected_value(r, layer), float(expected_value(alpha, layer))
        if found_r != want_r or abs(found_alpha - want_alpha) > 1e-9:
            problems.append(f"layer {layer} has r={found_r}, alpha={found_alpha}; requested r={want_r}, alpha={want_alpha}")

    lora_total = sum(report.trainable_params.values())
    if report.total_trainable != lora_total:
        others = [
            name for name, param in peft_model.named_parameters()
            if param.requires_grad and not (f".{adapter_name}." in name and layer_index(name, layers_path) is not None)
        ]
        problems.append(
            f"{report.total_trainable - lora_total} trainable parameters are not LoRA weights of adapter "
            f"{adapter_name!r} in the decoder layers: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
        )
    problems.extend(report_outside(peft_model, adapter_name, layers_path))

    if problems:
        raise CoverageError("LoRA coverage check failed: " + "; ".join(problems))
    return report


def collect_lora_modules(peft_model: nn.Module, adapter_name: str, layers_path: str) -> CoverageReport:
    modules: dict[int, list[str]] = {}
    ranks: dict[int, set[tuple[int, float]]] = {}
    params: dict[int, int] = {}
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        layer = layer_index(name, layers_path)
        if layer is None:
            continue
        prefix = re.search(rf"{re.escape(layers_path)}\.{layer}\.", name)
        modules.setdefault(layer, []).append(name[prefix.end():] if prefix else name)
        ranks.setdefault(layer, set()).add((int(module.r[adapter_name]), float(module.lora_alpha[adapter_name])))
        params[layer] = params.get(layer, 0) + sum(
            p.numel() for part in (module.lora_A[adapter_name], module.lora_B[adapter_name])
            for p in part.parameters() if p.requires_grad
        )

    # Within one layer every module must agree; record the mixed set so the check reports it.
    flat_ranks: dict[int, tuple[int, float]] = {}
    for layer, found in ranks.items():
        flat_ranks[layer] = sorted(found)[0] if len(found) == 1 else (-1, -1.0)
    total = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return CoverageReport(
        adapter_name, sorted(modules), {k: sorted(v) for k, v in sorted(modules.items())}, flat_ranks, params, total
    )


def report_outside(peft_model: nn.Module, adapter_name: str, layers_path: str) -> list[str]:
    """List LoRA modules of the adapter that sit outside the decoder layers (for example on lm_head)."""
    outside = [
        name for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A and layer_index(name, layers_path) is None
    ]
    return [f"LoRA modules outside {layers_path}: {', '.join(outside)}"] if outside else []
