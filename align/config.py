"""The `align` run configuration and its command-line flags.

`AlignConfig` is the single source of truth: every field becomes a `--flag`
(`lora_r` -> `--lora-r`), a JSON file passed with `--config` sets any subset of
fields, and explicit flags override the file. The resolved config is saved in
every run directory as `config.json`.
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

RANK_BY_CHOICES = ("attribution", "attribution-lr")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")
REPORT_TO_CHOICES = ("none", "tensorboard", "wandb", "trackio", "mlflow", "all")
SINGLE_STRATEGIES = ("full", "routed")
# The file in every run directory that stores the resolved config.
CONFIG_FILE = "config.json"

# Loss types accepted by TRL 1.16's `DPOConfig.loss_type`.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)


class AlignConfigError(ValueError):
    """An `align` setting is invalid: the message names the setting, the rule and the fix."""


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """Declare a config field with its help text (the `--help` line of its flag)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class AlignConfig:
    """Settings of one `align` run: model, partition, strategy, data, LoRA and DPO options."""

    # What to train
    model: str = setting("smollm2", "Model alias (smollm2, tiny-llama, ...), local directory or HF hub id.")
    partition: str = setting("thirds", "Partition: `thirds` (equal thirds by position) or a partition JSON file from probe-layers.")
    strategy: str = setting(
        "global",
        "Which layers get LoRA: `full` (every layer), `routed` (one adapter per block, each trained on its "
        "block's capability data), or a block name of the partition (local, intermediate, global, ...).",
    )
    blocks: list[str] | None = setting(
        None, "Comma-separated block names that share one adapter; overrides a block-name --strategy. "
        "With --strategy routed, the blocks that get their own adapter.",
    )
    data: str = setting(
        "suite:all", "Training pairs: suite:syntax, suite:logic, suite:facts, suite:all, or a JSONL, CSV or "
        "Parquet file or HF dataset directory with prompt, chosen and rejected columns.",
    )
    merge_adapter: bool = setting(
        False, "If --model already carries a PEFT adapter, merge it into the base weights before training "
        "instead of rejecting the model.",
    )

    # Where to write
    output_dir: str = setting("runs", "Directory that holds run directories.")
    run_name: str | None = setting(None, "Run directory name under --output-dir (default: <model>-<strategy>-s<seed>).")
    resume: bool = setting(False, "Continue an interrupted run from its last checkpoint in <run>/checkpoints.")

    # Optimisation
    seed: int = setting(
        0, "Random seed of adapter initialisation, data order and the suite's sampling, edits and wrong answers "
        "(the suite's train/held-out split does not depend on it).",
    )
    max_steps: int = setting(50, "Optimizer steps per adapter.")
    learning_rate: float = setting(1e-4, "Peak AdamW learning rate (linear decay to 0).")
    beta: float = setting(0.1, "DPO beta: the strength of the KL penalty towards the reference model.")
    loss_type: str = setting("sigmoid", f"DPO loss type of TRL: {', '.join(LOSS_TYPES)}.")
    per_device_batch_size: int = setting(4, "Preference pairs per device per micro-batch.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated per optimizer step.")
    max_length: int = setting(512, "Maximum prompt + completion length in tokens; longer sequences keep their start.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass to save memory (non-reentrant).")

    # LoRA
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = setting(0.0, "Dropout probability on the LoRA input.")
    target_modules: list[str] | None = setting(
        None, "Comma-separated module names to adapt (default: every linear layer of the attention and MLP, "
        "found in the first decoder layer).",
    )
    rank_by: str | None = setting(
        None, "Scale each block by its attribution mass from the partition: `attribution` scales the LoRA "
        "rank (alpha / r kept), `attribution-lr` the learning rate. Default: uniform.",
        choices=RANK_BY_CHOICES,
    )

    # Model loading
    dtype: str = setting("float32", "Parameter dtype.", choices=DTYPE_CHOICES)
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (CUDA when available). Ignored under accelerate launch.")
    layers_path: str | None = setting(None, "Dotted path of the decoder layer list, overriding the resolver (e.g. model.layers).")

    # Logging, checkpoints, evaluation
    report_to: str = setting("none", "Experiment tracker of transformers (none, tensorboard, wandb, ...).")
    logging_steps: int = setting(5, "Optimizer steps between lines of metrics.jsonl.")
    save_steps: int = setting(25, "Optimizer steps between checkpoints (for --resume).")
    n_train: int = setting(300, "Training pairs per capability drawn from the suite.")
    n_heldout: int = setting(100, "Held-out pairs per capability for eval.json.")
    eval_heldout: bool = setting(True, "Write eval.json: held-out preference accuracy per capability after training.")
    dpo_args: dict[str, Any] = setting(
        {}, "Further TRL DPOConfig options as KEY=VALUE (VALUE parsed as JSON when it parses), e.g. "
        "--dpo-arg warmup_steps=5. May be repeated.",
    )

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_run_name(self) -> str:
        """The run directory name: `run_name`, else `<model>-<strategy>-s<seed>` with unsafe characters replaced."""
        if self.run_name:
            return self.run_name
        strategy = "+".join(self.blocks) if self.blocks and self.strategy != "routed" else self.strategy
        raw = f"{Path(self.model).name if '/' in self.model else self.model}-{strategy}-s{self.seed}"
        return "".join(char if char.isalnum() or char in "._+-" else "_" for char in raw)

    def validate(self) -> None:
        """Check each setting; raise `AlignConfigError` naming the first invalid one."""
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "lora_r",
                     "logging_steps", "save_steps", "n_train", "n_heldout"):
            require(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        require(self.max_length >= 2, "max_length", "must be at least 2 tokens", self.max_length)
        require(self.learning_rate > 0, "learning_rate", "must be positive", self.learning_rate)
        require(self.beta > 0, "beta", "must be positive", self.beta)
        require(self.lora_alpha > 0, "lora_alpha", "must be positive", self.lora_alpha)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)", self.lora_dropout)
        require(bool(self.strategy.strip()), "strategy", "must not be empty; use full, routed or a block name", self.strategy)
        require(bool(self.model.strip()), "model", "must not be empty", self.model)
        require(self.loss_type in LOSS_TYPES, "loss_type", f"must be one of {', '.join(LOSS_TYPES)}", self.loss_type)
        require(self.dtype in DTYPE_CHOICES, "dtype", f"must be one of {', '.join(DTYPE_CHOICES)}", self.dtype)
        require(self.rank_by is None or self.rank_by in RANK_BY_CHOICES, "rank_by",
                f"must be one of {', '.join(RANK_BY_CHOICES)} or unset", self.rank_by)
        require(self.blocks is None or len(self.blocks) > 0, "blocks", "must name at least one block", self.blocks)
        require(not (self.blocks and self.strategy == "full"), "blocks",
                "cannot be combined with --strategy full, which adapts every layer; drop one of them", self.blocks)
        if self.blocks is not None:
            duplicates = sorted({name for name in self.blocks if self.blocks.count(name) > 1})
            require(not duplicates, "blocks", "must not repeat a block", self.blocks)
        if self.run_name is not None:
            require(bool(self.run_name.strip()) and "/" not in self.run_name and self.run_name not in (".", ".."),
                    "run_name", "must be a non-empty directory name without '/'", self.run_name)
        require(isinstance(self.dpo_args, dict), "dpo_args", "must be a mapping of DPOConfig option to value", self.dpo_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "AlignConfig":
        """Build a config from a mapping; an unknown key is an error that names it."""
        if not isinstance(data, dict):
            raise AlignConfigError(f"{source}: the config must be a JSON object, got {type(data).__name__}")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AlignConfigError(
                f"{source}: unknown config key {unknown[0]!r}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
                + f"; valid keys: {', '.join(sorted(known))}"
            )
        return cls(**data)


def require(condition: bool, name: str, rule: str, value: Any) -> None:
    if not condition:
        raise AlignConfigError(f"`{name}` (--{name.replace('_', '-')}) {rule}, got {value!r}")


# ---------------------------------------------------------------------------
# Command-line flags built from the dataclass


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(AlignConfig)


def base_type(annotation: Any) -> Any:
    """Strip `| None` from an annotation: `int | None` -> int, `list[str] | None` -> list[str]."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if type(None) in typing.get_args(annotation) and len(args) == 1:
        return args[0]
    return annotation


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def optional(convert: Any) -> Any:
    """Wrap a converter so that the text `none` gives None."""
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class KeyValueAction(argparse.Action):
    """Collect repeated `KEY=VALUE` flags into a dict; VALUE is parsed as JSON when it parses."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102 - argparse hook
        key, separator, raw = str(values).partition("=")
        if not separator or not key:
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        collected = dict(getattr(namespace, self.dest, None) or {})
        collected[key] = value
        setattr(namespace, self.dest, collected)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `AlignConfig` field; unset flags stay absent from the parsed namespace."""
    types = field_types()
    for item in fields(AlignConfig):
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not MISSING else item.default_factory()  # type: ignore[misc]
        help_text = item.metadata["help"]
        if "default:" not in help_text.lower():  # some help texts describe a computed default themselves
            help_text = f"{help_text} (default: {default})"
        annotation = base_type(types[item.name])
        is_optional = type(None) in typing.get_args(types[item.name])
        common = {"dest": item.name, "default": argparse.SUPPRESS, "help": help_text}

        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(annotation) is dict:
            parser.add_argument("--dpo-arg", action=KeyValueAction, metavar="KEY=VALUE", **common)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, type=comma_list, metavar="NAME[,NAME]", **common)
        else:
            convert = optional(annotation) if is_optional else annotation
            parser.add_argument(flag, type=convert, choices=item.metadata.get("choices"), **common)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a `--config` JSON file: either a flat mapping of fields or a run's config.json."""
    path = Path(path)
    if not path.is_file():
        raise AlignConfigError(f"`--config` file {str(path)!r} not found; pass a JSON file of AlignConfig fields")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AlignConfigError(f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}") from error
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "versions" in data:
        # A run's config.json: reuse its resolved settings.
        data = dict(data["config"])
    if not isinstance(data, dict):
        raise AlignConfigError(f"{path}: the config must be a JSON object, got {type(data).__name__}")
    return data


def config_from_namespace(namespace: argparse.Namespace) -> AlignConfig:
    """Merge defaults, the `--config` file (if any) and explicit flags, in that order of precedence.

    With `--resume` and an existing run directory, the run's saved config.json
    takes the place of the defaults, so only the run name and output directory
    are needed. The settings passed explicitly (file or flags) still apply, and
    `check_run_directory` rejects those that change the trained weights.
    """
    explicit = explicit_settings(namespace)
    requested = AlignConfig.from_dict(explicit, source=str(getattr(namespace, "config", None) or "flags"))
    if not requested.resume:
        return requested

    saved_path = Path(requested.output_dir) / requested.resolved_run_name / CONFIG_FILE
    if not saved_path.is_file():
        return requested  # check_run_directory reports that there is no run to resume
    merged = load_config_file(saved_path)
    AlignConfig.from_dict(merged, source=str(saved_path))
    merge_dpo_args(explicit, merged)
    merged.update(explicit)
    # The run was found under the requested directory and name, wherever it was first written.
    merged["output_dir"] = requested.output_dir
    merged["run_name"] = requested.resolved_run_name
    return AlignConfig.from_dict(merged, source=str(saved_path))


def explicit_settings(namespace: argparse.Namespace) -> dict[str, Any]:
    """Return the settings the user passed: the `--config` file's fields overridden by explicit flags."""
    explicit = {key: value for key, value in vars(namespace).items() if key not in ("config", "verbose")}
    merged: dict[str, Any] = {}
    config_path = getattr(namespace, "config", None)
    if config_path is not None:
        merged.update(load_config_file(config_path))
        AlignConfig.from_dict(merged, source=str(config_path))  # reject unknown keys before merging flags
    merge_dpo_args(explicit, merged)
    merged.update(explicit)
    return merged


def merge_dpo_args(explicit: dict[str, Any], base: dict[str, Any]) -> None:
    """Let explicit `--dpo-arg` options add to the base settings' `dpo_args` instead of replacing them."""
    if "dpo_args" in explicit and isinstance(base.get("dpo_args"), dict):
        explicit["dpo_args"] = {**base["dpo_args"], **explicit["dpo_args"]}
