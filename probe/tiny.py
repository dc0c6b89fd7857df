"""Tiny random-weight models and a byte-level tokenizer, built offline from configs.

They exist for tests, examples and quick smoke runs of the whole pipeline: the
weights are random, so nothing they output means anything. Each family mirrors
the layout of a real architecture (`model.layers`, `transformer.h`, ...), so the
layer resolver, probing and LoRA targeting run against real model code.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

TinyFamily = Literal["llama", "qwen2", "gemma3", "gpt2"]
TINY_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "gemma3", "gpt2")

_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

# A ChatML-style template, so conversational data and chat prompts work with tiny models too.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build a byte-level tokenizer: one token per UTF-8 byte plus pad, bos and eos.

    Returns:
        A fast tokenizer with 259 tokens. Ids 0-255 are the byte-level alphabet
        and 256-258 are `<pad>`, `<bos>`, `<eos>`.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>"})
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: TinyFamily, *, num_layers: int = 4, vocab_size: int = 259):
    """Return a small config of the given family: hidden size 32, 4 heads, `num_layers` layers."""
    tokenizer_ids = {"pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False, **tokenizer_ids,
        )
    if family == "qwen2":
        return Qwen2Config(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False, **tokenizer_ids,
        )
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
            num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=1024, sliding_window=64, **tokenizer_ids,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=num_layers, n_head=4, n_positions=1024,
            bos_token_id=257, eos_token_id=258, pad_token_id=256,
        )
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")


def build_tiny_model(family: TinyFamily, *, num_layers: int = 4, seed: int = 0) -> PreTrainedModel:
    """Build a random-weight causal LM of the given family, identical for the same seed.

    Args:
        family: Architecture family: "llama", "qwen2", "gemma3" or "gpt2".
        num_layers: Number of decoder layers.
        seed: Seed of the weight initialisation.
    """
    config = tiny_config(family, num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = 256
    model.eval()
    return model
