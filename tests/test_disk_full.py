"""A full disk: a stage that cannot write says so in one line, naming the place, the space
free and the space needed; its temporary folder goes and the earlier outputs stay.

The disk is real: the project's `artifacts/` on a tmpfs just larger than what it holds
(mounting needs root; elsewhere these tests skip)."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from conftest import BIN, bundle_digests, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@contextmanager
def nearly_full(folder: Path, spare: int = 256 * 1024) -> Iterator[None]:
    """`folder`'s contents moved onto a tmpfs with `spare` bytes free, mounted in its place."""
    used = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
    held = folder.with_name(folder.name + ".held")
    folder.rename(held)
    folder.mkdir()
    # tmpfs counts whole pages per file: room for the files, their pages and the spare
    pages = sum(1 for path in held.rglob("*")) * 4096
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + pages + spare}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        folder.rmdir()
        held.rename(folder)
        pytest.skip(f"a small tmpfs cannot be mounted here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        shutil.copytree(held, folder, symlinks=True, dirs_exist_ok=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()
        held.rename(folder)


def _stage(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "python"), "-m", *args], cwd=repo, capture_output=True, text=True)


def test_package_and_quantize_on_a_full_disk_are_one_line_and_lose_nothing(built_project, tmp_path):
    repo = copy_project(built_project, tmp_path / "repo")
    before = bundle_digests(repo)
    quantized = repo / "artifacts" / "quantized" / "gguf_q8_0" / "model" / "model.gguf"
    quantized_sha = quantized.read_bytes()
    with nearly_full(repo / "artifacts"):
        for stage in (("stages.package",), ("stages.quantize", "gguf_q8_0")):
            result = _stage(repo, *stage)
            lines = result.stdout.strip().splitlines() + result.stderr.strip().splitlines()
            assert result.returncode == 1, (stage, result.stderr[-2000:])
            assert len([line for line in lines if line.startswith("quantbuild:")]) == 1, lines
            line = next(line for line in lines if line.startswith("quantbuild:"))
            assert "no space left on its device" in line and "MiB free" in line and "needed" in line, line
            assert "Traceback" not in result.stderr + result.stdout
        # no temporary folder left, the earlier outputs as they were
        assert not list((repo / "artifacts").glob(".*.partial"))
        assert bundle_digests(repo) == before
        assert quantized.read_bytes() == quantized_sha
