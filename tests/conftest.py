"""Shared fixtures: the repo root, the bundled baseline, and a small validated config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "data" / "baseline" / "workflow-llama-8m"

# Quiet, single-process, deterministic library behaviour for every test.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if not has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def params() -> dict:
    """The committed params.yaml as a dict (tests edit a copy)."""
    import yaml

    return yaml.safe_load((REPO / "params.yaml").read_text())
