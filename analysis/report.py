"""Assemble the layer report: norm tables, evaluation, figures, Markdown and JSON.

`build_report` writes into one output directory:

    report.json          every number (norms per module and layer, metrics with intervals)
    report.md            the tables in Markdown, with links to the figures
    figures/*.png        heatmaps, per-layer bars, accuracy and alignment tax
    cache/               cached model scores, reused by later reports
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from analysis.evaluate import EvalData, EvalSettings, evaluate_runs
from analysis.lora_norms import LayerTable, ModuleNorm, layer_table, load_base_state_dict, run_update_norms, shared_module_types
from analysis.plots import accuracy_figure, layer_norm_bars, norm_heatmap, save_figure, tax_figure
from analysis.runs import RunInfo, load_run
from probe.io import write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

REPORT_VERSION = 1


def load_norm_tables(
    runs: list[RunInfo | str | Path],
    *,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
    load_base: bool = True,
) -> tuple[list[LayerTable], dict[str, list[ModuleNorm]]]:
    """Compute update norms of several runs and lay them out on shared module-type columns.

    Args:
        runs: Run directories or parsed runs.
        base_state_dict: Frozen weights for relative norms; by default each
            distinct base model named in the runs' config.json is loaded once.
        load_base: Load base models when `base_state_dict` is None.

    Returns:
        One `LayerTable` per run (same columns, for a shared colour scale) and
        the module norms per run name.
    """
    infos = [run if isinstance(run, RunInfo) else load_run(run) for run in runs]
    base_by_model: dict[str, Mapping[str, torch.Tensor] | None] = {}
    norms: dict[str, list[ModuleNorm]] = {}
    for info in infos:
        if info.model_name not in base_by_model:
            base_by_model[info.model_name] = base_state_dict if base_state_dict is not None or not load_base else load_base_state_dict(info)
        norms[info.name] = run_update_norms(info, base_state_dict=base_by_model[info.model_name], load_base=False)

    columns = shared_module_types(list(norms.values()))
    tables = [
        layer_table(norms[info.name], info.num_layers, name=info.name, module_types=columns, partition=info.partition)
        for info in infos
    ]
    return tables, norms


def block_norms(table: LayerTable) -> list[dict[str, Any]]:
    """Combine a table's layer norms per partition block: sqrt of summed squares over adapted layers."""
    if table.partition is None:
        return []
    rows = []
    for block in table.partition.blocks:
        norms = table.layer_frobenius[block.start : block.end]
        adapted = ~np.isnan(norms)
        rows.append({
            "block": block.name,
            "layers": [block.start, block.end],
            "adapted_layers": int(adapted.sum()),
            "frobenius": float(np.sqrt(np.sum(norms[adapted] ** 2))) if adapted.any() else None,
            "max_relative": float(np.nanmax(table.layer_relative[block.start : block.end]))
            if np.isfinite(table.layer_relative[block.start : block.end]).any() else None,
        })
    return rows


def write_figures(tables: list[LayerTable], evaluation: dict[str, Any] | None, figures_dir: Path) -> list[str]:
    """Draw and save every figure; return their file names."""
    has_relative = any(np.isfinite(table.values["relative"]).any() for table in tables)
    norm_metric = "relative" if has_relative else "frobenius"
    figures = {
        "update_heatmap.png": norm_heatmap(tables, norm_metric),
        "update_heatmap_frobenius.png": norm_heatmap(tables, "frobenius"),
        "stable_rank_heatmap.png": norm_heatmap(tables, "stable_rank"),
        "update_per_layer.png": layer_norm_bars(tables, norm_metric),
    }
    if evaluation is not None:
        figures["accuracy.png"] = accuracy_figure(evaluation)
        figures["accuracy_normalized.png"] = accuracy_figure(evaluation, "accuracy_normalized")
        figures["alignment_tax.png"] = tax_figure(evaluation)
    for name, figure in figures.items():
        save_figure(figure, figures_dir / name)
    return list(figures)


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    data: EvalData | None = None,
    settings: EvalSettings | None = None,
    evaluate: bool = True,
    judge: dict[str, Any] | None = None,
    base_state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write the full report for several runs and return its JSON content.

    Args:
        run_dirs: Run directories written by `align`.
        out_dir: Output directory (created).
        data: Held-out data; loaded from the capability suite when None and `evaluate` is set.
        settings: Scoring and bootstrap settings.
        evaluate: Score base and runs on held-out data; without it only norms are reported.
        judge: Output of `analysis.judge.judge_runs`, added as a table.
        base_state_dict: Frozen weights for relative norms, instead of loading the base model.
    """
    out_dir = Path(out_dir)
    runs = [load_run(path) for path in run_dirs]
    tables, norms = load_norm_tables(runs, base_state_dict=base_state_dict)

    evaluation = None
    if evaluate:
        if data is None:
            from analysis.evaluate import eval_data_from_suite

            data = eval_data_from_suite()
        evaluation = evaluate_runs(runs, data, settings=settings, cache_dir=out_dir / "cache")

    figures = write_figures(tables, evaluation, out_dir / "figures")
    report = {
        "report_version": REPORT_VERSION,
        "runs": [{"name": run.name, "path": str(run.path), "strategy": run.strategy, "seed": run.seed,
                  "model": run.model_name, "adapted_layers": run.adapted_layers} for run in runs],
        "norms": {
            table.name: {"table": table.to_dict(), "blocks": block_norms(table),
                         "modules": [module_record(norm) for norm in norms[table.name]]}
            for table in tables
        },
        "evaluation": evaluation,
        "judge": judge,
        "figures": [f"figures/{name}" for name in figures],
    }
    write_json_atomic(out_dir / "report.json", report)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    logger.info("report written to %s", out_dir)
    return report


def module_record(norm: ModuleNorm) -> dict[str, Any]:
    record = asdict(norm)
    record["relative"] = norm.relative
    return record


# -- Markdown ---------------------------------------------------------------


def fmt_interval(entry: dict[str, float] | None, digits: int = 3) -> str:
    if entry is None:
        return "–"
    return f"{entry['estimate']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def norms_markdown(report: dict[str, Any]) -> str:
    rows = []
    for name, entry in report["norms"].items():
        for block in entry["blocks"]:
            frobenius = "not adapted" if block["frobenius"] is None else f"{block['frobenius']:.4g}"
            relative = "–" if block["max_relative"] is None else f"{block['max_relative']:.4g}"
            rows.append([name, block["block"], f"[{block['layers'][0]}, {block['layers'][1]})",
                         str(block["adapted_layers"]), frobenius, relative])
    header = ["run", "block", "layers", "adapted layers", "update norm ‖ΔW‖_F", "max layer ‖ΔW‖_F / ‖W‖_F"]
    return markdown_table(header, rows)


def accuracy_markdown(evaluation: dict[str, Any], metric: str) -> str:
    columns = [("base", evaluation["base"]["capabilities"])]
    columns += [(name, group["capabilities"]) for name, group in evaluation["groups"].items()]
    rows = [[capability] + [fmt_interval(entries[capability].get(metric)) for _, entries in columns]
            for capability in evaluation["base"]["capabilities"]]
    rows.append(["general: Brown perplexity"] + [fmt_interval(evaluation["base"]["perplexity"], 2)]
                + [fmt_interval(group["perplexity"], 2) for group in evaluation["groups"].values()])
    return markdown_table(["capability"] + [name for name, _ in columns], rows)


def margin_markdown(evaluation: dict[str, Any]) -> str:
    capabilities = list(evaluation["base"]["capabilities"])
    rows = [[name] + [fmt_interval(group["capabilities"][c]["margin"], 4) for c in capabilities]
            for name, group in evaluation["groups"].items()]
    return markdown_table(["run"] + capabilities, rows)


def tax_markdown(evaluation: dict[str, Any]) -> str:
    rows = []
    for row in evaluation["tax"]:
        digits = 2 if row["metric"] == "perplexity" else 3
        flag = "**tax**" if row["tax"] else ""
        rows.append([row["group"], row["measure"], "yes" if row["target"] else "", fmt_interval(row["change"], digits), flag])
    return markdown_table(["run", "measure", "target", "change vs base [95% CI]", "flag"], rows)


def judge_section(judge: dict[str, Any]) -> list[str]:
    """Render the LLM-as-judge results of `analysis.judge.judge_runs` as Markdown lines."""
    from analysis.judge import judge_markdown  # the judge's modules load only when a judge ran

    settings = judge.get("judge", {})
    generation = judge.get("generation", {})
    return [
        "## LLM-as-judge", "",
        f"Judge `{settings.get('model')}` ({settings.get('backend')}) scored the answers of the base model and of",
        f"each run to {generation.get('n_prompts')} held-out prompts, from 1 (very poor) to 10 (excellent). The delta",
        "is run minus base, with a 95% paired bootstrap interval over prompts, and n counts the prompts where both",
        "answers were scored. Pairwise counts the run's wins, losses and ties against the base, each judged in both",
        "answer orders. A pair whose two verdicts disagree counts as a tie and as inconsistent.",
        "Unparseable replies are left out of the scores.", "",
        judge_markdown(judge),
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """Render the report's tables as Markdown, with the figures linked."""
    runs = ", ".join(run["name"] for run in report["runs"])
    models = ", ".join(dict.fromkeys(run["model"] for run in report["runs"]))
    parts = [
        f"# Layer report: {models}", "",
        f"Runs: {runs}. Layers are 0-based and blocks are half-open [start, end).", "",
        "## Where training changed the model", "",
        "Update norm of each block: the square root of the summed squared Frobenius norms of the",
        "LoRA updates ΔW = scaling · B A of its adapted modules. Layers without an adapter are \"not adapted\".", "",
        norms_markdown(report), "",
        "![update heatmap](figures/update_heatmap.png)", "",
        "![update per layer](figures/update_per_layer.png)", "",
    ]
    evaluation = report.get("evaluation")
    if evaluation is not None:
        level = int(evaluation["settings"]["level"] * 100)
        parts += [
            "## Held-out preference accuracy", "",
            f"Share of held-out pairs where log p(chosen) > log p(rejected), summed over completion tokens,",
            f"with {level}% bootstrap intervals (over pairs and seeds). Last row: perplexity on held-out Brown passages.", "",
            accuracy_markdown(evaluation, "accuracy"), "",
            "Length-normalised (mean log-probability per completion token):", "",
            accuracy_markdown(evaluation, "accuracy_normalized"), "",
            "Mean implicit reward margin β((log p_c − ref_c) − (log p_r − ref_r)) in nats, reference = base model:", "",
            margin_markdown(evaluation), "",
            "## Alignment tax", "",
            f"Change against the base model on the same pairs (paired bootstrap, {level}% intervals). A drop in",
            "accuracy, or a rise in perplexity, whose interval excludes zero is flagged as a tax.", "",
            tax_markdown(evaluation), "",
            "![alignment tax](figures/alignment_tax.png)", "",
        ]
    if report.get("judge"):
        parts += judge_section(report["judge"])
    return "\n".join(parts)
