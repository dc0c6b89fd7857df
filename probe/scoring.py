"""Completion log-probabilities, preference scores, the DPO loss and perplexity.

Tokenization mirrors TRL's `DPOTrainer` (1.x) so that scores here and the
training loss see the same tokens: for standard (string) pairs the prompt and
`prompt + completion + eos` are tokenized separately and the completion starts
where the two token lists diverge; conversational pairs go through the chat
template. Log-probabilities are natural logs (nats), summed over completion
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

LN2 = math.log(2.0)


def common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def tokenize_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list, completion: str | list, max_length: int | None = None
) -> tuple[list[int], int]:
    """Tokenize one prompt + completion the way TRL's DPOTrainer does.

    Returns:
        The token ids of prompt and completion, and the number of leading
        prompt tokens. Sequences longer than `max_length` keep their start,
        as TRL's default `truncation_mode="keep_start"` does.
    """
    if isinstance(prompt, list):
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        eos = tokenizer.eos_token or ""
        text = prompt + completion
        if eos and not text.endswith(eos):
            text += eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=text)["input_ids"]

    prompt_len = common_prefix_length(prompt_ids, full_ids)
    if max_length is not None:
        full_ids = full_ids[:max_length]
        prompt_len = min(prompt_len, len(full_ids))
    return list(full_ids), prompt_len


def collate_completions(
    sequences: list[tuple[list[int], int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized sequences into a batch.

    Returns:
        `input_ids`, `attention_mask` and `completion_mask`, each a long
        tensor of shape (batch, max_seq_len).
    """
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, prompt_len : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def batch_completion_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the log-probabilities of completion tokens.

    Args:
        model: A causal LM.
        batch: Output of `collate_completions`, on the model's device.

    Returns:
        Summed log-probabilities in nats, float tensor of shape (batch,), with
        gradients when enabled, and completion token counts, shape (batch,).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()  # (batch, seq - 1, vocab): position t predicts token t + 1
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(logits.dtype)
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(dim=1), mask.sum(dim=1)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before scoring")


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list],
    completions: Sequence[str | list],
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    desc: str = "scoring",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Score each completion given its prompt.

    Returns:
        Summed completion log-probabilities in nats, float64 array of shape
        (n,), and completion token counts, int64 array of shape (n,).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up")
    device = model_device(model)
    was_training = model.training
    model.eval()

    sequences = [tokenize_completion(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    order = np.argsort([-len(ids) for ids, _ in sequences], kind="stable")  # similar lengths share a batch
    logps = np.zeros(len(sequences), dtype=np.float64)
    counts = np.zeros(len(sequences), dtype=np.int64)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        index = order[start : start + batch_size]
        batch = collate_completions([sequences[i] for i in index], pad_id(tokenizer))
        batch = {key: value.to(device) for key, value in batch.items()}
        batch_logps, batch_counts = batch_completion_logps(model, batch)
        logps[index] = batch_logps.double().cpu().numpy()
        counts[index] = batch_counts.long().cpu().numpy()

    model.train(was_training)
    return logps, counts


@dataclass
class PairScores:
    """Log-probabilities of chosen and rejected completions for a list of pairs.

    Attributes:
        chosen_logp: Summed completion log-probabilities in nats, shape (n_pairs,).
        rejected_logp: Same for the rejected completions, shape (n_pairs,).
        chosen_tokens: Completion token counts, shape (n_pairs,).
        rejected_tokens: Completion token counts, shape (n_pairs,).
    """

    chosen_logp: np.ndarray
    rejected_logp: np.ndarray
    chosen_tokens: np.ndarray
    rejected_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen_logp)

    @property
    def wins(self) -> np.ndarray:
        """1.0 where the summed log-probability of chosen exceeds rejected, shape (n_pairs,)."""
        return (self.chosen_logp > self.rejected_logp).astype(np.float64)

    @property
    def wins_normalized(self) -> np.ndarray:
        """1.0 where the per-token mean log-probability of chosen exceeds rejected, shape (n_pairs,)."""
        chosen = self.chosen_logp / np.maximum(self.chosen_tokens, 1)
        rejected = self.rejected_logp / np.maximum(self.rejected_tokens, 1)
        return (chosen > rejected).astype(np.float64)

    def margins(self, reference: "PairScores | None" = None, beta: float = 1.0) -> np.ndarray:
        """Implicit reward margin per pair in nats (times beta), shape (n_pairs,).

        With a reference it is beta * ((logp_c - ref_c) - (logp_r - ref_r)),
        the DPO reward margin; without one it is the raw log-probability gap.
        """
        chosen, rejected = self.chosen_logp, self.rejected_logp
        if reference is not None:
            chosen = chosen - reference.chosen_logp
            rejected = rejected - reference.rejected_logp
        return beta * (chosen - rejected)

    def summary(self, reference: "PairScores | None" = None, beta: float = 0.1) -> dict[str, float]:
        n = len(self)
        return {
            "accuracy": float(self.wins.mean()) if n else float("nan"),
            "accuracy_normalized": float(self.wins_normalized.mean()) if n else float("nan"),
            "margin": float(self.margins(reference, beta).mean()) if n else float("nan"),
            "n": n,
        }

    def to_dict(self) -> dict[str, list]:
        return {name: getattr(self, name).tolist() for name in ("chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> "PairScores":
        return cls(*(np.asarray(data[name]) for name in ("chosen_logp", "rejected_logp", "chosen_tokens", "rejected_tokens")))


def score_pairs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    progress: bool = True,
) -> PairScores:
    """Score preference pairs (`prompt`, `chosen`, `rejected`) under `model`."""
    prompts = [pair["prompt"] for pair in pairs]
    chosen, chosen_tokens = completion_logprobs(
        model, tokenizer, prompts, [p["chosen"] for p in pairs], batch_size=batch_size,
        max_length=max_length, desc="scoring chosen", progress=progress,
    )
    rejected, rejected_tokens = completion_logprobs(
        model, tokenizer, prompts, [p["rejected"] for p in pairs], batch_size=batch_size,
        max_length=max_length, desc="scoring rejected", progress=progress,
    )
    return PairScores(chosen, rejected, chosen_tokens, rejected_tokens)


def dpo_pair_batch(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict[str, Any]], max_length: int | None = 512
) -> dict[str, torch.Tensor]:
    """Collate pairs into one batch laid out as [chosen_0..chosen_B, rejected_0..rejected_B], as TRL does."""
    sequences = [tokenize_completion(tokenizer, p["prompt"], p["chosen"], max_length) for p in pairs]
    sequences += [tokenize_completion(tokenizer, p["prompt"], p["rejected"], max_length) for p in pairs]
    return collate_completions(sequences, pad_id(tokenizer))


def dpo_loss_at_reference(model: PreTrainedModel, batch: dict[str, torch.Tensor], beta: float = 0.1) -> torch.Tensor:
    """Sigmoid DPO loss with the policy equal to the reference, as at step 0 of training.

    The reference log-probabilities are the policy's own, detached, so the
    loss value is ln 2 and its gradient is -beta/2 * (d logp_chosen - d logp_rejected),
    averaged over pairs. Returns a scalar tensor with gradients.
    """
    logps, _ = batch_completion_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    logits = beta * ((chosen - chosen.detach()) - (rejected - rejected.detach()))
    return -F.logsigmoid(logits).mean()


@torch.no_grad()
def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = True,
) -> float:
    """Token-weighted perplexity of `texts`: exp of the mean next-token NLL (nats) over all tokens."""
    logps, counts = completion_logprobs(
        model, tokenizer, [""] * len(texts), list(texts), batch_size=batch_size,
        max_length=max_length, desc="perplexity", progress=progress,
    )
    total_tokens = int(counts.sum())
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one scored token; the texts are empty")
    return float(math.exp(-logps.sum() / total_tokens))
