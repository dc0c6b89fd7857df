"""`probe-layers`: probe every decoder layer, find contiguous blocks, write a partition.

Examples:
    probe-layers --model smollm2 --out discovered.json
    probe-layers --model smollm2 --blocks 3 --min-block 3 --out discovered.json
    probe-layers --model llama --preset thirds --out thirds.json
    probe-layers --model smollm2 --show-layers --generate "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import fields

from probe.discover import DiscoverConfig, run_discovery
from probe.layers import layer_map
from probe.models import ALIASES, DTYPES, ModelNotAvailableError, load_model
from probe.data.sources import SourceFetchError
from probe.partition import PartitionError

logger = logging.getLogger(__name__)

HELP = {
    "model": "model alias, HF hub id or local path (aliases: {aliases}); default %(default)s",
    "out": "partition file to write (JSON); default %(default)s",
    "work_dir": "folder for features, signals and figures; default <out stem>-probe/ next to --out",
    "preset": "write a preset partition without probing: 'thirds' = equal thirds local/intermediate/global",
    "blocks": "number of blocks K; default: chosen by a BIC-style penalised cost up to --max-blocks",
    "max_blocks": "largest K considered when --blocks is not given; default %(default)s",
    "min_block": "minimum layers per block; default %(default)s",
    "seed": "seed for the data suite, folds, CKA sample and bootstrap; default %(default)s",
    "n_train": "preference pairs per capability used for probing (each gives a good and a corrupted text); default %(default)s",
    "attribution_pairs": "pairs per capability for DPO gradient attribution (one backward pass each); default %(default)s",
    "cka_examples": "texts sampled for the CKA matrix (memory grows with its square); default %(default)s",
    "n_boot": "bootstrap resamples for boundary stability (0 disables); default %(default)s",
    "n_splits": "cross-validation folds of the linear probes; default %(default)s",
    "pooling": "token pooling of hidden states: mean over real tokens or last real token; default %(default)s",
    "batch_size": "texts per forward pass; default %(default)s",
    "max_length": "truncation length in tokens; default %(default)s",
    "beta": "DPO beta of the attribution loss (scales all layers alike); default %(default)s",
    "dtype": "parameter dtype; default %(default)s",
    "device": "cpu, cuda, cuda:N or auto (CUDA when available); default %(default)s",
    "layers_path": "dotted path of the decoder layer list, e.g. model.layers (overrides the resolver)",
    "resume": "reuse the activation features (even of an interrupted run) and the signals of an earlier run with "
              "the same measurement settings, so only the segmentation runs again",
    "signals": "comma-separated signals to segment on: probe, cka, attribution; default all three",
}
CHOICES = {"preset": ["thirds"], "pooling": ["mean", "last"], "dtype": list(DTYPES)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probe-layers",
        allow_abbrev=False,
        description="Probe every decoder layer (linear probes, debiased CKA, DPO gradient attribution), "
        "segment the layers into contiguous functional blocks and write a partition file for `align`.",
        epilog="Layers are 0-based indices into the decoder layer list; blocks are half-open [start, end).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = DiscoverConfig()
    for spec in fields(DiscoverConfig):
        flag = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        help_text = HELP[spec.name].format(aliases=", ".join(ALIASES))
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif spec.name == "signals":
            parser.add_argument(flag, default=",".join(default), help=help_text)
        else:
            kind = int if spec.name in ("blocks", "max_blocks", "min_block", "seed", "n_train", "attribution_pairs",
                                        "cka_examples", "n_boot", "n_splits", "batch_size", "max_length") else str
            kind = float if spec.name == "beta" else kind
            parser.add_argument(flag, type=kind, default=default, choices=CHOICES.get(spec.name), help=help_text)
    parser.add_argument("--show-layers", action="store_true",
                        help="only print the layer map (index, module path, parameter count) and exit")
    parser.add_argument("--generate", metavar="PROMPT",
                        help="with --show-layers: also print the greedy completion of PROMPT (chat template applied)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    return parser


def config_from_args(args: argparse.Namespace) -> DiscoverConfig:
    values = {spec.name: getattr(args, spec.name) for spec in fields(DiscoverConfig)}
    values["signals"] = [s.strip() for s in args.signals.split(",") if s.strip()]
    unknown = sorted(set(values["signals"]) - {"probe", "cka", "attribution"})
    if unknown or not values["signals"]:
        raise ValueError(f"`--signals` takes probe, cka and attribution, got {args.signals!r}")
    minimums = {"max_blocks": 1, "min_block": 1, "n_train": 1, "batch_size": 1, "max_length": 1, "cka_examples": 4,
                "attribution_pairs": 1, "n_splits": 2, "n_boot": 0}
    for name, minimum in minimums.items():
        if values[name] < minimum:
            raise ValueError(f"`--{name.replace('_', '-')}` must be at least {minimum}, got {values[name]}")
    if values["beta"] <= 0:
        raise ValueError(f"`--beta` must be positive, got {values['beta']}")
    if values["blocks"] is not None and values["blocks"] < 1:
        raise ValueError(f"`--blocks` must be at least 1, got {values['blocks']}")
    return DiscoverConfig(**values)


def configure_logging(verbosity: int) -> None:
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = levels.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbosity == 0:
        logging.getLogger("probe").setLevel(logging.INFO)


def show_layers(args: argparse.Namespace) -> None:
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, layers_path=args.layers_path)
    print(f"{loaded.spec.name}: {type(loaded.model).__name__}, {loaded.num_layers} decoder layers at "
          f"{loaded.stack.path}, final norm {loaded.stack.norm_path}")
    print(f"{'layer':>5}  {'module':<28} {'parameters':>12}")
    for index, path, count in layer_map(loaded.stack):
        print(f"{index:>5}  {path:<28} {count:>12,}")
    if args.generate:
        print(f"\nprompt: {args.generate}\nanswer: {generate_answer(loaded, args.generate)}")


def generate_answer(loaded, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy-generate an answer, through the chat template when the tokenizer has one."""
    tokenizer = loaded.tokenizer
    if tokenizer.chat_template:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    encoded = {key: value.to(loaded.model.device) for key, value in encoded.items()}
    output = loaded.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.generate and not args.show_layers:
            raise ValueError("`--generate` needs --show-layers; add it to print the layer map and the completion")
        if args.show_layers:
            show_layers(args)
            return 0
        config = config_from_args(args)
        partition = run_discovery(config)
    except (ValueError, ModelNotAvailableError, PartitionError, FileNotFoundError, SourceFetchError) as error:
        print(f"probe-layers: error: {error}", file=sys.stderr)
        return 2

    print(f"wrote {config.out}: {len(partition.blocks)} blocks over {partition.num_layers} layers "
          f"({partition.model.get('name')})")
    for line in partition.describe():
        print("  " + line)
    if not config.preset:
        print(f"figures and signals: {config.resolved_work_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
