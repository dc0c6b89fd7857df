"""Execute notebooks/layer_heatmaps.ipynb with nbclient on runs of tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from analysis.evaluate import EvalData, EvalSettings
from analysis.report import build_report
from tests.analysis_runs import make_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "layer_heatmaps.ipynb"


def test_notebook_renders_heatmaps_and_tables(tmp_path, monkeypatch):
    runs = [make_run(tmp_path / "runs", "local-seed0", layers=[0]),
            make_run(tmp_path / "runs", "global-seed0", layers=[3], strategy="global", capability="facts")]
    pairs = {c: [{"prompt": f"q{i}: ", "chosen": "yes", "rejected": "no"} for i in range(2)] for c in ("syntax", "logic", "facts")}
    build_report(runs, tmp_path / "report", data=EvalData(pairs, ["plain text."]),
                 settings=EvalSettings(max_length=32, resamples=50, progress=False))
    monkeypatch.setenv("HIERALIGN_RUNS", str(tmp_path / "runs" / "*"))
    monkeypatch.setenv("HIERALIGN_REPORT", str(tmp_path / "report"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 2
    markdown = "\n".join(output["data"].get("text/markdown", "") for output in outputs if "data" in output)
    assert "| global | facts | yes |" in markdown
    tables = "\n".join(output["data"].get("text/plain", "") for output in outputs if "data" in output)
    assert "not adapted" in tables
