"""Gradient attribution: where in depth the DPO loss pushes, per capability.

For each preference pair the sigmoid DPO loss is taken at step 0, where the
policy equals the reference, so it is well defined without training. Its
gradient is split by decoder layer; the per-layer L2 norm is divided by that
layer's parameter L2 norm and averaged over pairs (never summed).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from probe.layers import LayerStack
from probe.scoring import dpo_loss_at_reference, dpo_pair_batch

logger = logging.getLogger(__name__)


def layer_parameter_norms(stack: LayerStack) -> np.ndarray:
    """L2 norm of all parameters of each decoder layer, float64 of shape (n_layers,)."""
    norms = []
    for layer in stack.layers:
        squared = sum(float(p.detach().double().pow(2).sum()) for p in layer.parameters())
        norms.append(squared ** 0.5)
    return np.asarray(norms)


def layer_gradient_norms(stack: LayerStack) -> np.ndarray:
    """L2 norm of the current `.grad` of each decoder layer's parameters, float64 of shape (n_layers,)."""
    norms = []
    for layer in stack.layers:
        squared = sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters() if p.grad is not None)
        norms.append(squared ** 0.5)
    return np.asarray(norms)


def dpo_gradient_attribution(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stack: LayerStack,
    pairs: Sequence[dict[str, Any]],
    *,
    beta: float = 0.1,
    max_length: int = 256,
    desc: str = "attribution",
    progress: bool = True,
) -> np.ndarray:
    """Per-layer relative gradient norm of the step-0 DPO loss, averaged over pairs.

    Args:
        model: The causal LM (its parameters receive gradients temporarily).
        tokenizer: Its tokenizer.
        stack: The resolved decoder layers.
        pairs: Preference pairs with `prompt`, `chosen`, `rejected`.
        beta: DPO beta; it scales every layer alike, so the shape of the
            profile does not depend on it.
        max_length: Truncation length in tokens.

    Returns:
        float64 array of shape (n_pairs, n_layers): for each pair, the L2 norm
        of the loss gradient with respect to each layer's parameters divided
        by the L2 norm of those parameters (dimensionless).
    """
    if not pairs:
        raise ValueError("gradient attribution needs at least one preference pair, got none")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the step-0 gradient must be deterministic
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in stack.layers.parameters():
        parameter.requires_grad_(True)

    parameter_norms = np.maximum(layer_parameter_norms(stack), np.finfo(np.float64).tiny)
    rows = []
    try:
        for pair in tqdm(pairs, desc=desc, disable=not progress, leave=False):
            model.zero_grad(set_to_none=True)
            batch = {k: v.to(device) for k, v in dpo_pair_batch(tokenizer, [pair], max_length).items()}
            dpo_loss_at_reference(model, batch, beta).backward()
            rows.append(layer_gradient_norms(stack) / parameter_norms)
    finally:
        model.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        model.train(was_training)
    return np.stack(rows)


def attribution_mass(profile: np.ndarray, blocks: Sequence[tuple[int, int]]) -> list[float]:
    """Share of a per-layer profile that falls in each block.

    Args:
        profile: Non-negative per-layer values, shape (n_layers,).
        blocks: Half-open layer ranges covering the profile.

    Returns:
        One share per block, summing to 1 (all zeros if the profile is zero).
    """
    total = float(np.sum(profile))
    if total <= 0:
        return [0.0 for _ in blocks]
    return [float(np.sum(profile[start:end]) / total) for start, end in blocks]
