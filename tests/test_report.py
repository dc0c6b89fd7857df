"""The layer report and the `layer-report` CLI on run directories of tiny models."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

import align.trainer as trainer_module
import analysis.cli as cli_module
import analysis.experiment as experiment_module
import analysis.judge as judge_module
from align.config import AlignConfig
from analysis.cli import experiment_parser, main, report_parser
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
    assert markdown.startswith("# Layer report: tiny-llama\n")
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
    assert "`align --output-dir runs --run-name <name>`" in error


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


def test_experiment_help_matches_flags(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "--help"])
    help_text = capsys.readouterr().out

    assert "--no-eval" not in help_text
    assert "(default: auto)" in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["experiment", "--out", "report", "--no-eval"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-eval" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("parser", "argv"),
    [(report_parser(), ["runs/a", "--out", "report", "--dev", "cpu"]), (experiment_parser(), ["--out", "report", "--dev", "cpu"])],
    ids=["report", "experiment"],
)
def test_parsers_reject_abbreviated_flags(parser, argv, capsys):
    with pytest.raises(SystemExit):
        parser.parse_args(argv)

    assert "unrecognized arguments: --dev cpu" in capsys.readouterr().err


def test_cli_hides_gradient_checkpointing_warning(runs, tmp_path, monkeypatch):
    def warn_like_peft(*args, **kwargs):
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("another FutureWarning", FutureWarning)
        return {}

    monkeypatch.setattr("analysis.report.build_report", warn_like_peft)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = main([str(runs[0]), "--out", str(tmp_path / "out"), "--no-eval"])

    assert status == 0
    messages = [str(warning.message) for warning in caught]
    assert messages == ["another FutureWarning"]


# -- experiment: reuse, resume and rejection of existing run directories ----------------------------


def experiment_argv(runs_dir: Path, out: Path, *, model: str = "tiny-llama", max_steps: int = 2) -> list[str]:
    return ["experiment", "--model", model, "--strategies", "base,local", "--max-steps", str(max_steps),
            "--runs-dir", str(runs_dir), "--out", str(out), "--device", "cpu"]


def planned_config(runs_dir: Path, *, model: str = "tiny-llama", max_steps: int = 2) -> AlignConfig:
    """The AlignConfig that `experiment_argv` plans for local-seed0."""
    args = experiment_parser().parse_args(experiment_argv(runs_dir, Path("out"), model=model, max_steps=max_steps)[1:])
    experiment = Experiment(model=args.model, strategies=("base", "local"), max_steps=args.max_steps, runs_dir=args.runs_dir,
                            align_options={"n_train": args.n_train, "n_heldout": args.n_heldout, "device": args.device})
    return AlignConfig(**plan_runs(experiment)[0].options)


def save_run(runs_dir: Path, config: AlignConfig, *, finished: bool = True) -> Path:
    """Write runs_dir/local-seed0 with a real adapter and `config` as its saved settings."""
    run_dir = make_run(runs_dir, "local-seed0", model=config.model, seed=config.seed)
    record = json.loads((run_dir / "config.json").read_text())
    record["config"] = config.to_dict()
    (run_dir / "config.json").write_text(json.dumps(record))
    if not finished:
        shutil.rmtree(run_dir / "adapter")
    return run_dir


@pytest.fixture
def stub_experiment(monkeypatch):
    """Replace training and the report with recorders, so only the experiment's bookkeeping runs."""
    calls = {"trained": [], "reported": []}

    def run_alignment(config, **kwargs):
        calls["trained"].append(config)
        return Path(config.output_dir) / config.resolved_run_name

    def build_report(run_dirs, out_dir, **kwargs):
        calls["reported"].append([Path(path) for path in run_dirs])
        return {}

    monkeypatch.setattr(trainer_module, "run_alignment", run_alignment)
    monkeypatch.setattr(experiment_module, "build_report", build_report)
    monkeypatch.setattr(cli_module, "load_data", lambda args: None)
    return calls


@pytest.mark.parametrize(
    ("model", "max_steps", "difference"),
    [("tiny-qwen2", 2, "model: 'tiny-llama' -> 'tiny-qwen2'"), ("tiny-llama", 3, "max_steps: 2 -> 3")],
    ids=["model", "max_steps"],
)
def test_experiment_rejects_run_with_other_settings(tmp_path, capsys, stub_experiment, model, max_steps, difference):
    run_dir = save_run(tmp_path / "runs", planned_config(tmp_path / "runs"))

    status = main(experiment_argv(tmp_path / "runs", tmp_path / "out", model=model, max_steps=max_steps))

    error = capsys.readouterr().err
    assert status == 2
    assert f"run directory {run_dir} contains a run with other settings" in error
    assert difference in error
    assert "use another --runs-dir, or delete" in error
    assert stub_experiment["trained"] == []
    assert stub_experiment["reported"] == []


def test_experiment_reuses_matching_finished_run(tmp_path, stub_experiment):
    run_dir = save_run(tmp_path / "runs", planned_config(tmp_path / "runs"))

    status = main(experiment_argv(tmp_path / "runs", tmp_path / "out"))

    assert status == 0
    assert stub_experiment["trained"] == []
    assert stub_experiment["reported"] == [[run_dir]]


def test_experiment_resumes_unfinished_run(tmp_path, stub_experiment):
    save_run(tmp_path / "runs", planned_config(tmp_path / "runs"), finished=False)

    status = main(experiment_argv(tmp_path / "runs", tmp_path / "out"))

    assert status == 0
    assert [config.resume for config in stub_experiment["trained"]] == [True]


def test_experiment_trains_new_run_without_resume(tmp_path, stub_experiment):
    status = main(experiment_argv(tmp_path / "runs", tmp_path / "out"))

    assert status == 0
    assert [config.resume for config in stub_experiment["trained"]] == [False]
    assert stub_experiment["trained"][0].device == "cpu"


def test_experiment_continues_after_kill(tmp_path, monkeypatch):
    """Train for real, remove the adapter as a kill before saving it would leave it, and rerun."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"{capability} {i}: ", "chosen": "yes", "rejected": "no"}
            for capability in ("syntax", "logic", "facts") for i in range(4)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(experiment_module, "build_report", lambda run_dirs, out_dir, **kwargs: {})
    experiment = Experiment(
        model="tiny-llama", strategies=("local",), max_steps=2, runs_dir=tmp_path / "runs",
        align_options={"data": str(pairs), "per_device_batch_size": 2, "max_length": 32, "save_steps": 1,
                       "device": "cpu"},
    )
    experiment_module.run_experiment(experiment, tmp_path / "out")
    run_dir = tmp_path / "runs" / "local-seed0"
    shutil.rmtree(run_dir / "adapter")

    experiment_module.run_experiment(experiment, tmp_path / "out")

    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "checkpoints").is_dir()
