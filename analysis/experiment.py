"""Train every strategy on the same data, seeds and step budget, then write the layer report.

The base model is always in the report: it is the reference every run is
compared against. Each other strategy is trained once per seed with
`align.trainer.run_alignment` into `<runs_dir>/<label>-seed<k>`, and the report
pools the seeds of a label (see `analysis.evaluate.group_runs`).

A planned run directory that already exists is checked against the plan. A
finished run with the same settings is reused and an unfinished one is resumed
from its last checkpoint, so an interrupted experiment continues where it
stopped. A run with other settings (another model, step budget, seed, ...) is
rejected, so the report never contains runs that the experiment did not plan.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from analysis.evaluate import EvalData, EvalSettings
from analysis.report import build_report
from probe.io import write_json_atomic
from probe.partition import Partition

logger = logging.getLogger(__name__)

THIRDS_STRATEGIES = ("full", "local", "intermediate", "global")
DEFAULT_STRATEGIES = ("base", *THIRDS_STRATEGIES)
# AlignConfig fields that may differ between a saved run and the plan: they locate the run directory
# or change only logging, the device and the run's own evaluation, not the trained weights. Unlike
# align's resume check, `n_heldout` is compared, because the suite's split is built from it and the
# report scores the held-out pairs of the plan's split.
UNCOMPARED_SETTINGS = frozenset({"output_dir", "run_name", "resume", "device", "report_to", "logging_steps", "eval_heldout"})

RunState = Literal["new", "unfinished", "finished"]


@dataclass
class PlannedRun:
    """One training run of the experiment.

    Attributes:
        label: Group label shared by the seeds, e.g. "local" or "discovered-block1".
        seed: Training seed.
        options: Keyword arguments of `align.config.AlignConfig`.
    """

    label: str
    seed: int
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


@dataclass
class Experiment:
    """Plan of an experiment: model, strategies, seeds and step budget.

    Attributes:
        model: Model alias or path for every run.
        strategies: Strategies of the equal-thirds partition ("base", "full",
            "local", "intermediate", "global"); "base" trains nothing.
        partition: A discovered partition file; each of its blocks becomes a
            strategy labelled "discovered-<block>". None for thirds only.
        seeds: Training seeds; every strategy runs once per seed.
        max_steps: Optimizer steps per run.
        runs_dir: Directory for the run directories.
        align_options: Further `AlignConfig` settings shared by every run
            (learning_rate, lora_r, n_train, device, ...).
    """

    model: str = "smollm2"
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    partition: str | None = None
    seeds: tuple[int, ...] = (0,)
    max_steps: int = 50
    runs_dir: Path = Path("runs")
    align_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        unknown = [s for s in self.strategies if s not in DEFAULT_STRATEGIES]
        if unknown:
            raise ValueError(
                f"unknown strategy {unknown[0]!r}; choose from {', '.join(DEFAULT_STRATEGIES)} "
                "(blocks of a discovered partition are added with --partition)"
            )
        if not self.seeds:
            raise ValueError("`seeds` must name at least one seed, e.g. --seeds 0,1,2")
        if self.max_steps < 1:
            raise ValueError(f"`max_steps` must be at least 1, got {self.max_steps}")
        if self.partition is not None and not Path(self.partition).is_file():
            raise ValueError(f"partition file {self.partition!r} not found; create one with `probe-layers --out {self.partition}`")
        if not [s for s in self.strategies if s != "base"] and self.partition is None:
            raise ValueError("the experiment trains nothing: give a strategy other than base, or --partition")


def plan_runs(experiment: Experiment) -> list[PlannedRun]:
    """List every training run: each strategy and discovered block, once per seed."""
    experiment.validate()
    labels: list[tuple[str, dict[str, Any]]] = [
        (strategy, {"strategy": strategy, "partition": "thirds"})
        for strategy in experiment.strategies if strategy != "base"
    ]
    if experiment.partition is not None:
        discovered = Partition.load(experiment.partition)
        labels += [(f"discovered-{block.name}", {"strategy": block.name, "partition": str(experiment.partition)})
                   for block in discovered.blocks]

    planned = []
    for label, options in labels:
        for seed in experiment.seeds:
            run_options = {
                **experiment.align_options, **options, "model": experiment.model, "seed": seed,
                "max_steps": experiment.max_steps, "output_dir": str(experiment.runs_dir),
            }
            run_options.setdefault("eval_heldout", False)  # the report evaluates every run itself
            planned.append(PlannedRun(label, seed, run_options))
    for run in planned:
        run.options["run_name"] = run.name
    return planned


def is_finished(run_dir: Path) -> bool:
    """Return True when `run_dir` contains config.json, every adapter it lists and, when requested, eval.json."""
    from analysis.runs import load_run

    try:
        run = load_run(run_dir)
    except ValueError:
        return False
    wants_eval = bool((run.config.get("config") or {}).get("eval_heldout"))
    return not wants_eval or (run_dir / "eval.json").is_file()


def differing_settings(saved: dict[str, Any], planned: dict[str, Any]) -> list[str]:
    """List the compared settings whose saved and planned values differ, as "key: saved -> planned"."""
    planned = json.loads(json.dumps(planned))  # tuples become lists, as in the saved JSON
    keys = sorted((set(saved) | set(planned)) - UNCOMPARED_SETTINGS)
    return [f"{key}: {saved.get(key)!r} -> {planned.get(key)!r}" for key in keys if saved.get(key) != planned.get(key)]


def run_state(run_dir: Path, planned: dict[str, Any]) -> RunState:
    """Classify a planned run directory as new, unfinished or finished.

    Args:
        run_dir: The planned run directory.
        planned: The planned `AlignConfig` as a dict (`AlignConfig.to_dict()`).

    Raises:
        ValueError: If `run_dir` contains a run whose settings differ from the
            plan, or whose config.json is not valid JSON.
    """
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return "new"  # align writes config.json before training, so nothing of this run was trained
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8")).get("config") or {}
    except (json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{config_path} is not a valid run config ({error}); delete {run_dir} or use another --runs-dir") from error

    differences = differing_settings(saved, planned)
    if differences:
        raise ValueError(
            f"run directory {run_dir} contains a run with other settings than this experiment plans "
            f"({'; '.join(differences)}); use another --runs-dir, or delete {run_dir} to train it again"
        )
    return "finished" if is_finished(run_dir) else "unfinished"


def train_runs(planned: list[PlannedRun]) -> list[Path]:
    """Train each planned run that has not finished yet; return every run directory in plan order.

    Every existing run directory is checked before any training starts, so a
    mismatch fails at once instead of after hours of training. Unfinished runs
    are resumed from their last checkpoint.

    Raises:
        ValueError: If an existing run directory contains a run with other settings.
    """
    from align.config import AlignConfig
    from align.trainer import run_alignment

    configs = [AlignConfig(**run.options) for run in planned]
    run_dirs = [Path(config.output_dir) / config.resolved_run_name for config in configs]
    states = [run_state(run_dir, config.to_dict()) for run_dir, config in zip(run_dirs, configs)]

    for index, (run, config, run_dir, state) in enumerate(zip(planned, configs, run_dirs, states), start=1):
        if state == "finished":
            logger.info("[%d/%d] %s is already trained; reusing %s", index, len(planned), run.name, run_dir)
            continue
        if state == "unfinished":
            logger.info("[%d/%d] resuming %s from its last checkpoint in %s", index, len(planned), run.name, run_dir)
            config.resume = True
        else:
            logger.info("[%d/%d] training %s", index, len(planned), run.name)
        run_dirs[index - 1] = Path(run_alignment(config))
    return run_dirs


def run_experiment(
    experiment: Experiment,
    out_dir: str | Path,
    *,
    data: EvalData | None = None,
    settings: EvalSettings | None = None,
    judge: Callable[[list[Path]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train every planned run, then write the layer report of all of them to `out_dir`.

    Args:
        experiment: What to train.
        out_dir: Report directory.
        data: Held-out data; the capability suite's held-out split when None.
        settings: Scoring and bootstrap settings.
        judge: Called with the run directories after training; its result is
            added to the report as the LLM-as-judge table.

    Returns:
        The report's JSON content, with the experiment plan under "experiment".
    """
    out_dir = Path(out_dir)
    planned = plan_runs(experiment)
    plan_record = {
        "model": experiment.model, "strategies": list(experiment.strategies), "partition": experiment.partition,
        "seeds": list(experiment.seeds), "max_steps": experiment.max_steps, "runs_dir": str(experiment.runs_dir),
        "runs": [{"name": run.name, "label": run.label, "seed": run.seed, "align": run.options} for run in planned],
    }
    write_json_atomic(out_dir / "experiment.json", plan_record)

    run_dirs = train_runs(planned)
    judged = judge(run_dirs) if judge is not None else None
    report = build_report(run_dirs, out_dir, data=data, settings=settings, judge=judged)
    report["experiment"] = plan_record
    write_json_atomic(out_dir / "report.json", report)
    return report
