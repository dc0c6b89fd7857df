"""Score the base model and trained runs on held-out data, with a score cache.

Scores are the raw material of every evaluation metric: summed completion
log-probabilities (nats) of each chosen and rejected completion, and of each
plain-text passage. They are cached as JSON in the report's cache directory,
the base model's under its model name and the data fingerprint, a run's under
the sha256 of its adapter files, so several reports and re-runs reuse them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from analysis.runs import RunInfo
from probe.io import write_json_atomic
from probe.scoring import PairScores, completion_logprobs, score_pairs

if TYPE_CHECKING:
    from analysis.evaluate import EvalData, EvalSettings

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class ModelScores:
    """One model's scores on an `EvalData`.

    Attributes:
        pairs: Per capability, the chosen and rejected log-probabilities of every pair.
        text_logp: Summed log-probability of each text in nats, shape (n_texts,).
        text_tokens: Scored tokens of each text, shape (n_texts,).
    """

    pairs: dict[str, PairScores]
    text_logp: np.ndarray
    text_tokens: np.ndarray

    def to_dict(self) -> dict:
        return {
            "pairs": {capability: scores.to_dict() for capability, scores in self.pairs.items()},
            "text_logp": self.text_logp.tolist(),
            "text_tokens": self.text_tokens.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelScores":
        pairs = {capability: PairScores.from_dict(scores) for capability, scores in data["pairs"].items()}
        return cls(pairs, np.asarray(data["text_logp"], dtype=np.float64), np.asarray(data["text_tokens"], dtype=np.int64))


AdapterSelector = Callable[[str | None], None]


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: "EvalData",
    settings: "EvalSettings",
    *,
    select_adapter: AdapterSelector | None = None,
    label: str = "model",
) -> ModelScores:
    """Score every held-out pair and text under `model`.

    Args:
        model: A causal LM, with or without PEFT adapters.
        tokenizer: Its tokenizer.
        data: Held-out pairs and texts.
        settings: Batch size, length limit and progress bars.
        select_adapter: Called with each capability before its pairs are
            scored, and with None before the texts, to activate the right
            adapters of a routed run.
        label: Name shown on progress bars.
    """
    pairs = {}
    for capability, capability_pairs in data.pairs.items():
        if select_adapter is not None:
            select_adapter(capability)
        logger.info("scoring %d %s pairs with %s", len(capability_pairs), capability, label)
        pairs[capability] = score_pairs(
            model, tokenizer, capability_pairs, batch_size=settings.batch_size,
            max_length=settings.max_length, progress=settings.progress,
        )

    if select_adapter is not None:
        select_adapter(None)
    text_logp, text_tokens = completion_logprobs(
        model, tokenizer, [""] * len(data.texts), data.texts, batch_size=settings.batch_size,
        max_length=settings.max_length, desc=f"perplexity {label}", progress=settings.progress,
    )
    return ModelScores(pairs, text_logp, text_tokens)


def cache_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "model"


def read_cache(path: Path | None) -> ModelScores | None:
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("cache_version") != CACHE_VERSION:
            return None
        return ModelScores.from_dict(record["scores"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ignoring unreadable score cache %s (%s); scoring again", path, error)
        return None


def write_cache(path: Path | None, scores: ModelScores, key: dict) -> None:
    if path is not None:
        write_json_atomic(path, {"cache_version": CACHE_VERSION, "key": key, "scores": scores.to_dict()})


def load_or_score_base(
    model_name: str, layers_path: str, data: "EvalData", settings: "EvalSettings", cache_dir: Path | None
) -> ModelScores:
    """Return the base model's scores, from `cache_dir` when present, else by scoring and caching them."""
    from probe.models import load_model

    key = {"model": model_name, "data": data.fingerprint(), "max_length": settings.max_length, "dtype": settings.dtype}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"base-{cache_slug(model_name)}-{digest}.json" if cache_dir is not None else None
    cached = read_cache(path)
    if cached is not None:
        logger.info("reusing cached base-model scores from %s", path)
        return cached

    loaded = load_model(model_name, dtype=settings.dtype, device=settings.device, layers_path=layers_path)
    scores = score_model(loaded.model, loaded.tokenizer, data, settings, label="base")
    write_cache(path, scores, key)
    return scores


def adapter_digest(run: RunInfo) -> str:
    """Return a sha256 hex digest over the files of every adapter of the run."""
    digest = hashlib.sha256()
    for adapter in run.adapters:
        for path in sorted(adapter.path.glob("adapter_*")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_or_score_run(run: RunInfo, data: "EvalData", settings: "EvalSettings", cache_dir: Path | None) -> ModelScores:
    """Return a run's scores, from `cache_dir` when its adapter files are unchanged, else by scoring them."""
    key = {"adapters": adapter_digest(run), "data": data.fingerprint(), "max_length": settings.max_length,
           "dtype": settings.dtype}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"run-{cache_slug(run.name)}-{digest}.json" if cache_dir is not None else None
    cached = read_cache(path)
    if cached is not None:
        logger.info("reusing cached scores of %s from %s", run.name, path)
        return cached

    model, tokenizer, select_adapter = load_run_model(run, settings)
    scores = score_model(model, tokenizer, data, settings, select_adapter=select_adapter, label=run.name)
    write_cache(path, scores, key)
    return scores


def load_run_model(run: RunInfo, settings: "EvalSettings") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, AdapterSelector | None]:
    """Load the base model with the run's adapters.

    Returns:
        The PEFT model, its tokenizer, and for runs with several adapters a
        function that activates the adapter trained for a capability (all
        adapters for None or a capability no adapter targets).
    """
    from peft import PeftModel

    from probe.models import load_model

    loaded = load_model(run.model_name, dtype=settings.dtype, device=settings.device, layers_path=run.layers_path)
    first, *rest = run.adapters
    model = PeftModel.from_pretrained(loaded.model, str(first.path), adapter_name=first.name)
    for adapter in rest:
        model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    model.eval()
    if not rest:
        return model, loaded.tokenizer, None

    by_capability = {adapter.capability: adapter.name for adapter in run.adapters if adapter.capability}
    all_names = [adapter.name for adapter in run.adapters]

    def select_adapter(capability: str | None) -> None:
        # NOTE: text and capabilities without their own adapter see every adapter at once, which
        # sums their updates. A routed run at inference time may choose differently.
        names = by_capability.get(capability) if capability is not None else None
        model.base_model.set_adapter(names or all_names, inference_mode=True)

    return model, loaded.tokenizer, select_adapter
