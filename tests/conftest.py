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


def committed(path: str) -> str:
    """A file as committed at HEAD, never the user's working copy (a user's params.yaml may
    name their signing key or an experiment's overrides); the file itself outside git."""
    import subprocess

    shown = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / path).read_text()


def committed_conf(out: Path) -> Path:
    """conf/ as committed at HEAD, extracted into `out` (the working conf/ outside git)."""
    import shutil
    import subprocess
    import tarfile
    from io import BytesIO

    archive = subprocess.run(["git", "archive", "HEAD", "conf"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        shutil.copytree(REPO / "conf", out / "conf")
    else:
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(out, filter="data")
    return out / "conf"


@pytest.fixture
def params() -> dict:
    """The committed params.yaml as a dict (tests edit a copy)."""
    import yaml

    return yaml.safe_load(committed("params.yaml"))
