"""`align`: DPO with LoRA on chosen blocks of decoder layers.

Examples:

    align --model smollm2 --partition thirds --strategy global --data suite:facts --max-steps 50
    align --partition discovered.json --strategy routed --data suite:all
    align --partition discovered.json --strategy full --rank-by attribution
    align --blocks local,global --data pairs.jsonl --run-name my-run
    align --config runs/smollm2-global-s0/config.json --run-name rerun
    align --output-dir runs --run-name smollm2-global-s0 --resume
    CUDA_VISIBLE_DEVICES= ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m align.cli --max-steps 2
"""

from __future__ import annotations

import argparse
import logging
import sys

from align.config import add_config_flags, config_from_namespace

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align",
        allow_abbrev=False,
        description=(
            "Train DPO with LoRA restricted to chosen blocks of decoder layers (TRL DPOTrainer + PEFT). "
            "Writes <output-dir>/<run-name>/ with config.json, adapter/, metrics.jsonl, eval.json and checkpoints/."
        ),
        epilog="Step counts are optimizer steps; lengths are tokens; log-probabilities are in nats.",
    )
    parser.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS,
                        help="JSON file of settings (field names as in the flags, with underscores), or a run's "
                             "config.json; explicit flags override it")
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output: -v for debug messages of align and probe, -vv also for transformers")
    add_config_flags(parser)
    return parser


def configure_logging(verbosity: int) -> None:
    """Set log levels once: info for align and probe by default, debug with -v, libraries at -vv."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    level = logging.DEBUG if verbosity >= 1 else logging.INFO
    for name in ("align", "probe"):
        logging.getLogger(name).setLevel(level)
    import transformers

    transformers.logging.set_verbosity(logging.INFO if verbosity >= 2 else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run `align`; return 0 on success, 2 for invalid input, 1 when a training guard stops the run."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    configure_logging(getattr(namespace, "verbose", 0))

    from align.guards import NonFiniteLossError, ReferenceMismatchError
    from align.lora import CoverageError
    from probe.data.sources import SourceFetchError
    from probe.models import ModelNotAvailableError

    try:
        config = config_from_namespace(namespace)
        from align.trainer import run_alignment

        run_dir = run_alignment(config)
    except (ValueError, FileNotFoundError, ModelNotAvailableError, SourceFetchError) as error:
        # User input: invalid settings, partition, data file or model name, or suite sources that npm or pip
        # could not fetch. One line, no traceback.
        print(f"align: error: {error}", file=sys.stderr)
        return 2
    except (CoverageError, ReferenceMismatchError, NonFiniteLossError) as error:
        print(f"align: training stopped: {error}", file=sys.stderr)
        return 1
    logger.info("adapter and metrics are in %s", run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
