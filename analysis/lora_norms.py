"""Norms of the weight update that a trained LoRA adapter applies.

For an adapted module with LoRA factors A of shape (r, d_in) and B of shape
(d_out, r), PEFT adds delta W = scaling * B @ A to the frozen weight, with
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (`use_rslora`). The rank r
and alpha of each module come from `adapter_config.json`, where `rank_pattern`
and `alpha_pattern` override the defaults per module.

Everything here is computed from delta W itself, never from the norms of A and
B: PEFT initialises A randomly and B to zero, so the sum of factor norms is
large before any training while the update is exactly zero.

The singular values of delta W come from the r x r core of two thin QR
decompositions, so the cost grows with r, not with d_out * d_in.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from safetensors import safe_open

from analysis.runs import RunInfo, load_run
from probe.partition import Partition

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# Suffixes of the saved LoRA factors, as (A key, B key). Embedding LoRA stores
# A as (r, num_embeddings) and B as (embedding_dim, r), so B @ A is transposed
# against the embedding matrix. The norms do not depend on that orientation.
FACTOR_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))
METRICS = ("frobenius", "relative", "stable_rank")
# Column order of the layer table: attention, then MLP, in the order data flows
# through a Llama or GPT-2 layer. Other module names follow alphabetically.
MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "gate_proj", "up_proj", "down_proj", "c_fc")


@dataclass(frozen=True)
class ModuleNorm:
    """The update one adapted module applies.

    Attributes:
        adapter: Name of the adapter the module belongs to.
        module: Module name in the base model, e.g. "model.layers.3.self_attn.q_proj".
        layer: 0-based decoder layer index, or None for modules outside the layers.
        module_type: Module path inside the layer, e.g. "self_attn.q_proj".
        rank: LoRA rank r of the module.
        alpha: LoRA alpha of the module.
        scaling: alpha / r, or alpha / sqrt(r) with rsLoRA.
        frobenius: Frobenius norm of delta W = scaling * B @ A.
        spectral: Largest singular value of delta W.
        stable_rank: ||delta W||_F^2 / ||delta W||_2^2, in [1, r]; 0.0 when delta W is zero.
        base_frobenius: Frobenius norm of the frozen weight, or None when not available.
    """

    adapter: str
    module: str
    layer: int | None
    module_type: str
    rank: int
    alpha: float
    scaling: float
    frobenius: float
    spectral: float
    stable_rank: float
    base_frobenius: float | None = None

    @property
    def relative(self) -> float | None:
        """||delta W||_F / ||W||_F, or None without the frozen weight."""
        if self.base_frobenius is None or self.base_frobenius == 0.0:
            return None
        return self.frobenius / self.base_frobenius


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """Return the factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def match_pattern(patterns: Mapping[str, float], module: str) -> float | None:
    """Return the value of the first pattern key that matches the end of `module`, or None.

    A key matches when `module` equals it or ends with "." + key, and keys may
    be regular expressions: the rule PEFT 0.21 applies to `rank_pattern` and
    `alpha_pattern`.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def module_rank_alpha(adapter_config: Mapping, module: str) -> tuple[int, float]:
    """Return the configured (r, alpha) of one module, with `rank_pattern` and `alpha_pattern` applied."""
    rank = match_pattern(adapter_config.get("rank_pattern") or {}, module)
    alpha = match_pattern(adapter_config.get("alpha_pattern") or {}, module)
    return int(rank if rank is not None else adapter_config["r"]), float(alpha if alpha is not None else adapter_config["lora_alpha"])


def update_matrix(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Return delta W = scaling * B @ A in float64.

    Args:
        lora_a: A, shape (r, d_in).
        lora_b: B, shape (d_out, r).
        scaling: LoRA scaling factor.

    Returns:
        delta W, shape (d_out, d_in). GPT-2's `Conv1D` stores its weight
        transposed, as (d_in, d_out); transpose before adding it there.
    """
    return scaling * (lora_b.double() @ lora_a.double())


def update_singular_values(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> np.ndarray:
    """Return the singular values of scaling * B @ A without forming it.

    With thin QR decompositions B = Q_b R_b and A^T = Q_a R_a, B @ A equals
    Q_b (R_b R_a^T) Q_a^T, whose singular values are those of the r x r core.

    Args:
        lora_a: A, shape (r, d_in).
        lora_b: B, shape (d_out, r).
        scaling: LoRA scaling factor.

    Returns:
        Singular values in descending order, float64 array of shape (r,) when
        r <= min(d_in, d_out). All zeros when B or A is zero.
    """
    _, r_b = torch.linalg.qr(lora_b.double())
    _, r_a = torch.linalg.qr(lora_a.double().T)
    core = scaling * (r_b @ r_a.T)
    return torch.linalg.svdvals(core).numpy()


def module_location(module: str, layers_path: str) -> tuple[int | None, str]:
    """Split a module name into (layer index, module path inside the layer).

    "model.layers.3.self_attn.q_proj" with layers path "model.layers" gives
    (3, "self_attn.q_proj"). A module outside the decoder layers, such as
    "lm_head", gives (None, its full name).
    """
    match = re.match(rf"^(?:.*\.)?{re.escape(layers_path)}\.(\d+)\.(.+)$", module)
    if match is None:
        return None, module
    return int(match.group(1)), match.group(2)


def read_adapter_factors(adapter_dir: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read `adapter_config.json` and the LoRA factors of every module.

    Returns:
        The adapter config, and a map from module name (without PEFT's
        "base_model.model." prefix) to (A, B), shapes (r, d_in) and (d_out, r).
    """
    config_path = adapter_dir / ADAPTER_CONFIG
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is not a saved PEFT adapter: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(write one with `PeftModel.save_pretrained`)"
        )
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: only LoRA adapters are supported, got peft_type={adapter_config['peft_type']!r}")

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(weights_path), framework="pt") as handle:
        keys = set(handle.keys())
        for key in sorted(keys):
            for a_suffix, b_suffix in FACTOR_SUFFIXES:
                if not key.endswith(a_suffix):
                    continue
                b_key = key[: -len(a_suffix)] + b_suffix
                if b_key not in keys:
                    raise ValueError(f"{weights_path}: {key} has no matching {b_key}; the adapter file is incomplete")
                module = key[: -len(a_suffix)].removeprefix(PEFT_PREFIX)
                factors[module] = (handle.get_tensor(key), handle.get_tensor(b_key))
    if not factors:
        raise ValueError(f"{weights_path} contains no LoRA factors (no keys ending in .lora_A.weight)")
    return adapter_config, factors


def adapter_update_norms(
    adapter_dir: str | Path,
    *,
    layers_path: str = "model.layers",
    base_norms: Mapping[str, float] | None = None,
    adapter_name: str = "default",
) -> list[ModuleNorm]:
    """Compute the update norms of every module of one saved LoRA adapter.

    Args:
        adapter_dir: Directory with `adapter_config.json` and `adapter_model.safetensors`.
        layers_path: Dotted path of the decoder layers, to find each module's layer.
        base_norms: Frobenius norm of each frozen weight, keyed by module name
            (see `base_weight_norms`); without it `relative` is None.
        adapter_name: Name recorded in each `ModuleNorm`.

    Returns:
        One `ModuleNorm` per adapted module, sorted by layer and module name.
    """
    adapter_dir = Path(adapter_dir)
    adapter_config, factors = read_adapter_factors(adapter_dir)
    use_rslora = bool(adapter_config.get("use_rslora", False))
    if adapter_config.get("use_dora"):
        # NOTE: DoRA rescales W + delta W by a learned magnitude vector; that rescaling is not included here.
        logger.warning("%s uses DoRA: the norms cover scaling * B @ A only, not the magnitude rescaling", adapter_dir)

    norms = []
    for module, (lora_a, lora_b) in factors.items():
        rank, alpha = module_rank_alpha(adapter_config, module)
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise ValueError(
                f"{adapter_dir}: module {module} has factors of rank {lora_a.shape[0]}, but its config gives r={rank}; "
                "the adapter files do not belong together"
            )
        scaling = lora_scaling(alpha, rank, use_rslora)
        norms.append(module_norm(adapter_name, module, layers_path, rank, alpha, scaling, lora_a, lora_b, base_norms))
    return sorted(norms, key=lambda norm: (norm.layer if norm.layer is not None else -1, norm.module))


def module_norm(
    adapter: str, module: str, layers_path: str, rank: int, alpha: float, scaling: float,
    lora_a: torch.Tensor, lora_b: torch.Tensor, base_norms: Mapping[str, float] | None,
) -> ModuleNorm:
    singular_values = update_singular_values(lora_a, lora_b, scaling)
    frobenius = float(np.sqrt(np.sum(singular_values**2)))
    spectral = float(singular_values.max()) if singular_values.size else 0.0
    stable_rank = frobenius**2 / spectral**2 if spectral > 0.0 else 0.0
    layer, module_type = module_location(module, layers_path)
    base = None if base_norms is None else base_norms.get(module)
    return ModuleNorm(adapter, module, layer, module_type, rank, alpha, scaling, frobenius, spectral, stable_rank, base)


def base_weight_norms(state_dict: Mapping[str, torch.Tensor], modules: list[str]) -> dict[str, float]:
    """Return the Frobenius norm of each module's frozen weight.

    Args:
        state_dict: State dict of the base model (keys like "model.layers.0.self_attn.q_proj.weight").
        modules: Module names as `read_adapter_factors` returns them.

    Returns:
        Norms keyed by module name. Modules whose weight is not in
        `state_dict` are left out, with a warning.
    """
    norms = {}
    for module in modules:
        weight = state_dict.get(f"{module}.weight")
        if weight is None:
            weight = state_dict.get(f"{module}.base_layer.weight")
        if weight is None:
            logger.warning("no frozen weight %s.weight in the base state dict; its relative norm is left empty", module)
            continue
        norms[module] = float(torch.linalg.matrix_norm(weight.detach().double(), ord="fro"))
    return norms


def load_base_state_dict(run: RunInfo) -> dict[str, torch.Tensor]:
    """Load the base model named in the run's config.json and return its state dict."""
    from probe.models import load_model

    loaded = load_model(run.model_name, layers_path=run.layers_path)
    return loaded.model.state_dict()


def run_update_norms(
    run: RunInfo | str | Path,
    *,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
    load_base: bool = True,
) -> list[ModuleNorm]:
    """Compute the update norms of every adapter of a run.

    Args:
        run: A run directory or its parsed `RunInfo`.
        base_state_dict: State dict of the base model, for relative norms.
        load_base: Load the base model from config.json when `base_state_dict`
            is None. With False and no state dict, `relative` is None.

    Returns:
        `ModuleNorm`s of all adapters of the run.
    """
    run = run if isinstance(run, RunInfo) else load_run(run)
    if base_state_dict is None and load_base:
        base_state_dict = load_base_state_dict(run)

    norms: list[ModuleNorm] = []
    for adapter in run.adapters:
        _, factors = read_adapter_factors(adapter.path)
        base_norms = base_weight_norms(base_state_dict, list(factors)) if base_state_dict is not None else None
        norms += adapter_update_norms(adapter.path, layers_path=run.layers_path, base_norms=base_norms, adapter_name=adapter.name)
    return norms


@dataclass
class LayerTable:
    """Update norms laid out as a layer x module-type grid.

    Attributes:
        name: Run label.
        num_layers: Number of decoder layers.
        module_types: Column names, e.g. ["self_attn.q_proj", "self_attn.v_proj"].
        values: Per metric ("frobenius", "relative", "stable_rank") a float64
            array of shape (num_layers, len(module_types)); NaN marks a cell
            that no adapter covers ("not adapted"), never an untrained zero.
        layer_frobenius: Frobenius norm of the whole layer's update, the square
            root of the summed squared module norms, shape (num_layers,); NaN
            for layers without an adapter.
        layer_relative: Layer update norm over the frozen norm of the same
            modules, shape (num_layers,); NaN where unknown.
        partition: Partition to draw boundaries from, or None.
    """

    name: str
    num_layers: int
    module_types: list[str]
    values: dict[str, np.ndarray]
    layer_frobenius: np.ndarray
    layer_relative: np.ndarray
    partition: Partition | None = None
    outside_layers: list[ModuleNorm] = field(default_factory=list)

    @property
    def adapted(self) -> np.ndarray:
        """Boolean mask of adapted cells, shape (num_layers, len(module_types))."""
        return ~np.isnan(self.values["frobenius"])

    @property
    def adapted_layers(self) -> list[int]:
        return [int(layer) for layer in np.flatnonzero(self.adapted.any(axis=1))]

    def to_dict(self) -> dict:
        """Plain-JSON form: NaN ("not adapted") becomes null."""
        def cells(array: np.ndarray) -> list:
            return [[None if np.isnan(value) else float(value) for value in row] for row in np.atleast_2d(array)]

        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "module_types": self.module_types,
            "convention": "rows are 0-based layers; null means not adapted",
            "values": {metric: cells(array) for metric, array in self.values.items()},
            "layer_frobenius": cells(self.layer_frobenius[None, :])[0],
            "layer_relative": cells(self.layer_relative[None, :])[0],
            "adapted_layers": self.adapted_layers,
        }


def layer_table(
    norms: list[ModuleNorm],
    num_layers: int,
    *,
    name: str = "",
    module_types: list[str] | None = None,
    partition: Partition | None = None,
) -> LayerTable:
    """Aggregate module norms into a layer x module-type table.

    Args:
        norms: Output of `run_update_norms` or `adapter_update_norms`.
        num_layers: Number of decoder layers of the model.
        name: Run label.
        module_types: Column order; defaults to the module types in `norms`,
            ordered by `order_module_types`. Pass `shared_module_types` of
            several runs to line their tables up.
        partition: Partition recorded with the table for plotting.

    Raises:
        ValueError: If a module's layer index is outside [0, num_layers).
    """
    inside = [norm for norm in norms if norm.layer is not None]
    outside = [norm for norm in norms if norm.layer is None]
    if outside:
        logger.info("%d adapted modules lie outside the decoder layers and are not in the layer table", len(outside))
    columns = module_types if module_types is not None else order_module_types(norm.module_type for norm in inside)
    column_of = {module_type: index for index, module_type in enumerate(columns)}

    values = {metric: np.full((num_layers, len(columns)), np.nan) for metric in METRICS}
    base_squared = np.full((num_layers, len(columns)), np.nan)
    for norm in inside:
        if not 0 <= norm.layer < num_layers:
            raise ValueError(f"module {norm.module} is in layer {norm.layer}, outside the model's layers [0, {num_layers})")
        cell = (norm.layer, column_of[norm.module_type])
        if not np.isnan(values["frobenius"][cell]):
            # Two adapters of a routed run cover the same module; they are alternatives, not a sum.
            logger.warning("module %s is adapted by more than one adapter; the table keeps the larger update", norm.module)
            if norm.frobenius <= values["frobenius"][cell]:
                continue
        values["frobenius"][cell] = norm.frobenius
        values["stable_rank"][cell] = norm.stable_rank
        values["relative"][cell] = np.nan if norm.relative is None else norm.relative
        base_squared[cell] = np.nan if norm.base_frobenius is None else norm.base_frobenius**2

    layer_frobenius, layer_relative = layer_totals(values["frobenius"], base_squared)
    return LayerTable(name, num_layers, columns, values, layer_frobenius, layer_relative, partition, outside)


def layer_totals(frobenius: np.ndarray, base_squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Combine module norms per layer: sqrt of summed squares, and its ratio to the frozen norm.

    Args:
        frobenius: Module update norms, shape (num_layers, n_types), NaN where not adapted.
        base_squared: Squared frozen-weight norms, same shape, NaN where unknown.

    Returns:
        Layer update norms and relative layer norms, each shape (num_layers,), NaN for layers without an adapter.
    """
    adapted = ~np.isnan(frobenius)
    any_adapted = adapted.any(axis=1)
    totals = np.sqrt(np.nansum(frobenius**2, axis=1))
    totals[~any_adapted] = np.nan

    base_known = (adapted & ~np.isnan(base_squared)).sum(axis=1) == adapted.sum(axis=1)
    base_totals = np.sqrt(np.nansum(np.where(adapted, base_squared, np.nan), axis=1))
    relative = np.full_like(totals, np.nan)
    usable = any_adapted & base_known & (base_totals > 0)
    relative[usable] = totals[usable] / base_totals[usable]
    return totals, relative


def order_module_types(module_types: Iterable[str]) -> list[str]:
    """Return the distinct module types, attention before MLP (see `MODULE_ORDER`), others alphabetically."""
    def key(module_type: str) -> tuple[int, str]:
        leaf = module_type.rsplit(".", 1)[-1]
        rank = MODULE_ORDER.index(leaf) if leaf in MODULE_ORDER else len(MODULE_ORDER)
        return rank, module_type

    return sorted(set(module_types), key=key)


def shared_module_types(norm_lists: list[list[ModuleNorm]]) -> list[str]:
    """Return the union of module types over several runs, ordered by `order_module_types`."""
    return order_module_types(norm.module_type for norms in norm_lists for norm in norms if norm.layer is not None)
