"""Training guards: no double wrapping, step-0 loss, non-finite loss, a loss stuck at ln 2, metrics file.

The trainer passes every training loss to `LossMonitor.observe`, and the
callbacks act on what it recorded at the step boundaries of the transformers
`Trainer` loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback

from align.config import AlignConfigError
from probe.io import append_jsonl, write_json_atomic

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
STEP0_TOLERANCE = 1e-3  # nats; policy and reference run the same forward at step 0, so float error is far below this
STUCK_TOLERANCE = 1e-4  # nats and beta-scaled nats
STUCK_CHECK_STEPS = 10
# Loss types whose value is ln 2 when policy and reference agree.
LN2_LOSS_TYPES = ("sigmoid", "sigmoid_norm")


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss or the gradients became NaN or infinite."""


class ReferenceMismatchError(RuntimeError):
    """The step-0 DPO loss is not ln 2, so the reference model is not the policy at initialisation."""


# ---------------------------------------------------------------------------
# Existing adapters


def has_adapter(model: nn.Module) -> bool:
    """Tell whether `model` is a `PeftModel` or carries PEFT adapter layers injected by transformers."""
    if isinstance(model, PeftModel):
        return True
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def prepare_base_model(model: nn.Module, *, merge: bool, name: str = "the model") -> nn.Module:
    """Return a plain transformers model that is safe to wrap with a new LoRA adapter.

    A model that already carries an adapter (an SFT adapter, say) is never
    wrapped a second time: it is merged into the base weights when `merge` is
    true, and rejected otherwise.

    Raises:
        AlignConfigError: If the model has an adapter and `merge` is false.
    """
    if not has_adapter(model):
        return model
    if not merge:
        raise AlignConfigError(
            f"`model`: {name} already carries a PEFT adapter, and training would wrap it a second time. "
            "Pass --merge-adapter to merge it into the base weights first, or pass the base model and train a new adapter"
        )
    if isinstance(model, PeftModel):
        logger.warning("merging the existing adapter of %s into its base weights before training (--merge-adapter)", name)
        return model.merge_and_unload()
    return merge_injected_adapters(model, name)


def merge_injected_adapters(model: nn.Module, name: str) -> nn.Module:
    """Merge adapters that transformers injected when loading an adapter directory, and remove their layers."""
    logger.warning("merging the adapter that transformers loaded into %s into its base weights (--merge-adapter)", name)
    tuner_names = [module_name for module_name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for module_name in tuner_names:
        module = model.get_submodule(module_name)
        module.merge()
        parent_name, _, child_name = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    model._hf_peft_config_loaded = False
    return model


# ---------------------------------------------------------------------------
# Loss monitoring


@dataclass
class NonFiniteEvent:
    """The first micro-batch whose loss was NaN or infinite."""

    step: int  # 1-based optimizer step being computed
    micro_batch: int  # 0-based index of the micro-batch within that step
    value: float
    texts: list[str] = field(default_factory=list)


@dataclass
class LossMonitor:
    """Training losses seen by the trainer.

    Attributes:
        loss_type: The DPO loss type; the step-0 check applies to the ln 2 types only.
        check_step0: Whether to check the first loss of a fresh run.
        first_loss: The loss of the first micro-batch at step 0, or None.
        nonfinite: The first non-finite loss, or None.
    """

    loss_type: str = "sigmoid"
    check_step0: bool = True
    first_loss: float | None = None
    nonfinite: NonFiniteEvent | None = None
    _step: int = -1
    _micro_batch: int = 0

    def observe(self, loss: torch.Tensor, global_step: int, inputs: dict[str, Any], tokenizer: Any) -> None:
        """Record one micro-batch loss; raise `ReferenceMismatchError` if the step-0 loss is not ln 2."""
        self._micro_batch = self._micro_batch + 1 if global_step == self._step else 0
        self._step = global_step
        value = float(loss.detach().float().item())

        if not math.isfinite(value):
            if self.nonfinite is None:
                self.nonfinite = NonFiniteEvent(global_step + 1, self._micro_batch, value, decode_batch(inputs, tokenizer))
            return
        if global_step == 0 and self.first_loss is None:
            self.first_loss = value
            if self.check_step0 and self.loss_type in LN2_LOSS_TYPES:
                check_step0_loss(value)


def check_step0_loss(value: float) -> None:
    if abs(value - LN2) > STEP0_TOLERANCE:
        raise ReferenceMismatchError(
            f"the DPO loss at step 0 is {value:.6f}, expected ln 2 = {LN2:.6f} (tolerance {STEP0_TOLERANCE}): the "
            "policy and the reference disagree before any update. Likely causes: the LoRA B matrices are not "
            "zero-initialised (init_lora_weights), the model was already changed by another adapter, or a separate "
            "reference model differs from the policy"
        )


def decode_batch(inputs: dict[str, Any], tokenizer: Any) -> list[str]:
    """Decode the input ids of a batch (chosen rows first, then rejected rows) without padding."""
    ids = inputs.get("input_ids")
    mask = inputs.get("attention_mask")
    if ids is None or tokenizer is None:
        return []
    texts = []
    for row in range(ids.shape[0]):
        tokens = ids[row][mask[row].bool()] if mask is not None else ids[row]
        texts.append(tokenizer.decode(tokens.tolist()))
    return texts


def grads_finite(model: nn.Module) -> bool:
    """Tell whether every gradient of a trainable parameter is finite (after the DDP all-reduce)."""
    grads = [param.grad for param in model.parameters() if param.requires_grad and param.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(grad).all() for grad in grads]).all().item())


class NonFiniteLossCallback(TrainerCallback):
    """Stop training at the first NaN or infinite loss or gradient, and save a checkpoint.

    The gradients of that step are dropped before the optimizer step, so the
    saved checkpoint contains the weights from before the bad step. The check of
    the gradients runs after the DDP all-reduce, so every process stops at the
    same step.
    """

    def __init__(self, monitor: LossMonitor, batch_path: Path | None = None):
        self.monitor = monitor
        self.batch_path = batch_path
        self.stopped_at: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.stopped_at is not None or model is None:
            return control
        if self.monitor.nonfinite is None and grads_finite(model):
            return control
        for param in model.parameters():
            param.grad = None
        self.stopped_at = state.global_step + 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is None:
            return control
        control.should_save = True
        control.should_training_stop = True
        event = self.monitor.nonfinite
        if event is not None and self.batch_path is not None and state.is_world_process_zero:
            write_json_atomic(self.batch_path, {"step": event.step, "micro_batch": event.micro_batch,
                                                "loss": repr(event.value), "texts": event.texts})
        return control

    def error(self, checkpoint: Path | None) -> NonFiniteLossError:
        """Build the error that names the step, the batch and the saved checkpoint."""
        event = self.monitor.nonfinite
        where = (
            f"the loss was {event.value} at step {event.step}, micro-batch {event.micro_batch}"
            if event is not None else f"the gradients became non-finite at step {self.stopped_at}"
        )
        batch = f"; the batch is in {self.batch_path}" if event is not None and self.batch_path is not None else ""
        saved = f"; the weights before that step are saved in {checkpoint}" if checkpoint is not None else ""
        return NonFiniteLossError(
            f"training stopped: {where}{batch}{saved}. Lower --learning-rate, check the batch for empty or "
            "truncated completions, or use --dtype float32"
        )


class StuckLossCallback(TrainerCallback):
    """Warn once when the loss stays within 1e-4 of ln 2 with zero reward margin after some steps."""

    def __init__(self, loss_type: str, check_after: int = STUCK_CHECK_STEPS):
        self.active = loss_type in LN2_LOSS_TYPES
        self.check_after = check_after
        self.all_flat = True
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.active or self.warned or not logs or "loss" not in logs:
            return control
        margin = logs.get("rewards/margins", 0.0)
        flat = abs(logs["loss"] - LN2) < STUCK_TOLERANCE and abs(margin) < STUCK_TOLERANCE
        self.all_flat = self.all_flat and flat
        if state.global_step >= self.check_after and self.all_flat:
            self.warned = True
            logger.warning(
                "after %d steps the DPO loss is still within %.0e of ln 2 and the reward margin is %.2e: the policy "
                "is not moving away from the reference. Likely causes: the learning rate is too small for the steps "
                "(--learning-rate), the adapted layers get no gradient (gradient checkpointing with reentrant "
                "checkpoints and no input gradients), beta is tiny (--beta), or chosen and rejected are identical "
                "after truncation (--max-length)",
                state.global_step, STUCK_TOLERANCE, margin,
            )
        return control


class MetricsFileCallback(TrainerCallback):
    """Append one JSON line per logging step and at the last step to metrics.jsonl (main process only)."""

    def __init__(self, path: Path, adapter: str):
        self.path = path
        self.adapter = adapter

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer logs every `logging_steps` only; log the last step too, so that every run has metrics.
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return control
        record = {"adapter": self.adapter, "step": state.global_step, **{k: to_json_number(v) for k, v in logs.items()}}
        append_jsonl(self.path, record)
        return control


def to_json_number(value: Any) -> Any:
    """Turn tensors into floats and non-finite floats into strings, which JSON cannot hold."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value
