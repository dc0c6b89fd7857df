"""align under `accelerate launch`, and the real SmolLM2 (integration)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

from align.config import AlignConfig
from align.trainer import run_alignment
from probe.models import load_model

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def write_pairs(path: Path, count: int = 6) -> Path:
    rows = [{"prompt": f"item {index}: ", "chosen": "yes", "rejected": "no"} for index in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def launch(launcher_flags: list[str], tmp_path: Path, env_extra: dict[str, str]) -> Path:
    data = write_pairs(tmp_path / "pairs.jsonl")
    command = [
        ACCELERATE, "launch", *launcher_flags, "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "align.cli", "--model", "tiny-llama", "--data", str(data),
        "--max-steps", "2", "--per-device-batch-size", "1", "--logging-steps", "1", "--no-eval-heldout",
        "--output-dir", str(tmp_path / "runs"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **env_extra}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "runs" / "tiny-llama-global-s0"


def epochs_per_step(run_dir: Path) -> float:
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["epoch"]


@pytest.mark.slow
def test_accelerate_launch_cpu_flag(tmp_path):
    # accelerate 1.16 starts one process for `--cpu` unless an MPI hostfile is given, so one pair per step.
    run_dir = launch(["--num_processes", "2", "--cpu"], tmp_path, {})
    assert epochs_per_step(run_dir) == pytest.approx(1 / 6)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    # Two DDP processes over gloo on the CPU: each step uses two of the six pairs.
    run_dir = launch(["--multi_gpu", "--num_processes", "2"], tmp_path,
                     {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"})
    assert epochs_per_step(run_dir) == pytest.approx(1 / 3)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    model = PeftModel.from_pretrained(load_model("tiny-llama").model, str(run_dir / "adapter"))
    assert model.peft_config["default"].layers_to_transform == [3]


@pytest.mark.integration
def test_smollm2_global_block_five_steps(tmp_path):
    config = AlignConfig(model="smollm2", strategy="global", data="suite:facts", max_steps=5, logging_steps=1,
                         per_device_batch_size=2, max_length=128, output_dir=str(tmp_path), eval_heldout=False)
    run_dir = run_alignment(config)

    record = json.loads((run_dir / "config.json").read_text())
    assert record["adapted_layers"] == list(range(20, 30))
    assert record["coverage"]["default"]["layers"] == list(range(20, 30))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in metrics] == [1, 2, 3, 4, 5]
    assert metrics[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert all(math.isfinite(line["loss"]) for line in metrics)

    loaded = load_model("smollm2")
    model = PeftModel.from_pretrained(loaded.model, str(run_dir / "adapter"))
    assert model.peft_config["default"].layers_to_transform == list(range(20, 30))
