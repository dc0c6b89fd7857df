"""The layer report and the `layer-report` CLI on run directories of tiny models."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from analysis.cli import main
from analysis.evaluate import EvalData, EvalSettings
from analysis.experiment import Experiment, plan_runs
from analysis.plots import NOT_ADAPTED_COLOR, layer_norm_bars, norm_heatmap, save_figure
from analysis.report import build_report, load_norm_tables
from tests.analysis_runs import make_run

os.environ["HF_HUB_OFFLINE"] = "1"

FAST = EvalSettings(max_length=48, resamples=100, progress=False)


def tiny_data() -> EvalData:
    pairs = {
        capability: [{"prompt": f"q{i} {capability}: ", "chosen": "yes it is", "rejected": "no"} for i in range(3)]
        for capability in ("syntax", "logic", "facts")
    }
    return EvalData(pairs, ["a plain passage.", "another plain passage of text."])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [
        make_run(root, "local-seed0", layers=[0], seed=0),
        make_run(root, "local-seed1", layers=[0], seed=1),
        make_run(root, "global-seed0", layers=[3], strategy="global", capability="facts",
                 set_b=lambda name, weight: weight.fill_(0.05)),
    ]


def test_report_writes_tables_figures_json(runs, tmp_path):
    report = build_report(runs, tmp_path / "report", data=tiny_data(), settings=FAST)

    out = tmp_path / "report"
    for name in report["figures"]:
        assert (out / name).stat().st_size > 1000, name
    assert (out / "figures" / "update_heatmap.png").exists()
    assert (out / "figures" / "alignment_tax.png").exists()
    assert not list(out.rglob(".*tmp*")), "no temporary files are left behind"

    saved = json.loads((out / "report.json").read_text())
    assert set(saved["evaluation"]["groups"]) == {"local", "global"}
    assert saved["evaluation"]["groups"]["local"]["runs"] == ["local-seed0", "local-seed1"]
    table = saved["norms"]["global-seed0"]["table"]
    assert table["adapted_layers"] == [3]
    assert table["values"]["relative"][0] == [None, None, None]
    assert all(value > 0 for value in table["values"]["relative"][3])

    markdown = (out / "report.md").read_text()
    assert "## Alignment tax" in markdown
    assert "| global | facts | yes |" in markdown
    assert "not adapted" in markdown


def test_shared_colour_scale_and_grey_cells(runs):
    tables, _ = load_norm_tables(runs)
    figure = norm_heatmap(tables, "frobenius")
    images = [axes.images[0] for axes in figure.axes if axes.images]

    assert len(images) == 3
    assert len({image.norm.vmax for image in images}) == 1
    assert images[0].norm.vmax == pytest.approx(max(np.nanmax(t.values["frobenius"]) for t in tables))
    masked = images[0].get_array().mask
    assert masked[1:].all()
    assert not masked[0].any()
    assert to_hex(images[0].cmap.get_bad()) == NOT_ADAPTED_COLOR


def test_figures_label_axes_and_save(runs, tmp_path):
    tables, _ = load_norm_tables(runs[:1])
    for figure in (norm_heatmap(tables), layer_norm_bars(tables)):
        assert isinstance(figure, Figure)
        axes = figure.axes[0]
        assert "layer" in axes.get_ylabel() + axes.get_xlabel()
        assert figure.get_suptitle() or axes.get_title()
        path = save_figure(figure, tmp_path / "figure.png")
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_misaligned_tables_rejected(runs):
    tables, _ = load_norm_tables(runs[:1])
    other, _ = load_norm_tables(runs[1:2])
    other[0].module_types = other[0].module_types[:1]
    with pytest.raises(ValueError, match="do not line up"):
        norm_heatmap([tables[0], other[0]])


def test_cli_norms_only(runs, tmp_path, capsys):
    status = main([str(run) for run in runs] + ["--out", str(tmp_path / "out"), "--no-eval"])

    assert status == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["evaluation"] is None
    assert len(saved["norms"]) == 3
    assert (tmp_path / "out" / "figures" / "update_per_layer.png").exists()


def test_cli_rejects_run_without_config(tmp_path, capsys):
    (tmp_path / "not-a-run").mkdir()
    status = main([str(tmp_path / "not-a-run"), "--out", str(tmp_path / "out")])

    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1
    assert "not-a-run" in error
    assert "has no config.json" in error
    assert "align" in error


def test_cli_calls_judge_and_adds_table(runs, tmp_path, monkeypatch):
    calls = []

    def judge_runs(run_dirs, *, base_model, judge_url, judge_model, out_dir, **options):
        calls.append({"runs": [p.name for p in run_dirs], "base_model": base_model, "url": judge_url,
                      "model": judge_model, "out_dir": out_dir})
        return {"runs": {p.name: {"helpfulness": {"estimate": 6.5, "low": 6.0, "high": 7.0}} for p in run_dirs}}

    monkeypatch.setitem(sys.modules, "analysis.judge", types.SimpleNamespace(judge_runs=judge_runs))
    status = main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval",
                   "--judge-url", "http://127.0.0.1:9", "--judge-model", "judge"])

    assert status == 0
    assert calls == [{"runs": ["local-seed0"], "base_model": "tiny-llama", "url": "http://127.0.0.1:9",
                      "model": "judge", "out_dir": tmp_path / "out" / "judge"}]
    assert "| local-seed0 | 6.50 [6.00, 7.00] |" in (tmp_path / "out" / "report.md").read_text()


def test_experiment_plan_covers_strategies_and_seeds(tmp_path):
    partition = tmp_path / "discovered.json"
    from probe.partition import Partition

    Partition.from_ranges(4, [(0, 1), (1, 4)], ["early", "late"]).save(partition)
    planned = plan_runs(Experiment(model="tiny-llama", seeds=(0, 1), max_steps=2, partition=str(partition),
                                   runs_dir=tmp_path / "runs"))

    names = [run.name for run in planned]
    assert names[:2] == ["full-seed0", "full-seed1"]
    assert "discovered-late-seed1" in names
    assert len(names) == (4 + 2) * 2
    late = next(run for run in planned if run.name == "discovered-late-seed0")
    assert late.options["strategy"] == "late"
    assert late.options["partition"] == str(partition)
    assert late.options["max_steps"] == 2
    assert late.options["run_name"] == "discovered-late-seed0"


def test_experiment_rejects_unknown_strategy(tmp_path, capsys):
    status = main(["experiment", "--strategies", "base,middle", "--out", str(tmp_path)])

    assert status == 2
    assert "unknown strategy 'middle'" in capsys.readouterr().err
