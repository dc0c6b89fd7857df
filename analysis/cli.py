"""`layer-report`: where training changed the model, and what it gained or lost.

Report on finished runs:

    layer-report runs/local-seed0 runs/global-seed0 --out report/
    layer-report runs/* --out report/ --no-eval            # norms and heatmaps only

Train base, full, local, intermediate and global on the same data, seeds and
step budget (plus the blocks of a discovered partition), then report:

    layer-report experiment --model smollm2 --seeds 0,1,2 --max-steps 50 \\
        --partition discovered.json --runs-dir runs/exp --out report/

Rerunning the same experiment command reuses finished runs and resumes
unfinished ones; a run directory trained with other settings is an error.

Add an LLM-as-judge table with --judge-model, served at --judge-url (an
OpenAI-compatible API) or run locally without it:

    layer-report runs/global-seed0 --out report/ \\
        --judge-url http://127.0.0.1:8000/v1 --judge-model qwen2.5-7b-instruct --judge-prompts 5
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from analysis.bootstrap import DEFAULT_LEVEL, DEFAULT_RESAMPLES
from analysis.evaluate import EvalSettings
from analysis.judge_options import add_judge_arguments, judge_options_from_args
from analysis.runs import RunError, load_run

logger = logging.getLogger(__name__)

USAGE_ERROR = 2


def add_evaluation_options(parser: argparse.ArgumentParser, *, allow_no_eval: bool = True) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--out", type=Path, required=True, help="Report directory, created if missing; it will contain report.md, report.json, figures/ and cache/.")
    if allow_no_eval:
        # Not offered by `experiment`, whose report compares every run with the base model.
        group.add_argument("--no-eval", action="store_true", help="Report LoRA update norms only; skip scoring held-out data.")
    group.add_argument("--suite-seed", type=int, default=0, help="Seed of the capability suite (default: 0, as align uses).")
    group.add_argument("--n-train", type=int, default=300, help="Train pairs per capability the suite was built with (default: 300).")
    group.add_argument("--n-heldout", type=int, default=100, help="Held-out pairs per capability (default: 100).")
    group.add_argument("--n-texts", type=int, default=100, help="Maximum held-out Brown passages for perplexity (default: 100).")
    group.add_argument("--batch-size", type=int, default=8, help="Sequences per forward pass when scoring (default: 8).")
    group.add_argument("--max-length", type=int, default=512, help="Token limit per prompt + completion (default: 512).")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto, which picks CUDA when available (default: auto).")
    group.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="Scoring dtype (default: float32).")
    group.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help=f"Bootstrap replicates per interval (default: {DEFAULT_RESAMPLES}).")
    group.add_argument("--level", type=float, default=DEFAULT_LEVEL, help=f"Interval coverage in (0, 1) (default: {DEFAULT_LEVEL}).")
    group.add_argument("--tax-metric", default="accuracy", choices=("accuracy", "accuracy_normalized"),
                       help="Accuracy the alignment tax table compares (default: accuracy, summed log-probabilities).")
    add_judge_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="Log progress (-v) or debug details (-vv).")


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layer-report",
        allow_abbrev=False,
        description="Report where LoRA training changed the model (update norms per layer and module) and what it "
                    "gained or lost (held-out preference accuracy, alignment tax, perplexity). "
                    "Use `layer-report experiment --help` to train all strategies first.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="Run directories written by align (each with config.json).")
    add_evaluation_options(parser)
    return parser


def experiment_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layer-report experiment",
        allow_abbrev=False,
        description="Train base, full, local, intermediate and global (and the blocks of a discovered partition) "
                    "on the same data, seeds and step budget, then write the layer report. Existing runs in "
                    "--runs-dir with the same settings are reused, or resumed when unfinished; runs with other "
                    "settings are an error.",
    )
    parser.add_argument("--model", default="smollm2", help="Model alias or path for every run (default: smollm2).")
    parser.add_argument("--strategies", default="base,full,local,intermediate,global",
                        help="Comma-separated strategies of the equal-thirds partition (default: all five).")
    parser.add_argument("--partition", help="Discovered partition file from probe-layers; each block is trained as its own strategy.")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds, e.g. 0,1,2 (default: 0).")
    parser.add_argument("--max-steps", type=int, default=50, help="Optimizer steps per run (default: 50).")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="Directory for the run directories (default: runs).")
    parser.add_argument("--align-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="Further AlignConfig setting for every run, value parsed as JSON when it parses "
                             "(e.g. learning_rate=5e-4, lora_r=16). May be repeated.")
    add_evaluation_options(parser, allow_no_eval=False)
    return parser


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValueError(f"`{name}` must be comma-separated integers such as 0,1,2, got {text!r}") from None


def parse_align_args(items: list[str]) -> dict[str, Any]:
    options = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"`--align-arg` must look like KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def evaluation_settings(args: argparse.Namespace) -> EvalSettings:
    if not 0.0 < args.level < 1.0:
        raise ValueError(f"`--level` must be in (0, 1), got {args.level}")
    for name in ("batch_size", "max_length", "resamples", "n_heldout", "n_texts", "n_train"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(args, name)}")
    return EvalSettings(
        batch_size=args.batch_size, max_length=args.max_length, device=args.device, dtype=args.dtype,
        resamples=args.resamples, level=args.level, tax_metric=args.tax_metric,
        progress=sys.stderr.isatty() or args.verbose > 0,
    )


def load_data(args: argparse.Namespace):
    if getattr(args, "no_eval", False):
        return None
    from analysis.evaluate import eval_data_from_suite

    return eval_data_from_suite(seed=args.suite_seed, n_train=args.n_train, n_heldout=args.n_heldout, n_texts=args.n_texts)


def judge_function(args: argparse.Namespace, out_dir: Path) -> Callable[[list[Path]], dict] | None:
    """Return a function that runs the LLM judge on run directories, or None without --judge-model."""
    if args.judge_model is None:
        return None

    def judge(run_dirs: list[Path]) -> dict:
        try:
            from analysis.judge import judge_runs  # imported only when a judge is requested
        except ImportError as error:
            raise RuntimeError(f"the LLM judge is not available ({error}); drop --judge-model") from error

        base_model = load_run(run_dirs[0]).model_name
        return judge_runs(
            list(run_dirs), base_model=base_model, out_dir=out_dir / "judge", **judge_options_from_args(args),
        )

    return judge


def run_report(args: argparse.Namespace) -> None:
    from analysis.report import build_report

    runs = [load_run(path) for path in args.runs]  # fail early, before any model loads
    settings = evaluation_settings(args)
    judge = judge_function(args, args.out)
    judged = judge([run.path for run in runs]) if judge is not None else None
    build_report([run.path for run in runs], args.out, data=load_data(args), settings=settings,
                 evaluate=not args.no_eval, judge=judged)
    logger.info("wrote %s", args.out / "report.md")


def run_experiment_command(args: argparse.Namespace) -> None:
    from analysis.experiment import Experiment, run_experiment

    experiment = Experiment(
        model=args.model, strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        partition=args.partition, seeds=parse_int_list(args.seeds, "--seeds"), max_steps=args.max_steps,
        runs_dir=args.runs_dir, align_options=parse_align_args(args.align_arg),
    )
    # Training and evaluation must build the same suite, or held-out pairs could leak into training.
    experiment.align_options.setdefault("n_train", args.n_train)
    experiment.align_options.setdefault("n_heldout", args.n_heldout)
    experiment.align_options.setdefault("device", args.device)
    experiment.validate()
    settings = evaluation_settings(args)
    run_experiment(experiment, args.out, data=load_data(args), settings=settings, judge=judge_function(args, args.out))
    logger.info("wrote %s", args.out / "report.md")


def configure_logging(verbose: int) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run `layer-report`; return the exit status (0 success, 2 invalid input, 1 other failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    is_experiment = bool(argv) and argv[0] == "experiment"
    parser = experiment_parser() if is_experiment else report_parser()
    args = parser.parse_args(argv[1:] if is_experiment else argv)
    if args.judge_url is not None and args.judge_model is None:
        parser.error("--judge-url needs --judge-model NAME, the model name served at that URL")
    configure_logging(args.verbose)

    try:
        with warnings.catch_warnings():
            # PEFT 0.21 and TRL 1.16 read `model.is_gradient_checkpointing`, which transformers 5 deprecates
            # with this FutureWarning on every model load; it is not about anything the user set.
            warnings.filterwarnings(
                "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
            )
            run_experiment_command(args) if is_experiment else run_report(args)
    except (RunError, ValueError, FileNotFoundError) as error:
        # PartitionError, AlignConfigError and RunError are ValueErrors: invalid user input.
        logger.debug("invalid input", exc_info=True)
        print(f"layer-report: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except RuntimeError as error:
        logger.debug("report failed", exc_info=True)
        print(f"layer-report: failed: {error}", file=sys.stderr)
        return 1
    print(f"report written to {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
