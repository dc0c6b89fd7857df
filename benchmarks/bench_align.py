"""Benchmark align's DPO step against bare TRL, global-block against full depth, and peak memory.

Each case runs in its own subprocess (so peak memory is per case), and the
cases alternate over `--repeats` rounds so that load on a shared machine hits
them alike. Every case trains on the same pairs with the same DPOConfig.

Cases:
    align-global   align's trainer (guards, callbacks) with LoRA on the global block
    trl-global     bare TRL DPOTrainer with the same LoraConfig, reference = adapter disabled
    align-full     align's trainer with LoRA on every layer
    trl-ref-copy   bare TRL DPOTrainer, same LoraConfig, with an explicit second reference model

Usage:
    python benchmarks/bench_align.py --model smollm2 --steps 10 --warmup 2 --repeats 2 --out bench_align.md
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("align-global", "trl-global", "align-full", "trl-ref-copy")
logger = logging.getLogger("bench_align")


def make_timer():
    from transformers import TrainerCallback
    import torch

    class StepTimer(TrainerCallback):
        """Wall time and process CPU time of each optimizer step (forward, backward, optimizer).

        CPU time counts only this process, so it is far less affected than
        wall time by other load on a shared machine.
        """

        def __init__(self):
            self.times: list[float] = []
            self.cpu_times: list[float] = []
            self.start = self.cpu_start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)

    return StepTimer()


def run_case(case: str, options: argparse.Namespace) -> dict:
    """Train one case for warmup + steps optimizer steps and return its timings and peak memory."""
    import torch
    from trl import DPOTrainer

    from align.config import AlignConfig
    from align.data import load_pairs, to_dataset
    from align.guards import LossMonitor, MetricsFileCallback, NonFiniteLossCallback, StuckLossCallback
    from align.lora import build_lora_config
    from align.trainer import BlockDPOTrainer, build_dpo_config, load_base
    from probe.partition import Partition

    strategy = "full" if case == "align-full" else "global"
    config = AlignConfig(model=options.model, strategy=strategy, data=options.data, seed=0,
                         max_steps=options.warmup + options.steps, per_device_batch_size=options.batch_size,
                         max_length=options.max_length, logging_steps=1, save_steps=10_000, eval_heldout=False,
                         device=options.device)
    loaded = load_base(config)
    partition = Partition.thirds(loaded.num_layers)
    blocks = partition.names if strategy == "full" else ["global"]
    lora_config = build_lora_config(partition, blocks, loaded.stack, config)
    dataset = to_dataset(load_pairs(config.data, config))
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{case}-"))
    args = build_dpo_config(config, workdir / "checkpoints")
    args.save_strategy = "no"
    args.disable_tqdm = True
    timer = make_timer()
    common = {"args": args, "train_dataset": dataset, "processing_class": loaded.tokenizer, "peft_config": lora_config}

    if torch.cuda.is_available() and options.device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if case.startswith("align"):
        monitor = LossMonitor(loss_type=config.loss_type)
        callbacks = [MetricsFileCallback(workdir / "metrics.jsonl", "default"), NonFiniteLossCallback(monitor),
                     StuckLossCallback(config.loss_type), timer]
        trainer = BlockDPOTrainer(model=loaded.model, callbacks=callbacks, monitor=monitor,
                                  layers_path=loaded.stack.path, **common)
    elif case == "trl-global":
        trainer = DPOTrainer(model=loaded.model, callbacks=[timer], **common)
    else:
        reference = copy.deepcopy(loaded.model).eval()
        trainer = DPOTrainer(model=loaded.model, ref_model=reference, callbacks=[timer], **common)
    trainer.train()

    measured = timer.times[options.warmup:]
    result = {
        "case": case,
        "step_s": statistics.median(measured),
        "step_cpu_s": statistics.median(timer.cpu_times[options.warmup:]),
        "steps": len(measured),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_trainer_mb": rss_before / 1024,
        "weight_copies_mb": sum(
            p.numel() * p.element_size() for m in {id(trainer.model): trainer.model, id(trainer.ref_model): trainer.ref_model}.values()
            if m is not None for p in m.parameters()
        ) / 2**20,
    }
    if torch.cuda.is_available() and options.device != "cpu":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_subprocess(case: str, options: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", case, "--model", options.model, "--data", options.data,
               "--steps", str(options.steps), "--warmup", str(options.warmup), "--batch-size", str(options.batch_size),
               "--max-length", str(options.max_length), "--device", options.device]
    if options.threads is not None:
        command += ["--threads", str(options.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def summarise(results: list[dict]) -> dict[str, dict]:
    by_case: dict[str, dict] = {}
    for case in CASES:
        rows = [row for row in results if row["case"] == case]
        by_case[case] = {
            "step_s": statistics.median(row["step_s"] for row in rows),
            "step_cpu_s": statistics.median(row["step_cpu_s"] for row in rows),
            "peak_rss_mb": max(row["peak_rss_mb"] for row in rows),
            "weight_copies_mb": rows[0]["weight_copies_mb"],
            **({"peak_cuda_mb": max(row["peak_cuda_mb"] for row in rows)} if "peak_cuda_mb" in rows[0] else {}),
        }
    return by_case


def table(by_case: dict[str, dict], options: argparse.Namespace) -> str:
    memory_key = "peak_cuda_mb" if "peak_cuda_mb" in by_case["trl-global"] else "peak_rss_mb"
    lines = [
        f"model={options.model} data={options.data} batch={options.batch_size} pairs/step "
        f"max_length={options.max_length} tokens, {options.steps} timed steps after {options.warmup} warm-up, "
        f"{options.repeats} rounds, device={options.device}, threads={options.threads or 'default'}",
        "",
        "| case | median step, wall (s) | median step, process CPU (s) | peak memory (MB, " + memory_key
        + ") | weights held (MB) |",
        "|---|---|---|---|---|",
    ]
    for case in CASES:
        row = by_case[case]
        lines.append(f"| {case} | {row['step_s']:.3f} | {row['step_cpu_s']:.3f} | {row[memory_key]:.0f} | "
                     f"{row['weight_copies_mb']:.1f} |")
    ratio = {key: {case: by_case[case][key] for case in CASES} for key in ("step_s", "step_cpu_s")}
    lines += [
        "",
        "| ratio | wall | process CPU |",
        "|---|---|---|",
        f"| align step / bare TRL step (global block) | {ratio['step_s']['align-global'] / ratio['step_s']['trl-global']:.3f} "
        f"| {ratio['step_cpu_s']['align-global'] / ratio['step_cpu_s']['trl-global']:.3f} |",
        f"| global-block step / full-depth step (align) | {ratio['step_s']['align-global'] / ratio['step_s']['align-full']:.3f} "
        f"| {ratio['step_cpu_s']['align-global'] / ratio['step_cpu_s']['align-full']:.3f} |",
        f"| peak memory, align / TRL with explicit reference copy | "
        f"{by_case['align-global'][memory_key] / by_case['trl-ref-copy'][memory_key]:.3f} | |",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2", help="model alias (default: smollm2)")
    parser.add_argument("--data", default="suite:facts", help="training pairs (default: suite:facts)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per case (default: 2)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all cases (default: 2)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (default: 4)")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per sequence (default: 256)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per case (default: torch's choice)")
    parser.add_argument("--out", default=None, help="also write the table to this Markdown file")
    parser.add_argument("--case", choices=CASES, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options.case is not None:
        logging.disable(logging.WARNING)
        if options.threads is not None:
            import torch

            torch.set_num_threads(options.threads)
        sys.stdout.write(json.dumps(run_case(options.case, options)) + "\n")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for round_index in range(options.repeats):
        for case in CASES:
            logger.info("round %d/%d: %s", round_index + 1, options.repeats, case)
            results.append(run_subprocess(case, options))
    text = table(summarise(results), options)
    sys.stdout.write(text)
    if options.out:
        Path(options.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
