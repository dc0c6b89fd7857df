"""DPO on chosen blocks through TRL's `DPOTrainer`, with guards, checkpoints and resume.

Example (Python):

    from align.config import AlignConfig
    from align.trainer import run_alignment

    run_dir = run_alignment(AlignConfig(model="tiny-llama", strategy="global", data="suite:facts", max_steps=5))

The reference model is the policy with its adapter disabled (TRL does this
when `ref_model=None` and the model is a PEFT model), so the base weights are
held once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer

from align.config import AlignConfig, AlignConfigError
from align.data import load_pairs, to_dataset
from align.evaluate import compose_adapters, evaluate_heldout
from align.guards import (
    LossMonitor,
    MetricsFileCallback,
    NonFiniteLossCallback,
    StuckLossCallback,
    prepare_base_model,
)
from align.lora import CoverageReport, block_scales, build_lora_config, check_coverage, layer_index, layer_ranks
from align.rundir import (
    EVAL_FILE,
    METRICS_FILE,
    check_run_directory,
    checkpoint_step,
    last_complete_checkpoint,
    package_versions,
    read_run_config,
    run_directory,
    save_adapter_atomically,
    trim_metrics,
    write_run_config,
)
from align.strategy import AdapterPlan, plan_adapters
from probe.io import write_json_atomic
from probe.models import LoadedModel, load_model, resolve_device
from probe.partition import Partition, resolve_partition

logger = logging.getLogger(__name__)

# DPOConfig options that AlignConfig sets itself; `--dpo-arg` must not override them.
MANAGED_DPO_OPTIONS = frozenset({
    "output_dir", "max_steps", "learning_rate", "beta", "loss_type", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_length", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "activation_checkpointing", "activation_checkpointing_kwargs", "seed", "data_seed", "logging_steps",
    "save_steps", "report_to", "use_cpu",
})


# PEFT 0.21 and TRL 1.16 read `is_gradient_checkpointing`, which transformers 5.25 deprecates with a
# FutureWarning, so every run printed it; align's own code does not use the property.
DEPRECATED_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


class BlockDPOTrainer(DPOTrainer):
    """`DPOTrainer` that reports each training loss to a `LossMonitor` and supports per-layer learning rates.

    Args:
        monitor: Receives every training loss (step-0 and non-finite checks).
        lr_scales: Layer index -> learning-rate multiplier for that layer's
            LoRA weights, or None for one learning rate.
        layers_path: Dotted path of the decoder layers (to read layer indices).
    """

    def __init__(self, *args: Any, monitor: LossMonitor, lr_scales: dict[int, float] | None = None,
                 layers_path: str = "model.layers", **kwargs: Any):
        self.monitor = monitor
        self.lr_scales = lr_scales
        self.layers_path = layers_path
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            loss = result[0] if return_outputs else result
            self.monitor.observe(loss, self.state.global_step, inputs, self.processing_class)
        return result

    def create_optimizer(self, model=None):
        if not self.lr_scales or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups: dict[float, list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                scale = self.lr_scales.get(layer_index(name, self.layers_path), 1.0)
                groups.setdefault(scale, []).append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        param_groups = [
            {"params": params, "lr": self.args.learning_rate * scale, "weight_decay": self.args.weight_decay}
            for scale, params in sorted(groups.items())
        ]
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer


def build_dpo_config(config: AlignConfig, output_dir: Path) -> DPOConfig:
    """Translate `AlignConfig` into TRL's `DPOConfig`, adding `--dpo-arg` options.

    Raises:
        AlignConfigError: If a `--dpo-arg` key is not a DPOConfig option or is set by a dedicated flag.
    """
    check_dpo_args(config)
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "beta": config.beta,
        "loss_type": [config.loss_type],
        "per_device_train_batch_size": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_length": config.max_length,
        # transformers 5 renamed gradient_checkpointing to activation_checkpointing (old name deprecated).
        "activation_checkpointing": config.gradient_checkpointing,
        # Non-reentrant checkpoints pass gradients to adapters above a frozen bottom layer.
        "activation_checkpointing_kwargs": {"use_reentrant": False} if config.gradient_checkpointing else None,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": config.logging_steps,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 2,
        "report_to": config.report_to,
        # The same flag as the PartialState of run_alignment, so that a CPU launch with several processes uses gloo.
        "use_cpu": runs_on_cpu(config),
        # Mixed precision is off: parameters already have --dtype.
        "bf16": False,
        "fp16": False,
    }
    options.update(config.dpo_args)
    return DPOConfig(**options)


def check_dpo_args(config: AlignConfig) -> None:
    """Reject a `--dpo-arg` key that is not a DPOConfig option or that a dedicated flag sets."""
    valid = set(DPOConfig.__dataclass_fields__)
    for key in config.dpo_args:
        if key not in valid:
            raise AlignConfigError(f"`dpo_args`: {key!r} is not a TRL DPOConfig option; see DPOConfig in the TRL docs")
        if key in MANAGED_DPO_OPTIONS:
            raise AlignConfigError(f"`dpo_args`: set {key!r} with its own flag --{key.replace('_', '-')}, not --dpo-arg")


def model_metadata(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "name": loaded.spec.name,
        "source": loaded.spec.source,
        "checkpoint": loaded.checkpoint,
        "num_layers": loaded.stack.num_layers,
        "layers_path": loaded.stack.path,
    }


def load_base(config: AlignConfig) -> LoadedModel:
    """Load the model on the CPU (the Trainer moves it) and make sure it carries no adapter."""
    with ignore_checkpointing_deprecation():  # loading a model that carries an adapter goes through PEFT
        loaded = load_model(config.model, dtype=config.dtype, device="cpu", layers_path=config.layers_path)
        loaded.model = prepare_base_model(loaded.model, merge=config.merge_adapter, name=repr(config.model))
    return loaded


def runs_on_cpu(config: AlignConfig) -> bool:
    """Tell whether training runs on the CPU: `--device cpu`, `accelerate launch --cpu`, or no CUDA device."""
    forced = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return config.device == "cpu" or forced or not torch.cuda.is_available()


def check_device(config: AlignConfig) -> None:
    """Reject an invalid `--device`, or one that names CUDA on a machine without CUDA, before any work."""
    try:
        device = resolve_device(config.device)  # ValueError for unknown names and for `cuda` without CUDA
    except RuntimeError as error:  # torch.device rejects malformed names such as `cuda:x`
        raise AlignConfigError(f"`device` (--device) must be cpu, cuda, cuda:N or auto, got {config.device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlignConfigError(
            f"`device` (--device) is {config.device!r} but CUDA is not available; use --device cpu or auto"
        )


def select_device(config: AlignConfig, state: PartialState) -> None:
    """Honour `--device cuda:N` in a single process; accelerate launch assigns devices itself."""
    if config.device.startswith("cuda:") and state.num_processes == 1:
        torch.cuda.set_device(torch.device(config.device))


# ---------------------------------------------------------------------------
# One adapter


def train_adapter(
    loaded: LoadedModel,
    partition: Partition,
    adapter: AdapterPlan,
    config: AlignConfig,
    run_dir: Path,
    rows: list[dict[str, Any]],
    callbacks: list[TrainerCallback],
) -> CoverageReport:
    """Wrap `loaded.model` with one LoRA adapter, check its coverage, train it on `rows` and save it.

    Returns:
        The coverage read back from the wrapped model.

    Raises:
        CoverageError: If PEFT adapted other layers, ranks or alphas than requested.
        ReferenceMismatchError: If the step-0 loss is not ln 2.
        NonFiniteLossError: If the loss or the gradients became NaN or infinite.
    """
    scale_over = routed_blocks(partition, config)
    lora_config = build_lora_config(partition, adapter.blocks, loaded.stack, config, scale_over=scale_over)
    checkpoint_dir = run_dir / adapter.checkpoints
    resume_from = last_complete_checkpoint(checkpoint_dir) if config.resume else None
    trim_metrics(run_dir / METRICS_FILE, adapter.name, resume_step(resume_from))

    monitor = LossMonitor(loss_type=config.loss_type, check_step0=resume_from is None)
    nonfinite = NonFiniteLossCallback(monitor, run_dir / f"nonfinite_batch_{adapter.name}.json")
    with ignore_checkpointing_deprecation():
        trainer = BlockDPOTrainer(
            model=loaded.model,
            ref_model=None,
            args=build_dpo_config(config, checkpoint_dir),
            train_dataset=to_dataset(rows),
            processing_class=loaded.tokenizer,
            peft_config=lora_config,
            callbacks=[MetricsFileCallback(run_dir / METRICS_FILE, adapter.name), nonfinite,
                       StuckLossCallback(config.loss_type), *callbacks],
            monitor=monitor,
            lr_scales=learning_rate_scales(partition, adapter, config, scale_over),
            layers_path=loaded.stack.path,
        )
        check_reference_is_base(trainer)
        report = verify_coverage(trainer, partition, adapter, config, loaded.stack.path, scale_over)
        log_coverage(report, partition, adapter, len(rows))

        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    if nonfinite.stopped_at is not None:
        raise nonfinite.error(last_complete_checkpoint(checkpoint_dir))

    if trainer.accelerator.is_main_process:
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter_atomically(peft_model, run_dir / adapter.path, "default")
        logger.info("saved adapter %r to %s", adapter.name, run_dir / adapter.path)
    trainer.accelerator.wait_for_everyone()
    release(trainer)
    return report


@contextlib.contextmanager
def ignore_checkpointing_deprecation() -> Iterator[None]:
    """Hide the `is_gradient_checkpointing` FutureWarning that the installed PEFT/TRL trigger, and no other warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED_CHECKPOINTING_WARNING, category=FutureWarning)
        yield


def resume_step(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    return int(checkpoint.name.rsplit("-", 1)[-1])


def routed_blocks(partition: Partition, config: AlignConfig) -> list[str] | None:
    """Return the blocks of a `routed` run, which share one unit for `--rank-by`, or None for other strategies."""
    if config.strategy != "routed":
        return None
    return config.blocks or partition.names


def warn_unused_rank_by(config: AlignConfig) -> None:
    single_block = len(config.blocks or [config.strategy]) == 1 and config.strategy not in ("full", "routed")
    if config.rank_by is not None and single_block:
        logger.warning("--rank-by %s has no effect when one block is trained; drop it to silence this warning",
                       config.rank_by)


def learning_rate_scales(
    partition: Partition, adapter: AdapterPlan, config: AlignConfig, scale_over: list[str] | None
) -> dict[int, float] | None:
    if config.rank_by != "attribution-lr":
        return None
    scales = block_scales(partition, scale_over or adapter.blocks)
    return {layer: scales[name] for name in adapter.blocks for layer in partition.block(name).layers}


def check_reference_is_base(trainer: DPOTrainer) -> None:
    """Assert that TRL uses the adapter-disabled policy as the reference (one copy of the weights)."""
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.ref_model is None, "DPOTrainer built a separate reference model"
    assert "ref" not in peft_model.peft_config, "DPOTrainer added a 'ref' adapter copy"


def verify_coverage(
    trainer: DPOTrainer, partition: Partition, adapter: AdapterPlan, config: AlignConfig, layers_path: str,
    scale_over: list[str] | None,
) -> CoverageReport:
    ranks = layer_ranks(partition, adapter.blocks, config, scale_over=scale_over)
    return check_coverage(
        trainer.accelerator.unwrap_model(trainer.model), adapter.layers,
        {layer: rank for layer, (rank, _) in ranks.items()},
        {layer: alpha for layer, (_, alpha) in ranks.items()},
        layers_path=layers_path,
    )


def log_coverage(report: CoverageReport, partition: Partition, adapter: AdapterPlan, n_pairs: int) -> None:
    logger.info("adapter %r: LoRA on %d of %d layers, %s trainable parameters, %d training pairs",
                adapter.name, len(report.layers), partition.num_layers, f"{report.total_trainable:,}", n_pairs)
    for line in report.describe(partition):
        logger.info("  %s", line)


def release(trainer: DPOTrainer) -> None:
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# A whole run


def run_alignment(config: AlignConfig, *, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train the adapters of one run and write its run directory.

    Args:
        config: The run settings.
        callbacks: Extra transformers `TrainerCallback`s for every adapter's trainer.

    Returns:
        The run directory (`<output_dir>/<run_name>`).

    Raises:
        AlignConfigError, probe.partition.PartitionError, ValueError: For invalid settings or input files.
        CoverageError, ReferenceMismatchError, NonFiniteLossError: When a training guard fires.
    """
    check_device(config)
    # Created before anything else, with the CPU flag that DPOConfig will also pass, so every later
    # PartialState (the Trainer's included) shares this distributed set-up.
    state = PartialState(cpu=runs_on_cpu(config))
    select_device(config, state)
    set_seed(config.seed)
    run_dir = run_directory(config)
    check_run_directory(run_dir, config)
    state.wait_for_everyone()

    loaded = load_base(config)
    meta = model_metadata(loaded)
    partition = resolve_partition(config.partition, loaded.num_layers, meta)
    strategy, adapters = plan_adapters(partition, config)
    pairs = prepare_inputs(partition, adapters, config, run_dir)
    record = run_record(config, partition, strategy, adapters, meta)
    if config.resume:
        record["coverage"] = read_run_config(run_dir).get("coverage", {})
    created = not run_dir.exists()
    if state.is_main_process:
        write_run_config(run_dir, record)

    try:
        for index, adapter in enumerate(adapters):
            if config.resume and (run_dir / adapter.path / "adapter_config.json").is_file():
                logger.info("adapter %r is already trained (%s); skipping it", adapter.name, run_dir / adapter.path)
                continue
            if index > 0 or loaded is None:
                loaded = load_base(config)  # each routed adapter starts from an unwrapped base model
            report = train_adapter(loaded, partition, adapter, config, run_dir, pairs[adapter.name],
                                   list(callbacks or []))
            record["coverage"][adapter.name] = report.to_dict(partition)
            if state.is_main_process:
                write_run_config(run_dir, record)
            loaded = None
    except BaseException:
        if created and state.is_main_process:
            remove_unsaved_run(run_dir)
        raise

    if config.eval_heldout and state.is_main_process:
        with ignore_checkpointing_deprecation():
            evaluate_run(config, run_dir, adapters)
    state.wait_for_everyone()
    logger.info("run finished: %s", run_dir)
    return run_dir


def prepare_inputs(
    partition: Partition, adapters: list[AdapterPlan], config: AlignConfig, run_dir: Path
) -> dict[str, list[dict[str, Any]]]:
    """Load every adapter's training pairs and check the DPO and `--rank-by` settings before the run directory exists.

    Returns:
        Adapter name -> its training pairs.

    Raises:
        AlignConfigError: For missing pairs or capabilities, an invalid `--dpo-arg` or missing attribution masses.
        probe.data.sources.SourceFetchError: If the suite sources cannot be fetched.
    """
    warn_unused_rank_by(config)
    build_dpo_config(config, run_dir / "checkpoints")  # DPOConfig validates the --dpo-arg values
    scale_over = routed_blocks(partition, config)
    pairs = {}
    for adapter in adapters:
        layer_ranks(partition, adapter.blocks, config, scale_over=scale_over)
        learning_rate_scales(partition, adapter, config, scale_over)
        capability = adapter.capability if config.strategy == "routed" else None
        pairs[adapter.name] = load_pairs(adapter.data, config, capability=capability)
    return pairs


def remove_unsaved_run(run_dir: Path) -> None:
    """Delete a run directory that this run created when it contains no checkpoint and no adapter yet.

    Then the corrected command can start again without --resume.
    """
    saved = [path for path in run_dir.rglob("*") if path.name == "adapter" or checkpoint_step(path) >= 0]
    if saved:
        logger.info("keeping %s: it contains %s", run_dir, saved[0])
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.info("removed %s because the run failed before saving a checkpoint or an adapter", run_dir)


def run_record(
    config: AlignConfig, partition: Partition, strategy: str, adapters: list[AdapterPlan], meta: dict[str, Any]
) -> dict[str, Any]:
    """Build config.json: resolved config, partition copy, strategy, adapters, model and package versions."""
    blocks = [name for adapter in adapters for name in adapter.blocks]
    return {
        "config": config.to_dict(),
        "partition": partition.to_dict(),
        "strategy": strategy,
        "blocks": blocks,
        "adapted_layers": partition.layers_of(blocks),
        "model": meta,
        "adapters": [adapter.to_record() for adapter in adapters],
        "versions": package_versions(),
        "coverage": {},
    }


def evaluate_run(config: AlignConfig, run_dir: Path, adapters: list[AdapterPlan]) -> None:
    """Reload the saved adapters onto a fresh base model, score held-out pairs and write eval.json."""
    loaded = load_base(config)
    model = compose_adapters(loaded, run_dir, adapters)
    if torch.cuda.is_available() and config.device != "cpu":
        model.to("cuda")
    write_json_atomic(run_dir / EVAL_FILE, evaluate_heldout(model, loaded.tokenizer, config))
