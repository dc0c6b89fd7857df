"""probe-layers end to end on a tiny model: partition, figures, resume, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from probe.cli import main
from probe.discover import DiscoverConfig, assign_capabilities, block_names, LayerSignals, segmentation_features
from probe.partition import Partition

FAST = ["--model", "tiny-llama", "--n-train", "12", "--attribution-pairs", "2", "--n-boot", "3", "--n-splits", "3",
        "--cka-examples", "24", "--max-length", "48", "--batch-size", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "discovered.json"
    code = main([*FAST, "--min-block", "1", "--out", str(out)])
    return code, out


def test_probe_cli_writes_valid_partition(probed, capsys):
    code, out = probed
    assert code == 0
    partition = Partition.load(out, expected_num_layers=4)
    data = json.loads(out.read_text())
    assert data["method"]["signals"] == ["probe", "cka", "attribution"]
    assert set(data["signals"]["probe_selectivity"]) == {"syntax", "logic", "facts"}
    assert len(data["signals"]["attribution"]["facts"]) == 4
    assert partition.blocks[-1].end == 4
    for block in partition.blocks:
        assert block.stability is not None


def test_probe_cli_writes_figures_and_signals(probed):
    _, out = probed
    work_dir = out.parent / "discovered-probe"
    for name in ("cka.png", "probe_selectivity.png", "attribution.png"):
        assert (work_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    arrays = np.load(work_dir / "signals.npz")
    assert arrays["cka"].shape == (4, 4)
    np.testing.assert_allclose(np.diag(arrays["cka"]), 1.0)
    assert arrays["attribution/logic"].shape == (2, 4)


def test_probe_cli_resume_reuses_signals(probed, caplog):
    _, out = probed
    again = out.parent / "discovered2.json"
    with caplog.at_level(logging.INFO, logger="probe.discover"):
        code = main([*FAST, "--blocks", "2", "--min-block", "1", "--resume", "--work-dir",
                     str(out.parent / "discovered-probe"), "--out", str(again)])
    assert code == 0
    assert "reusing signals measured earlier" in caplog.text
    assert Partition.load(again).names == ["local", "global"]


def test_probe_cli_preset_thirds(tmp_path):
    out = tmp_path / "thirds.json"
    assert main(["--model", "tiny-gpt2", "--preset", "thirds", "--out", str(out)]) == 0
    partition = Partition.load(out)
    assert partition.names == ["local", "intermediate", "global"]
    assert partition.model["layers_path"] == "transformer.h"


def test_probe_cli_rejects_unknown_signal(tmp_path, capsys):
    code = main([*FAST, "--signals", "probe,vibes", "--out", str(tmp_path / "d.json")])
    assert code == 2
    assert "`--signals` takes probe, cka and attribution, got 'probe,vibes'" in capsys.readouterr().err


def test_show_layers_prints_layer_map(capsys):
    assert main(["--model", "tiny-qwen2", "--show-layers"]) == 0
    output = capsys.readouterr().out
    assert "4 decoder layers at model.layers" in output
    assert "model.layers.3" in output


def test_block_names_by_position():
    assert block_names(1) == ["all"]
    assert block_names(3) == ["local", "intermediate", "global"]
    assert block_names(5) == ["local", "intermediate1", "intermediate2", "intermediate3", "global"]


def test_capability_goes_to_block_where_it_peaks():
    signals = LayerSignals()
    signals.probe_selectivity = {
        "syntax": np.array([0.4, 0.4, 0.0, 0.0, 0.0, 0.0]),
        "logic": np.array([0.0, 0.0, 0.4, 0.4, 0.0, 0.0]),
        "facts": np.array([0.0, 0.0, 0.0, 0.0, 0.4, 0.4]),
    }
    assert assign_capabilities([(0, 2), (2, 4), (4, 6)], signals, 6) == ["syntax", "logic", "facts"]


def test_segmentation_features_weigh_signals_equally():
    signals = LayerSignals()
    signals.cka = np.eye(6)
    signals.probe_selectivity = {c: np.arange(6.0) for c in ("syntax", "logic", "facts")}
    features = segmentation_features(signals)
    assert features.shape == (6, 9)
    cka_variance = features[:, :6].var(axis=0).sum()
    probe_variance = features[:, 6:].var(axis=0).sum()
    assert cka_variance == pytest.approx(probe_variance)


def test_discover_work_dir_next_to_out():
    config = DiscoverConfig()
    assert config.signals == ["probe", "cka", "attribution"]
    assert config.resolved_work_dir().name == "discovered-probe"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-block", "5"], "`--min-block` must be at most the model's 4 layers, got 5"),
        (["--blocks", "3", "--min-block", "2"], "`--blocks` 3 times `--min-block` 2 exceeds the model's 4 layers"),
        (["--n-boot", "-1"], "`--n-boot` must be at least 0, got -1"),
        (["--beta", "-1"], "`--beta` must be positive, got -1.0"),
        (["--n-splits", "1"], "`--n-splits` must be at least 2, got 1"),
        (["--generate", "hi"], "`--generate` needs --show-layers"),
        (["--device", "gpu"], "`--device` must be cpu, cuda or auto, got 'gpu'"),
    ],
)
def test_probe_cli_rejects_bad_flags_before_probing(tmp_path, capsys, flags, message):
    out = tmp_path / "d.json"
    code = main(["--model", "tiny-llama", *flags, "--out", str(out)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d-probe" / "features").exists()


def test_preset_thirds_without_model_uses_alias_layer_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    out = tmp_path / "thirds.json"
    assert main(["--model", "llama", "--preset", "thirds", "--out", str(out)]) == 0
    partition = Partition.load(out, expected_num_layers=32)
    assert [len(block) for block in partition.blocks] == [10, 12, 10]
    assert partition.mergekit_ranges()[0]["model"] == "meta-llama/Llama-3.1-8B-Instruct"
