"""LoRA update norms from real PEFT adapters saved on tiny models."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from analysis.lora_norms import (
    adapter_update_norms,
    layer_table,
    lora_scaling,
    module_location,
    run_update_norms,
    update_matrix,
    update_singular_values,
)
from analysis.runs import RunError, load_run
from probe.models import load_model
from tests.analysis_runs import make_run

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def base_state():
    return load_model("tiny-llama").model.state_dict()


def test_zero_b_gives_zero_update(tmp_path, base_state):
    run = make_run(tmp_path, "zero", set_b=lambda name, weight: weight.zero_())
    norms = run_update_norms(run, base_state_dict=base_state)

    assert norms, "the adapter has modules"
    for norm in norms:
        assert norm.frobenius == 0.0
        assert norm.spectral == 0.0
        assert norm.stable_rank == 0.0
        assert norm.relative == 0.0


def test_known_b_gives_known_norm(tmp_path, base_state):
    # B = c * e_0 e_0^T (one non-zero entry), so delta W = scaling * c * (row 0 of A) placed in row 0.
    def set_b(name, weight):
        weight.zero_()
        weight[0, 0] = 0.5

    run = make_run(tmp_path, "known", rank=4, alpha=8.0, set_b=set_b)
    adapter = load_run(run).adapters[0]
    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    expected = (8.0 / 4) * 0.5 * float(torch.linalg.vector_norm(weights[key][0].double()))

    norms = {norm.module: norm for norm in run_update_norms(run, base_state_dict=base_state)}
    q_proj = norms["model.layers.0.self_attn.q_proj"]
    assert q_proj.frobenius == pytest.approx(expected, rel=1e-12)
    assert q_proj.stable_rank == pytest.approx(1.0, rel=1e-9)
    base = float(torch.linalg.matrix_norm(base_state["model.layers.0.self_attn.q_proj.weight"].double()))
    assert q_proj.relative == pytest.approx(expected / base, rel=1e-12)


def test_norm_matches_dense_update(tmp_path):
    generator = torch.Generator().manual_seed(1)
    run = make_run(tmp_path, "dense", set_b=lambda name, weight: weight.copy_(torch.randn(weight.shape, generator=generator)))
    adapter = load_run(run).adapters[0]
    weights = load_file(str(adapter.path / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.mlp.down_proj"
    dense = update_matrix(weights[f"{prefix}.lora_A.weight"], weights[f"{prefix}.lora_B.weight"], 2.0)
    singular = torch.linalg.svdvals(dense).numpy()

    norms = {norm.module: norm for norm in adapter_update_norms(adapter.path)}
    down = norms["model.layers.0.mlp.down_proj"]
    assert down.frobenius == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=1e-10)
    assert down.spectral == pytest.approx(float(singular[0]), rel=1e-10)
    assert down.stable_rank == pytest.approx(float((singular**2).sum() / singular[0] ** 2), rel=1e-9)
    assert 1.0 <= down.stable_rank <= 4.0


def test_rslora_scaling_uses_sqrt_rank(tmp_path):
    plain = make_run(tmp_path, "plain", rank=4, alpha=8.0)
    rslora = make_run(tmp_path, "rslora", rank=4, alpha=8.0, use_rslora=True)

    plain_norms = {n.module: n for n in adapter_update_norms(load_run(plain).adapters[0].path)}
    rslora_norms = {n.module: n for n in adapter_update_norms(load_run(rslora).adapters[0].path)}

    assert lora_scaling(8.0, 4, use_rslora=True) == 4.0
    for module, norm in rslora_norms.items():
        assert norm.scaling == 4.0
        assert plain_norms[module].scaling == 2.0
        # Same seed, same factors: the rsLoRA update is exactly twice the plain one.
        assert norm.frobenius == pytest.approx(2.0 * plain_norms[module].frobenius, rel=1e-12)


def test_rank_and_alpha_patterns_apply_per_module(tmp_path):
    run = make_run(
        tmp_path, "patterns", rank=4, alpha=8.0,
        rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3.0},
    )
    norms = {n.module: n for n in adapter_update_norms(load_run(run).adapters[0].path)}

    assert norms["model.layers.0.self_attn.q_proj"].rank == 2
    assert norms["model.layers.0.self_attn.q_proj"].scaling == 4.0
    assert norms["model.layers.0.mlp.down_proj"].alpha == 3.0
    assert norms["model.layers.0.mlp.down_proj"].scaling == 0.75
    assert norms["model.layers.0.self_attn.v_proj"].scaling == 2.0


def test_layer_table_marks_not_adapted(tmp_path, base_state):
    run = make_run(tmp_path, "local", layers=[0])
    info = load_run(run)
    table = layer_table(run_update_norms(info, base_state_dict=base_state), info.num_layers, partition=info.partition)

    assert table.module_types == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    assert table.adapted_layers == [0]
    assert table.values["frobenius"].shape == (4, 3)
    assert np.all(table.values["frobenius"][0] > 0)
    assert np.all(np.isnan(table.values["frobenius"][1:]))
    assert np.all(np.isnan(table.layer_frobenius[1:]))
    expected_layer = math.sqrt(float(np.sum(table.values["frobenius"][0] ** 2)))
    assert table.layer_frobenius[0] == pytest.approx(expected_layer)
    assert table.to_dict()["values"]["frobenius"][2] == [None, None, None]


def test_zero_update_is_not_not_adapted(tmp_path):
    run = make_run(tmp_path, "zero", layers=[1], set_b=lambda name, weight: weight.zero_())
    info = load_run(run)
    table = layer_table(run_update_norms(info, load_base=False), info.num_layers)

    assert table.adapted_layers == [1]
    assert table.layer_frobenius[1] == 0.0
    assert np.isnan(table.layer_relative[1])


def test_gpt2_conv1d_modules_found(tmp_path):
    run = make_run(tmp_path, "gpt2", model="tiny-gpt2", layers=[2, 3])
    info = load_run(run)
    table = layer_table(run_update_norms(info), info.num_layers)

    assert table.module_types == ["attn.c_attn", "mlp.c_fc"]
    assert table.adapted_layers == [2, 3]
    assert np.all(table.values["relative"][2:] > 0)


def test_singular_values_of_zero_factors():
    assert np.all(update_singular_values(torch.zeros(3, 5), torch.zeros(7, 3), 2.0) == 0.0)


def test_module_location_splits_layer():
    assert module_location("model.layers.12.self_attn.q_proj", "model.layers") == (12, "self_attn.q_proj")
    assert module_location("transformer.h.0.attn.c_attn", "transformer.h") == (0, "attn.c_attn")
    assert module_location("lm_head", "model.layers") == (None, "lm_head")


def test_run_without_config_is_rejected(tmp_path):
    with pytest.raises(RunError, match="has no config.json"):
        load_run(tmp_path)
