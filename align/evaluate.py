"""Load a run's adapters onto the base model and score held-out preference pairs per capability."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import PeftModel

from align.config import AlignConfig
from align.strategy import AdapterPlan
from probe.models import LoadedModel
from probe.partition import CAPABILITIES

logger = logging.getLogger(__name__)


def compose_adapters(loaded: LoadedModel, run_dir: Path, adapters: list[AdapterPlan]) -> PeftModel:
    """Load every adapter of a run onto `loaded.model` and activate them all together.

    The adapters of a `routed` run sit on disjoint layers, so activating all
    of them applies each block's update to its own layers only.
    """
    first, *rest = adapters
    model = PeftModel.from_pretrained(loaded.model, str(run_dir / first.path), adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(str(run_dir / adapter.path), adapter_name=adapter.name)
    if rest:
        model.base_model.set_adapter([adapter.name for adapter in adapters], inference_mode=True)
    model.eval()
    return model


def evaluate_heldout(model: PeftModel, tokenizer: Any, config: AlignConfig) -> dict[str, Any]:
    """Score the suite's held-out pairs of every capability under the trained model and the base model.

    Returns:
        The content of eval.json. `margin` is the mean DPO implicit reward
        margin, beta * ((log p - log p_base)(chosen) - (log p - log p_base)(rejected)),
        in nats times beta; the `reference_*` entries are the base model's accuracies.
    """
    from probe.scoring import score_pairs
    from probe.suite import load_suite

    suite = load_suite(seed=config.seed, n_train=config.n_train, n_heldout=config.n_heldout)
    batch_size = max(1, config.per_device_batch_size * 2)
    results: dict[str, Any] = {}
    for capability in CAPABILITIES:
        pairs = suite.pairs(capability, "heldout")
        scores = score_pairs(model, tokenizer, pairs, batch_size=batch_size, max_length=config.max_length)
        with model.disable_adapter():
            reference = score_pairs(model, tokenizer, pairs, batch_size=batch_size, max_length=config.max_length)
        summary = scores.summary(reference=reference, beta=config.beta)
        base = reference.summary(beta=config.beta)
        summary["reference_accuracy"] = base["accuracy"]
        summary["reference_accuracy_normalized"] = base["accuracy_normalized"]
        results[capability] = summary
        logger.info("held-out %s: accuracy %.3f (base %.3f), margin %.4f over %d pairs",
                    capability, summary["accuracy"], base["accuracy"], summary["margin"], summary["n"])
    return {
        "capabilities": results,
        "split": "heldout",
        "n_heldout": config.n_heldout,
        "suite": suite.manifest_hash,
        "margin_unit": "beta * nats: DPO implicit reward margin of the trained model against the adapter-disabled base",
    }
