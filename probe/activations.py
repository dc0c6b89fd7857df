"""Pooled hidden states of every decoder layer from one forward pass per batch.

Forward hooks on the decoder layers pool each layer's output over real
tokens (padding masked) two ways: the mean over real tokens and the last real
token (the mean leaves out the first token, see `pool_hidden`). The forward
pass stops right after the deepest requested layer, so the
final norm and the LM head never run. Features stream to disk as float16, so
memory does not grow with the number of examples, and an interrupted capture
resumes from the last finished batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from probe.io import write_json_atomic
from probe.layers import LayerStack

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "last"]
POOLINGS: tuple[str, ...] = ("mean", "last")
FEATURES_FORMAT_VERSION = 2  # 2: the mean leaves out the first real token


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer to skip the rest of the forward pass."""


def layer_output_tensor(output: object) -> torch.Tensor:
    """Return the hidden states of a decoder layer's output, shape (batch, seq, hidden).

    Decoder layers return a tensor or a tuple whose first element is the
    hidden states, depending on the architecture and transformers version.
    """
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise RuntimeError(f"expected a decoder layer output of shape (batch, seq, hidden), got {shape}")
    return hidden


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool hidden states over real tokens.

    The mean leaves out the first real token of every sequence that has more
    than one. Many causal LMs park a massive activation on the first token (an
    attention sink): in SmolLM2-135M its hidden-state norm is about 25,000 from
    layer 11 on, against about 200 for other tokens, so a plain mean would
    mostly measure that one nearly constant vector.

    Args:
        hidden: Layer output, shape (batch, seq, hidden).
        attention_mask: 1 for real tokens and 0 for padding, shape (batch, seq).
            Left and right padding both work.

    Returns:
        Mean over real tokens after the first and the last real token's state,
        each float32 of shape (batch, hidden).
    """
    mask = attention_mask.to(hidden.device, torch.float32)
    states = hidden.float()
    rows = torch.arange(states.shape[0], device=states.device)

    first_index = mask.argmax(dim=1)  # first position where mask == 1
    content = mask.clone()
    content[rows, first_index] = torch.where(mask.sum(dim=1) > 1, 0.0, mask[rows, first_index])
    counts = content.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (states * content.unsqueeze(-1)).sum(dim=1) / counts

    positions = torch.arange(mask.shape[1], device=mask.device, dtype=torch.float32)
    last_index = (mask * (positions + 1)).argmax(dim=1)  # index of the last position where mask == 1
    last = states[rows, last_index]
    return mean, last


@torch.no_grad()
def capture_batch(
    model: PreTrainedModel,
    stack: LayerStack,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: Sequence[int],
) -> dict[Pooling, torch.Tensor]:
    """Run one forward pass and pool the outputs of `layers`.

    Args:
        model: The causal LM whose decoder layers are `stack.layers`.
        stack: The resolved decoder layers.
        input_ids: Token ids, shape (batch, seq).
        attention_mask: Padding mask, shape (batch, seq).
        layers: Layer indices to capture, 0-based.

    Returns:
        "mean" and "last" pooled features, each float32 of shape
        (batch, len(layers), hidden), in the order of `layers`.
    """
    wanted = sorted(set(layers))
    deepest = wanted[-1]
    pooled: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(index: int):
        def hook(module, args, output):
            pooled[index] = pool_hidden(layer_output_tensor(output), attention_mask)
            if index == deepest:
                raise _StopForward

        return hook

    handles = [stack.layers[index].register_forward_hook(make_hook(index)) for index in wanted]
    # Positions count real tokens only, so a left-padded example gets the same positions as an unpadded one.
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()

    missing = [index for index in wanted if index not in pooled]
    if missing:
        raise RuntimeError(f"the forward pass never reached decoder layers {missing}; check --layers-path")
    return {
        "mean": torch.stack([pooled[index][0] for index in layers], dim=1),
        "last": torch.stack([pooled[index][1] for index in layers], dim=1),
    }


@dataclass
class LayerFeatures:
    """Pooled features of every captured layer, stored on disk as float16.

    Attributes:
        directory: Folder with `meta.json`, `mean.f16` and `last.f16`.
        layers: Captured layer indices, 0-based.
        n_examples: Number of examples.
        hidden_size: Width of each feature vector.
    """

    directory: Path
    layers: list[int]
    n_examples: int
    hidden_size: int

    def _memmap(self, pooling: Pooling) -> np.memmap:
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        shape = (self.n_examples, len(self.layers), self.hidden_size)
        return np.memmap(self.directory / f"{pooling}.f16", dtype=np.float16, mode="r", shape=shape)

    def layer(self, position: int, pooling: Pooling = "mean", index: np.ndarray | None = None) -> np.ndarray:
        """Features of the `position`-th captured layer, float32 of shape (n_examples, hidden_size)."""
        data = self._memmap(pooling)
        rows = data[:, position, :] if index is None else data[index, position, :]
        return np.asarray(rows, dtype=np.float32)

    def all_layers(self, pooling: Pooling = "mean", index: np.ndarray | None = None) -> np.ndarray:
        """Read all features, float32 of shape (n_layers, n_examples, hidden_size)."""
        return np.stack([self.layer(position, pooling, index) for position in range(len(self.layers))])


def texts_fingerprint(texts: Sequence[str], extra: dict) -> str:
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def extract_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    stack: LayerStack,
    texts: Sequence[str],
    out_dir: str | Path,
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    max_length: int = 256,
    resume: bool = True,
    model_name: str = "",
    progress: bool = True,
) -> LayerFeatures:
    """Capture pooled features of `texts` at every layer and stream them to `out_dir`.

    Args:
        model: The causal LM.
        tokenizer: Its tokenizer; its `padding_side` is respected.
        stack: The resolved decoder layers.
        texts: Input texts, one example each.
        out_dir: Folder for the feature files.
        layers: Layers to capture (default all).
        batch_size: Examples per forward pass.
        max_length: Truncation length in tokens.
        resume: Reuse finished batches of an earlier capture of the same
            texts, model and settings.
        model_name: Recorded in the metadata to detect a changed model.
        progress: Show a progress bar.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = list(range(stack.num_layers)) if layers is None else list(layers)
    hidden_size = int(model.config.get_text_config().hidden_size)
    settings = {"model": model_name, "layers": layers, "max_length": max_length, "hidden_size": hidden_size,
                "format_version": FEATURES_FORMAT_VERSION}
    fingerprint = texts_fingerprint(texts, settings)
    meta_path = out_dir / "meta.json"

    done = finished_examples(meta_path, fingerprint) if resume else 0
    if done:
        logger.info("resuming feature capture at example %d of %d", done, len(texts))
    row_bytes = len(layers) * hidden_size * 2  # float16
    files = {pooling: open_feature_file(out_dir / f"{pooling}.f16", done * row_bytes) for pooling in POOLINGS}

    device = next(model.parameters()).device
    try:
        starts = range(done, len(texts), batch_size)
        for start in tqdm(starts, desc="capturing activations", disable=not progress, unit="batch"):
            batch_texts = list(texts[start : start + batch_size])
            encoded = tokenizer(batch_texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            pooled = capture_batch(model, stack, encoded["input_ids"].to(device), encoded["attention_mask"].to(device), layers)
            for pooling in POOLINGS:
                files[pooling].write(pooled[pooling].to(torch.float16).cpu().numpy().tobytes())
                files[pooling].flush()
            # The metadata is written after the data, so a crash never claims a batch that is not on disk.
            write_meta(meta_path, fingerprint, settings, start + len(batch_texts), len(texts))
    finally:
        for handle in files.values():
            handle.close()

    write_meta(meta_path, fingerprint, settings, len(texts), len(texts))
    return LayerFeatures(out_dir, layers, len(texts), hidden_size)


def open_feature_file(path: Path, keep_bytes: int):
    """Open a feature file for appending after its first `keep_bytes` bytes, dropping the rest."""
    handle = path.open("r+b" if path.exists() and keep_bytes else "wb")
    handle.truncate(keep_bytes)
    handle.seek(keep_bytes)
    return handle


def finished_examples(meta_path: Path, fingerprint: str) -> int:
    if not meta_path.is_file():
        return 0
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return 0
    return int(meta.get("done", 0)) if meta.get("fingerprint") == fingerprint else 0


def write_meta(meta_path: Path, fingerprint: str, settings: dict, done: int, total: int) -> None:
    write_json_atomic(meta_path, {"fingerprint": fingerprint, "done": done, "total": total, **settings})
