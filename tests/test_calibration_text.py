"""The imatrix's calibration text never outlives the step that reads it: the real imatrix
stage, in a process of its own, killed while llama-imatrix runs. SIGTERM removes the text
at once and still ends the stage by SIGTERM; SIGKILL cannot be caught, so its text stays in
the staging folder until the next start, which removes it and builds as usual."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import BASELINE, REPO, committed
from quantbuild.gguf_artifacts import IMATRIX_FILE
from quantbuild.gguf_base import TEXT_DIR, build_base
from quantbuild.hashing import remove_staging_debris

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")]

STAGING = Path("artifacts") / ".imatrix.partial" / TEXT_DIR


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder the imatrix stage runs in: the committed params.yaml, reading the bundled
    baseline and calibration data in place, and the gguf_base stage's base.gguf. A third of
    the committed imatrix mix (about 70 chunks of 512 tokens) keeps llama-imatrix running
    for seconds, long enough to be caught."""
    params = yaml.safe_load(committed("params.yaml"))
    params["paths"].update(baseline=str(BASELINE), calibration_data=str(REPO / "data" / "calibration"))
    params["calibration"]["imatrix_samples"] = 200
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    build_base(BASELINE, "f16", needed=True, out=tmp_path / params["paths"]["gguf_base"])
    return tmp_path


def start_stage(root: Path) -> subprocess.Popen:
    """`python -m stages.imatrix` in `root`, in a process group of its own; Ctrl-C and the
    terminating signals at their defaults, whatever this process inherited."""
    def defaults() -> None:
        os.setsid()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)

    # OpenMP threads that spin at barriers crawl on cores shared with other work (conftest)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stages.imatrix"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=defaults)


def imatrix_children(pid: int) -> list[int]:
    """The llama-imatrix processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if name == "llama-imatrix" and int(rest[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def wait_for_imatrix(stage: subprocess.Popen, root: Path) -> tuple[Path, int]:
    """Poll until the calibration text is written and llama-imatrix reads it: (text, its pid)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        texts = sorted((root / STAGING).glob("calibration-*.txt"))
        children = imatrix_children(stage.pid)
        if texts and children:
            return texts[0], children[0]
        assert stage.poll() is None, f"the stage ended before llama-imatrix was seen: {stage.communicate()}"
        time.sleep(0.005)
    raise AssertionError("llama-imatrix never started")


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not ended (a zombie has, only not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def calibration_text(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.startswith("calibration-") or path.name == TEXT_DIR]


def test_sigkill_leaves_the_text_to_the_next_start_which_removes_it_and_builds(project, tmp_path_factory):
    stage = start_stage(project)
    try:
        text, _ = wait_for_imatrix(stage, project)
        os.killpg(stage.pid, signal.SIGKILL)
    finally:
        stage.kill()
        stage.communicate()
    assert stage.returncode == -signal.SIGKILL
    # What a SIGKILL leaves: the text, in the staging folder inside the artifacts.
    assert text.parent == project / STAGING and text.read_text(encoding="utf-8").strip()

    # Every stage's start removes it (DVC may restore imatrix from its run-cache, so the
    # next stage to run may be another)...
    other = tmp_path_factory.mktemp("other") / "artifacts"
    shutil.copytree(project / "artifacts", other)
    remove_staging_debris(other)
    assert calibration_text(other) == []
    # ...and the next imatrix stage then builds as it would have, leaving no text behind.
    again = start_stage(project)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, out + err
    assert "imatrix: over" in out and (project / "artifacts" / "imatrix" / IMATRIX_FILE).is_file()
    assert calibration_text(project) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_terminating_signal_removes_the_text_at_once_and_kills_llama_imatrix(project, signum):
    stage = start_stage(project)
    try:
        text, imatrix = wait_for_imatrix(stage, project)
        # to the stage alone, not its group: the stage must stop llama-imatrix itself
        os.kill(stage.pid, signum)
        out, err = stage.communicate(timeout=60)
    finally:
        stage.kill()
    # SIGTERM and SIGHUP still end the process by that signal; Ctrl-C is Python's
    # KeyboardInterrupt, which the stage reports as a failure.
    assert stage.returncode == (1 if signum == signal.SIGINT else -signum), out + err
    assert not text.exists() and calibration_text(project) == []
    assert not running(imatrix)
    assert not (project / "artifacts" / "imatrix").exists()


def test_a_signal_while_a_tool_starts_still_kills_the_tool(monkeypatch):
    """The race CI hit: the signal lands after the child exists but before `Popen` has
    returned it. A handler that asks `defer_signal` (as gguf_base's does) raises once
    `Popen` has returned, where the child is killed; raising inside `Popen` had left the
    child running. Python runs the handler in the main thread whichever thread the signal
    reaches (pytest-xdist's workers have several)."""
    from quantbuild.runtimes import llama_build

    class Raised(BaseException):
        pass

    def raise_(signum, frame):
        if not llama_build.defer_signal(signum):
            raise Raised()

    started: list[int] = []
    real = subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        process = real(*args, **kwargs)
        started.append(process.pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, inside Popen, as it did in CI
        return process

    previous = signal.signal(signal.SIGTERM, raise_)
    monkeypatch.setattr(llama_build.subprocess, "Popen", popen_then_signal)
    try:
        with pytest.raises(Raised):
            llama_build._run_killable(["sleep", "60"], None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert started and not running(started[0])
