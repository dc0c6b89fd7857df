"""Activation capture: pooling under padding, early stop, streaming and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.activations import capture_batch, extract_features, pool_hidden
from probe.attribution import attribution_mass, dpo_gradient_attribution
from probe.models import load_model

TEXTS = ["The cat sat on the mat.", "Hi", "A much longer sentence that goes on for a while longer.", "Dogs bark.", "Yes"]


def test_pool_hidden_masks_padding_both_sides():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mean_right, last_right = pool_hidden(hidden, right)
    mean_left, last_left = pool_hidden(hidden, left)
    # The mean skips the first real token (an attention sink in many LMs).
    assert torch.allclose(mean_right[0], hidden[0, 1])
    assert torch.equal(last_right[0], hidden[0, 1])
    assert torch.allclose(mean_left[0], hidden[0, 3])
    assert torch.equal(last_left[0], hidden[0, 3])
    assert torch.allclose(mean_right[1], hidden[1, 1:].mean(0))
    assert torch.equal(last_right[1], hidden[1, 3])


def test_pool_hidden_keeps_single_token():
    hidden = torch.randn(2, 3, 4)
    left = torch.tensor([[0, 0, 1], [0, 1, 1]])
    mean, last = pool_hidden(hidden, left)
    assert torch.equal(mean[0], hidden[0, 2])
    assert torch.equal(last[0], hidden[0, 2])
    assert torch.allclose(mean[1], hidden[1, 2])


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-gemma3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_features_match_single_examples(tmp_path, model_name, padding_side):
    loaded = load_model(model_name)
    loaded.tokenizer.padding_side = padding_side
    single = extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS, tmp_path / "one",
                              batch_size=1, progress=False)
    batched = extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS, tmp_path / "all",
                               batch_size=len(TEXTS), progress=False)
    for pooling in ("mean", "last"):
        np.testing.assert_allclose(batched.all_layers(pooling), single.all_layers(pooling), rtol=2e-3, atol=2e-3)


def test_features_match_hidden_states(tmp_path):
    loaded = load_model("tiny-llama")
    features = extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS[:1], tmp_path,
                                batch_size=1, progress=False)
    encoded = loaded.tokenizer(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        hidden = loaded.model(**encoded, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of layer i; the last entry already has the final norm applied.
    for layer in range(loaded.num_layers - 1):
        expected = hidden[layer + 1][0, 1:].mean(0).numpy()
        np.testing.assert_allclose(features.layer(layer, "mean")[0], expected, rtol=2e-3, atol=2e-3)


def test_capture_stops_after_deepest_layer():
    loaded = load_model("tiny-llama")
    calls = []
    handle = loaded.model.lm_head.register_forward_hook(lambda *args: calls.append("lm_head"))
    last_layer = loaded.stack.layers[3].register_forward_hook(lambda *args: calls.append("layer3"))
    encoded = loaded.tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    pooled = capture_batch(loaded.model, loaded.stack, encoded["input_ids"], encoded["attention_mask"], [0, 2])
    handle.remove()
    last_layer.remove()
    assert calls == []
    assert pooled["mean"].shape == (2, 2, 32)


def test_extract_features_resumes_after_interruption(tmp_path):
    loaded = load_model("tiny-llama")
    complete = extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS, tmp_path / "full",
                                batch_size=2, progress=False)

    calls = {"n": 0}
    layer = loaded.stack.layers[0]

    def fail_on_third_batch(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    handle = layer.register_forward_hook(fail_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS, tmp_path / "resumed",
                         batch_size=2, progress=False)
    handle.remove()

    counter = {"n": 0}
    handle = layer.register_forward_hook(lambda *args: counter.__setitem__("n", counter["n"] + 1))
    resumed = extract_features(loaded.model, loaded.tokenizer, loaded.stack, TEXTS, tmp_path / "resumed",
                               batch_size=2, progress=False, resume=True)
    handle.remove()
    assert counter["n"] == 1  # only the last batch of one example was recomputed
    np.testing.assert_array_equal(resumed.all_layers("mean"), complete.all_layers("mean"))


def test_attribution_is_per_pair_and_relative():
    loaded = load_model("tiny-gpt2")
    pairs = [{"prompt": "Q: 2+2?\n", "chosen": "4", "rejected": "5"},
             {"prompt": "Capital of Peru?\n", "chosen": "Lima", "rejected": "Oslo"}]
    before = {name: p.requires_grad for name, p in loaded.model.named_parameters()}
    rows = dpo_gradient_attribution(loaded.model, loaded.tokenizer, loaded.stack, pairs, progress=False)
    assert rows.shape == (2, 4)
    assert np.all(rows > 0)
    assert {name: p.requires_grad for name, p in loaded.model.named_parameters()} == before
    assert all(p.grad is None for p in loaded.model.parameters())
    single = dpo_gradient_attribution(loaded.model, loaded.tokenizer, loaded.stack, pairs[:1], progress=False)
    np.testing.assert_allclose(single[0], rows[0], rtol=1e-5)


def test_attribution_mass_sums_to_one():
    masses = attribution_mass(np.array([1.0, 1.0, 2.0, 4.0]), [(0, 2), (2, 3), (3, 4)])
    assert masses == pytest.approx([0.25, 0.25, 0.5])
    assert attribution_mass(np.zeros(3), [(0, 3)]) == [0.0]
