"""The layer report and the `layer-report` CLI on run directories of tiny models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

import analysis.judge as judge_module
from analysis.cli import experiment_parser, main
from analysis.evaluate import EvalData, EvalSettings
from analysis.experiment import Experiment, plan_runs
from analysis.judge import DIMENSIONS
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


def judge_results(run_names: list[str]) -> dict:
    """Results shaped like `analysis.judge.judge_runs` output, with fixed numbers."""
    summary = {"base_mean": 6.0, "run_mean": 6.5, "delta": 0.5, "ci": [0.25, 0.75], "n": 3}
    return {
        "base": {"means": {dimension: 6.0 for dimension in DIMENSIONS}, "unparseable": 0},
        "runs": {
            name: {"dimensions": {dimension: dict(summary) for dimension in DIMENSIONS},
                   "pairwise": {"win": 2, "loss": 0, "tie": 1, "inconsistent": 1, "inconsistent_rate": 1 / 3, "n": 3},
                   "unparseable": 0}
            for name in run_names
        },
        "judge": {"backend": "http", "model": "judge", "url": "http://127.0.0.1:9/v1"},
        "generation": {"n_prompts": 3},
    }


def test_cli_passes_judge_flags(runs, tmp_path, monkeypatch):
    calls = []

    def judge_runs(run_dirs, **options):
        calls.append({"runs": [path.name for path in run_dirs], **options})
        return judge_results([path.name for path in run_dirs])

    monkeypatch.setattr(judge_module, "judge_runs", judge_runs)
    status = main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval",
                   "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "judge", "--judge-api-key-env", "MY_KEY",
                   "--judge-prompts", "1", "--max-new-tokens", "8", "--sampling", "sample", "--sampling-seed", "3",
                   "--judge-timeout", "2.5", "--judge-retries", "0", "--judge-concurrency", "2", "--no-judge-pairwise"])

    assert status == 0
    assert calls == [{
        "runs": ["local-seed0"], "base_model": "tiny-llama", "out_dir": tmp_path / "out" / "judge",
        "judge_url": "http://127.0.0.1:9/v1", "judge_model": "judge", "api_key_env": "MY_KEY", "n_prompts": 1,
        "max_new_tokens": 8, "sampling": "sample", "seed": 3, "timeout_s": 2.5, "max_retries": 0,
        "concurrency": 2, "pairwise": False,
    }]


def test_cli_adds_judge_table_and_json(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(judge_module, "judge_runs", lambda run_dirs, **options: judge_results([p.name for p in run_dirs]))
    status = main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval", "--judge-model", "judge"])

    assert status == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## LLM-as-judge" in markdown
    assert "| local-seed0 | fluency | 6.00 | 6.50 | +0.50 [+0.25, +0.75] | 3 |" in markdown
    assert "| local-seed0 | pairwise win/loss/tie | | | 2/0/1 (inconsistent 33%) | 3 |" in markdown
    assert "{'" not in markdown, "no dict is rendered raw"
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["judge"] == judge_results(["local-seed0"])


def test_cli_without_judge_model_skips_judge(runs, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the judge ran without --judge-model")

    monkeypatch.setattr(judge_module, "judge_runs", fail)
    status = main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval"])

    assert status == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["judge"] is None
    assert "LLM-as-judge" not in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--judge-url", "http://127.0.0.1:9/v1"], "--judge-url needs --judge-model NAME"),
        (["--judge-model", "judge", "--judge-prompts", "0"], "argument --judge-prompts: must be at least 1, got 0"),
        (["--judge-model", "judge", "--judge-retries", "-1"], "argument --judge-retries: must be at least 0, got -1"),
        (["--judge-model", "judge", "--judge-timeout", "0"], "argument --judge-timeout: must be greater than 0, got 0"),
        (["--judge-model", "judge", "--judge-concurrency", "x"], "argument --judge-concurrency: must be an integer, got 'x'"),
    ],
)
def test_cli_rejects_invalid_judge_flags(runs, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval", *flags])

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_experiment_parser_takes_judge_flags():
    args = experiment_parser().parse_args(["--out", "report", "--judge-model", "judge", "--judge-prompts", "2",
                                           "--no-judge-pairwise"])

    assert args.judge_model == "judge"
    assert args.judge_prompts == 2
    assert args.judge_pairwise is False


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
