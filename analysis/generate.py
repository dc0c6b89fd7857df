"""Generate answers to held-out prompts, batched with left padding, and cache them per model.

The cache is one JSONL file per model (the base model or one run). Each line
stores one answer under a key built from the prompt id, a hash of the prompt
text, the model identity and the generation settings. Judging can therefore be
repeated without generating again, and a change of any key part regenerates
only the answers it affects.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from analysis.runs import RunInfo, load_run
from probe.io import write_text_atomic

logger = logging.getLogger(__name__)

Sampling = Literal["greedy", "sample"]
SAMPLING_MODES: tuple[str, ...] = ("greedy", "sample")
Message = dict[str, str]
# Generation and the local judge use the GPU when there is one. Greedy answers can differ
# slightly between devices, and the cache key does not include the device.
MODEL_DEVICE = "auto"


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated.

    Attributes:
        max_new_tokens: Maximum number of generated tokens per answer.
        sampling: "greedy" (argmax decoding) or "sample" (seeded multinomial sampling).
        seed: Seed of the sampler. Batch i is seeded with `seed + i`, so
            sampled answers are reproducible for the same prompts and batch size.
        temperature: Softmax temperature when sampling.
        top_p: Nucleus sampling threshold when sampling.
        batch_size: Prompts per `generate` call.
    """

    max_new_tokens: int = 64
    sampling: Sampling = "greedy"
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1, got {self.max_new_tokens}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"`sampling` must be one of {', '.join(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {self.batch_size}")

    def key(self) -> str:
        """Return a short hash that changes whenever a setting that affects the answers changes."""
        fields = asdict(self)
        if self.sampling == "greedy":
            # Greedy answers do not depend on the sampler settings.
            for name in ("seed", "temperature", "top_p"):
                fields.pop(name)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def load_heldout_prompts(n_prompts: int, *, suite_seed: int = 0) -> list[dict]:
    """Take the first `n_prompts` held-out prompts of each capability from the data suite.

    Args:
        n_prompts: Prompts per capability.
        suite_seed: Seed of `probe.suite.load_suite`, which fixes the train/held-out split.

    Returns:
        Dicts with keys "id", "capability" and "prompt", grouped by capability.
    """
    from probe.suite import CAPABILITIES, load_suite

    # NOTE: this assumes held-out membership does not depend on the suite seed (probe.data assigns
    # the split by a hash of each item), so these prompts are unseen by runs trained with any seed.
    suite = load_suite(seed=suite_seed)
    prompts = []
    for capability in CAPABILITIES:
        pairs = suite.pairs(capability, "heldout")[:n_prompts]
        if len(pairs) < n_prompts:
            logger.warning("capability %s has only %d held-out prompts; %d were requested", capability, len(pairs), n_prompts)
        prompts.extend({"id": pair["id"], "capability": capability, "prompt": pair["prompt"]} for pair in pairs)
    return prompts


def format_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> str:
    """Render chat messages with the tokenizer's chat template, ending with the assistant turn.

    A tokenizer without a chat template gets the message contents joined by
    blank lines, which is what a base model continues best.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return "\n\n".join(message["content"] for message in messages) + "\n\n"


@torch.inference_mode()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    settings: GenerationSettings,
    *,
    desc: str = "generating",
) -> list[str]:
    """Generate one assistant reply per conversation, in batches with left padding.

    Args:
        model: A causal LM (a PEFT model works too).
        tokenizer: Its tokenizer, with a pad token.
        conversations: Chat messages per request, each a list of {"role", "content"}.
        settings: Decoding settings.
        desc: Label of the progress bar.

    Returns:
        The decoded new tokens of each reply, stripped, in input order.
    """
    texts = [format_chat(tokenizer, messages) for messages in conversations]
    uses_template = bool(getattr(tokenizer, "chat_template", None))
    device = next(model.parameters()).device
    replies: list[str] = []

    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so pads must sit on the left
    try:
        starts = range(0, len(texts), settings.batch_size)
        for batch_index, start in enumerate(tqdm(starts, desc=desc, unit="batch")):
            batch = texts[start:start + settings.batch_size]
            # The chat template already inserts any BOS token the model expects.
            encoded = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not uses_template).to(device)
            output = model.generate(**encoded, **decoding_kwargs(tokenizer, settings, batch_index))
            new_tokens = output[:, encoded["input_ids"].shape[1]:]  # (batch, generated)
            replies.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
    return replies


def decoding_kwargs(tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, batch_index: int) -> dict:
    kwargs = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if settings.sampling == "greedy":
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs
    torch.manual_seed(settings.seed + batch_index)
    kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=None)
    return kwargs


class GenerationCache:
    """Answers of one model, stored as JSONL and keyed by prompt, model and generation settings.

    Args:
        path: The JSONL file. It is read if it exists and rewritten atomically on `save`.
        model_id: Identity of the model that generates (an alias, or a run directory).
        settings: Generation settings of the answers stored under this cache's keys.
    """

    def __init__(self, path: Path, *, model_id: str, settings: GenerationSettings) -> None:
        self.path = Path(path)
        self.model_id = model_id
        self.settings = settings
        self.records: dict[str, dict] = {}
        if self.path.exists():
            self.records = read_cache_records(self.path)

    def key(self, prompt: dict) -> str:
        prompt_hash = hashlib.sha256(prompt["prompt"].encode()).hexdigest()[:12]
        return f"{prompt['id']}|{prompt_hash}|{self.model_id}|{self.settings.key()}"

    def get(self, prompt: dict) -> str | None:
        record = self.records.get(self.key(prompt))
        return None if record is None else record["answer"]

    def put(self, prompt: dict, answer: str) -> None:
        self.records[self.key(prompt)] = {
            "key": self.key(prompt),
            "prompt_id": prompt["id"],
            "capability": prompt.get("capability"),
            "model": self.model_id,
            "settings": asdict(self.settings),
            "prompt": prompt["prompt"],
            "answer": answer,
        }

    def save(self) -> None:
        lines = [json.dumps(record, ensure_ascii=False) for record in self.records.values()]
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))


def read_cache_records(path: Path) -> dict[str, dict]:
    """Read a generation cache file, skipping lines that are not valid cache records."""
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            records[record["key"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("skipping invalid line %d of generation cache %s", number, path)
    return records


def cached_answers(
    prompts: Sequence[dict],
    cache: GenerationCache,
    generate_missing: Callable[[list[dict]], list[str]],
    *,
    desc: str,
) -> list[str]:
    """Return an answer per prompt, generating only the ones missing from the cache.

    Args:
        prompts: Dicts with "id", "capability" and "prompt".
        cache: The cache of the model that answers.
        generate_missing: Returns an answer per given prompt. It is called
            only when some answers are missing, so a fully cached model is never loaded.
        desc: Names the model in the log.
    """
    missing = [prompt for prompt in prompts if cache.get(prompt) is None]
    logger.info("%s: %d of %d answers cached in %s", desc, len(prompts) - len(missing), len(prompts), cache.path)
    if missing:
        for prompt, answer in zip(missing, generate_missing(missing)):
            cache.put(prompt, answer)
        cache.save()
    return [cache.get(prompt) for prompt in prompts]


def answer_prompts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[dict], settings: GenerationSettings,
    *, desc: str,
) -> list[str]:
    """Answer each prompt as a single user turn."""
    conversations = [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts]
    return generate_replies(model, tokenizer, conversations, settings, desc=desc)


def base_generator(base_model: str, settings: GenerationSettings) -> Callable[[list[dict]], list[str]]:
    """Return a `generate_missing` function that loads `base_model` and answers with it."""

    def generate_missing(prompts: list[dict]) -> list[str]:
        from probe.models import load_model

        loaded = load_model(base_model, device=MODEL_DEVICE)
        return answer_prompts(loaded.model, loaded.tokenizer, prompts, settings, desc="base answers")

    return generate_missing


def run_generator(run: RunInfo, settings: GenerationSettings) -> Callable[[list[dict]], list[str]]:
    """Return a `generate_missing` function that answers with the run's adapters on its base model.

    A run with one adapter answers every prompt with it. A run with one adapter
    per block (strategy `routed`) answers each prompt with the adapter trained
    on the prompt's capability.
    """

    def generate_missing(prompts: list[dict]) -> list[str]:
        model, tokenizer = load_run_model(run)
        answers: dict[int, str] = {}
        for adapter_name, group in group_by_adapter(run, prompts).items():
            model.set_adapter(adapter_name)
            indices = [index for index, _ in group]
            replies = answer_prompts(
                model, tokenizer, [prompt for _, prompt in group], settings, desc=f"{run.name} answers ({adapter_name})",
            )
            answers.update(zip(indices, replies))
        return [answers[index] for index in range(len(prompts))]

    return generate_missing


def group_by_adapter(run: RunInfo, prompts: Sequence[dict]) -> dict[str, list[tuple[int, dict]]]:
    """Assign each prompt (with its position) to the adapter that answers it."""
    by_capability = {adapter.capability: adapter.name for adapter in run.adapters if adapter.capability}
    default = run.adapters[0].name
    if len(run.adapters) > 1 and len(by_capability) < len(run.adapters):
        # NOTE: without a capability per adapter there is no routing rule, so the first adapter answers the rest.
        logger.warning(
            "run %s has %d adapters but only %d name a capability; prompts of other capabilities use adapter %r",
            run.name, len(run.adapters), len(by_capability), default,
        )
    groups: dict[str, list[tuple[int, dict]]] = {}
    for index, prompt in enumerate(prompts):
        name = by_capability.get(prompt.get("capability"), default) if len(run.adapters) > 1 else default
        groups.setdefault(name, []).append((index, prompt))
    return groups


def load_run_model(run: RunInfo) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the run's base model with every adapter of the run attached under its own name."""
    from peft import PeftModel

    from probe.models import load_model

    loaded = load_model(run.model_name, device=MODEL_DEVICE)
    first, *others = run.adapters
    model = PeftModel.from_pretrained(loaded.model, str(first.path), adapter_name=first.name)
    for adapter in others:
        model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    model.eval()
    return model, loaded.tokenizer


def load_runs(run_dirs: Sequence[Path], base_model: str) -> list[RunInfo]:
    """Read the run directories and check that every run was trained on `base_model`.

    Raises:
        analysis.runs.RunError: If a run directory is missing or malformed.
        ValueError: If a run's base model differs from `base_model`.
    """
    runs = [load_run(run_dir) for run_dir in run_dirs]
    for run in runs:
        if run.model_name != base_model:
            raise ValueError(
                f"run {run.path} was trained on base model {run.model_name!r}, but the base model is "
                f"{base_model!r}; pass the run's base model so base and run answers are comparable"
            )
    return runs
