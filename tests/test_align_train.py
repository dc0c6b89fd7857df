"""Training tests of align on tiny random models: what changes, what is saved, the guards, routed and resume."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.config import AlignConfig, AlignConfigError
from align.evaluate import compose_adapters
from align.guards import NonFiniteLossError, ReferenceMismatchError
from align.strategy import plan_adapters
from align.trainer import run_alignment
from probe.models import load_model
from probe.partition import Partition
from probe.tiny import build_tiny_model

CAPABILITIES = ("syntax", "logic", "facts")
REPO = Path(__file__).resolve().parents[1]


def write_pairs(path: Path, per_capability: int = 8) -> Path:
    """Write short preference pairs whose prompts start with their capability, so batches can be traced."""
    rows = []
    for capability in CAPABILITIES:
        for index in range(per_capability):
            rows.append({"prompt": f"{capability} {index}: ", "chosen": "yes", "rejected": "no",
                         "capability": capability})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def pairs(tmp_path) -> Path:
    return write_pairs(tmp_path / "pairs.jsonl")


def small_config(tmp_path: Path, data: Path, **overrides) -> AlignConfig:
    settings = {
        "model": "tiny-llama", "data": str(data), "output_dir": str(tmp_path / "runs"), "max_steps": 3,
        "learning_rate": 1e-2, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 50,
        "max_length": 64, "eval_heldout": False,
    }
    settings.update(overrides)
    return AlignConfig(**settings)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter_layers(adapter_dir: Path) -> set[int]:
    keys = load_file(str(adapter_dir / "adapter_model.safetensors")).keys()
    return {int(re.search(r"\.(?:layers|h)\.(\d+)\.", key).group(1)) for key in keys}


class Snapshot(TrainerCallback):
    """Copy every parameter at the start and the end of training."""

    def __init__(self):
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {name: p.detach().clone() for name, p in model.named_parameters()}

    def changed(self) -> set[str]:
        return {name for name in self.before if not torch.equal(self.before[name], self.after[name])}


class RecordPrompts(TrainerCallback):
    """Record the decoded prompts of the training set each trainer sees."""

    def __init__(self):
        self.prompts: list[list[str]] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, processing_class=None, **kwargs):
        dataset = train_dataloader.dataset
        self.prompts.append([processing_class.decode(ids) for ids in dataset["prompt_ids"]])


# -- single-block training -------------------------------------------------------


def test_global_block_changes_only_its_lora(tmp_path, pairs):
    snapshot = Snapshot()
    run_dir = run_alignment(small_config(tmp_path, pairs), callbacks=[snapshot])

    changed = snapshot.changed()
    assert changed, "training changed no parameter"
    assert all(".lora_" in name for name in changed), f"non-LoRA parameters changed: {sorted(changed)}"
    assert {int(re.search(r"\.layers\.(\d+)\.", name).group(1)) for name in changed} == {3}
    # Every LoRA B of layer 3 left zero, so each module of the block trained.
    lora_b = [name for name in snapshot.after if ".lora_B." in name]
    assert len(lora_b) == 7
    assert all(snapshot.after[name].abs().sum() > 0 for name in lora_b)

    base = build_tiny_model("llama").state_dict()
    for name, value in snapshot.after.items():
        if ".lora_" in name:
            continue
        base_name = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(value, base[base_name]), f"frozen weight {base_name} changed"

    assert adapter_layers(run_dir / "adapter") == {3}


def test_step0_loss_is_ln2(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs))
    first = read_metrics(run_dir)[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["rewards/margins"] == 0.0


def test_run_directory_layout(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs, logging_steps=1))
    assert run_dir == tmp_path / "runs" / "tiny-llama-global-s0"
    record = json.loads((run_dir / "config.json").read_text())
    assert record["strategy"] == "global"
    assert record["blocks"] == ["global"]
    assert record["adapted_layers"] == [3]
    assert record["model"]["num_layers"] == 4
    assert record["model"]["layers_path"] == "model.layers"
    assert record["adapters"] == [{"name": "default", "blocks": ["global"], "layers": [3],
                                   "capability": "facts", "path": "adapter"}]
    assert record["partition"]["blocks"][2]["name"] == "global"
    assert set(record["versions"]) >= {"torch", "transformers", "trl", "peft", "hieralign"}
    coverage = record["coverage"]["default"]
    assert coverage["layers"] == [3]
    assert coverage["ranks"] == {"3": [8, 16.0]}
    assert [row["trainable_params"] > 0 for row in coverage["blocks"]] == [False, False, True]
    assert [line["step"] for line in read_metrics(run_dir)] == [1, 2, 3]


def test_adapter_loads_with_rank_and_alpha(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs, lora_r=4, lora_alpha=12))
    model = PeftModel.from_pretrained(build_tiny_model("llama"), str(run_dir / "adapter"))
    q_proj = model.base_model.model.model.layers[3].self_attn.q_proj
    assert q_proj.r["default"] == 4
    assert q_proj.lora_alpha["default"] == 12
    assert q_proj.lora_A["default"].weight.shape == (4, 32)
    assert not hasattr(model.base_model.model.model.layers[2].self_attn.q_proj, "lora_A")


def test_gradient_checkpointing_above_layer_0(tmp_path, pairs):
    snapshot = Snapshot()
    run_alignment(small_config(tmp_path, pairs, gradient_checkpointing=True), callbacks=[snapshot])
    changed = snapshot.changed()
    assert any(".layers.3." in name and ".lora_B." in name for name in changed)


def test_full_strategy_trains_every_layer(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs, strategy="full", max_steps=2))
    assert adapter_layers(run_dir / "adapter") == {0, 1, 2, 3}


def test_rank_by_attribution_in_adapter(tmp_path, pairs):
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps({
        "schema_version": 1, "model": {"name": "tiny-llama", "num_layers": 4},
        "blocks": [{"name": "low", "start": 0, "end": 2, "capability": "syntax", "attribution_mass": 0.25},
                   {"name": "high", "start": 2, "end": 4, "capability": "facts", "attribution_mass": 0.75}],
    }))
    run_dir = run_alignment(small_config(tmp_path, pairs, partition=str(partition), strategy="full",
                                         rank_by="attribution", max_steps=1))
    model = PeftModel.from_pretrained(build_tiny_model("llama"), str(run_dir / "adapter"))
    layers = model.base_model.model.model.layers
    assert layers[0].mlp.up_proj.r["default"] == 4
    assert layers[3].mlp.up_proj.r["default"] == 12
    assert layers[3].mlp.up_proj.lora_alpha["default"] == 24


def test_rank_by_attribution_routed_shares_unit(tmp_path, pairs):
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps({
        "schema_version": 1, "model": {"name": "tiny-llama", "num_layers": 4},
        "blocks": [{"name": "low", "start": 0, "end": 2, "capability": "syntax", "attribution_mass": 0.25},
                   {"name": "high", "start": 2, "end": 4, "capability": "facts", "attribution_mass": 0.75}],
    }))
    run_dir = run_alignment(small_config(tmp_path, pairs, partition=str(partition), strategy="routed",
                                         rank_by="attribution", max_steps=1))
    low = json.loads((run_dir / "adapter" / "low" / "adapter_config.json").read_text())
    high = json.loads((run_dir / "adapter" / "high" / "adapter_config.json").read_text())
    assert list(low["rank_pattern"].values()) == [4]
    assert list(high["rank_pattern"].values()) == [12]


def test_gpt2_family_trains(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs, model="tiny-gpt2", strategy="local", max_steps=2))
    assert adapter_layers(run_dir / "adapter") == {0}


# -- routed ----------------------------------------------------------------------


def test_routed_trains_each_adapter_on_its_data(tmp_path, pairs):
    recorder = RecordPrompts()
    run_dir = run_alignment(small_config(tmp_path, pairs, strategy="routed", max_steps=2), callbacks=[recorder])

    assert len(recorder.prompts) == 3
    for capability, prompts in zip(CAPABILITIES, recorder.prompts):
        assert len(prompts) == 8
        assert all(prompt.startswith(capability) for prompt in prompts), (capability, prompts[:2])
    for name, layers in (("local", {0}), ("intermediate", {1, 2}), ("global", {3})):
        assert adapter_layers(run_dir / "adapter" / name) == layers

    record = json.loads((run_dir / "config.json").read_text())
    assert [a["path"] for a in record["adapters"]] == ["adapter/local", "adapter/intermediate", "adapter/global"]
    assert sorted(record["coverage"]) == ["global", "intermediate", "local"]
    assert {line["adapter"] for line in read_metrics(run_dir)} == {"local", "intermediate", "global"}

    # Composed at inference: all three adapters active, each on its own layers.
    config = small_config(tmp_path, pairs, strategy="routed")
    _, adapters = plan_adapters(Partition.thirds(4), config)
    model = compose_adapters(load_model("tiny-llama"), run_dir, adapters)
    assert sorted(model.base_model.active_adapters) == ["global", "intermediate", "local"]
    layers = model.base_model.model.model.layers
    assert set(layers[0].self_attn.q_proj.lora_A) == {"local"}
    assert set(layers[3].self_attn.q_proj.lora_A) == {"global"}


def test_routed_needs_capability_column(tmp_path):
    data = tmp_path / "plain.jsonl"
    data.write_text('{"prompt": "a ", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    with pytest.raises(AlignConfigError, match="has no `capability` values"):
        run_alignment(small_config(tmp_path, data, strategy="routed"))


# -- guards ----------------------------------------------------------------------


class PoisonLora(TrainerCallback):
    """Fill every LoRA B matrix with `value` at a chosen moment."""

    def __init__(self, event: str, value: float, step: int = 0):
        self.event, self.value, self.step = event, value, step

    def poison(self, model, state):
        if state.global_step != self.step:
            return
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.data.fill_(self.value)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.event == "begin":
            self.poison(model, state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.event == "step_end":
            self.poison(model, state)


def test_nonfinite_loss_stops_with_checkpoint(tmp_path, pairs):
    config = small_config(tmp_path, pairs, max_steps=5)
    with pytest.raises(NonFiniteLossError) as caught:
        run_alignment(config, callbacks=[PoisonLora("step_end", float("nan"), step=1)])
    message = str(caught.value)
    run_dir = tmp_path / "runs" / "tiny-llama-global-s0"
    assert "at step 2, micro-batch 0" in message
    assert str(run_dir / "checkpoints" / "checkpoint-2") in message
    assert (run_dir / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()
    batch = json.loads((run_dir / "nonfinite_batch_default.json").read_text())
    assert batch["step"] == 2
    assert len(batch["texts"]) == 4  # two pairs: two chosen rows, then two rejected rows
    assert not (run_dir / "adapter").exists()


def test_step0_mismatch_stops_training(tmp_path, pairs):
    with pytest.raises(ReferenceMismatchError, match="the DPO loss at step 0 is"):
        run_alignment(small_config(tmp_path, pairs), callbacks=[PoisonLora("begin", 5.0)])


def test_stuck_loss_warns(tmp_path, pairs, caplog):
    config = small_config(tmp_path, pairs, learning_rate=1e-12, max_steps=10)
    with caplog.at_level("WARNING", logger="align.guards"):
        run_alignment(config)
    assert "still within 1e-04 of ln 2" in caplog.text


def test_existing_run_needs_resume(tmp_path, pairs):
    config = small_config(tmp_path, pairs, max_steps=1)
    run_alignment(config)
    with pytest.raises(AlignConfigError, match="already contains a run; continue it with `align --output-dir"):
        run_alignment(config)
    changed = small_config(tmp_path, pairs, max_steps=1, lora_r=4, resume=True)
    with pytest.raises(AlignConfigError, match=r"lora_r: 8 -> 4"):
        run_alignment(changed)


def test_model_with_adapter_rejected_or_merged(tmp_path, pairs):
    from peft import LoraConfig, get_peft_model

    base_dir = tmp_path / "base"
    tiny = load_model("tiny-llama")
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    sft = get_peft_model(build_tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    sft_dir = tmp_path / "sft"
    sft.save_pretrained(sft_dir)
    adapter_config = json.loads((sft_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(base_dir)
    (sft_dir / "adapter_config.json").write_text(json.dumps(adapter_config))
    tiny.tokenizer.save_pretrained(sft_dir)

    with pytest.raises(AlignConfigError, match="already carries a PEFT adapter"):
        run_alignment(small_config(tmp_path, pairs, model=str(sft_dir), run_name="sft"))
    run_dir = run_alignment(small_config(tmp_path, pairs, model=str(sft_dir), merge_adapter=True,
                                         run_name="merged", max_steps=1))
    assert adapter_layers(run_dir / "adapter") == {3}


# -- resume after kill -9 ------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from align.config import AlignConfig
    from align.trainer import run_alignment

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    config = AlignConfig(**{json_config})
    run_alignment(config, callbacks=[KillAt()])
""")


def test_resume_after_kill_matches_uninterrupted(tmp_path, pairs):
    settings = {"max_steps": 6, "save_steps": 2, "strategy": "full"}
    reference_dir = run_alignment(small_config(tmp_path, pairs, run_name="straight", **settings))

    config = small_config(tmp_path, pairs, run_name="killed", **settings)
    script = KILL_SCRIPT.replace("{json_config}", repr(config.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    killed_dir = tmp_path / "runs" / "killed"
    assert (killed_dir / "checkpoints" / "checkpoint-2").is_dir()
    assert not (killed_dir / "adapter").exists()

    resumed = AlignConfig(**{**config.to_dict(), "resume": True})
    run_alignment(resumed)

    straight, again = read_metrics(reference_dir), read_metrics(killed_dir)
    assert [line["step"] for line in again] == [1, 2, 3, 4, 5, 6]
    assert again[-1]["loss"] == pytest.approx(straight[-1]["loss"], abs=1e-6)
    assert again[-1]["rewards/margins"] == pytest.approx(straight[-1]["rewards/margins"], abs=1e-6)
    weights_straight = load_file(str(reference_dir / "adapter" / "adapter_model.safetensors"))
    weights_again = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    for key, value in weights_straight.items():
        torch.testing.assert_close(weights_again[key], value, rtol=0, atol=1e-6)


# -- command line ------------------------------------------------------------------


def test_metrics_written_below_logging_steps(tmp_path, pairs):
    run_dir = run_alignment(small_config(tmp_path, pairs, max_steps=2, logging_steps=5))
    assert [line["step"] for line in read_metrics(run_dir)] == [2]


def test_run_hides_checkpointing_deprecation(tmp_path, pairs):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_alignment(small_config(tmp_path, pairs, max_steps=1))
    messages = [str(warning.message) for warning in caught]
    assert not [message for message in messages if "is_gradient_checkpointing" in message]


def test_cli_resume_needs_only_run_directory(tmp_path, pairs, capsys):
    from align.cli import main

    output_dir = str(tmp_path / "R")
    assert main(["--model", "tiny-llama", "--data", str(pairs), "--max-steps", "2", "--max-length", "64",
                 "--no-eval-heldout", "--output-dir", output_dir]) == 0
    assert main(["--run-name", "tiny-llama-global-s0", "--output-dir", output_dir, "--resume"]) == 0
    assert main(["--run-name", "tiny-llama-global-s0", "--output-dir", output_dir, "--resume",
                 "--max-steps", "3"]) == 2
    assert "max_steps: 2 -> 3" in capsys.readouterr().err


def test_failed_step0_check_removes_run_directory(tmp_path, pairs):
    config = small_config(tmp_path, pairs)
    with pytest.raises(ReferenceMismatchError):
        run_alignment(config, callbacks=[PoisonLora("begin", 5.0)])
    assert not (tmp_path / "runs" / "tiny-llama-global-s0").exists()
    run_alignment(config)
