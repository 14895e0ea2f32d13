"""Shared fixtures: the repo root, the bundled baseline, a small validated config, and the
small project built once per test session.

The suite runs on every core (pytest-xdist, one file per worker: `--dist loadfile`), so a
module's fixtures are built once, by the worker that runs the module. The built small
project is shared across workers (built by the first that needs it, under a file lock);
a test that changes a project works on its own copy (`copy_project`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "data" / "baseline" / "workflow-llama-8m"
# The venv's commands (dvc, quantbuild, the stages' python), first on PATH for subprocesses.
BIN = Path(sys.executable).parent

# Quiet, single-process, deterministic library behaviour for every test.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two workers share the cores: OpenMP threads (llama.cpp's and torch's) that spin at every
# barrier while the other worker holds the core slow both by several times; passive waiting
# changes no number, only who waits how. Subprocesses (DVC's stages) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(cwd: Path, *args: str, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """A command in `cwd` with the venv first on PATH; `check` fails the test with its output."""
    full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def dvc(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "dvc"), *args, **kwargs)


def quantbuild(repo: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(repo, str(BIN / "quantbuild"), *args, **kwargs)


def commit_all(repo: Path, message: str) -> None:
    run(repo, "git", "add", "-A", check=True)
    run(repo, "git", "commit", "-qm", message, check=True)


# The small project's smaller ladder releases this variant.
BUNDLE = "artifacts/package/workflow-llama-8m-gguf_q4_k_m_imat"
QUANTIZED = "gguf_q4_k_m_imat"


def bundle_digests(repo: Path, bundle: str = BUNDLE) -> dict[str, str]:
    from quantbuild.hashing import sha256_file

    root = repo / bundle
    return {path.relative_to(root).as_posix(): sha256_file(path) for path in sorted(root.rglob("*")) if path.is_file()}


def stages_run(output: str) -> set[str]:
    """The stages a `dvc repro` ran, from its output."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


def has_cuda() -> bool:
    """A CUDA GPU torch can use, asked in a process of its own: a CUDA torch and llama.cpp's
    CUDA build crash in one process (bench/README.md), so llama.cpp's GPU tests keep torch
    out of theirs."""
    asked = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    return asked.stdout.strip() == "True"


def llama_cpp_has_cuda() -> bool:
    """A CUDA GPU this machine's llama.cpp build can use (the venv's torch is the CPU wheel
    even where llama.cpp was built with CUDA)."""
    try:
        from quantbuild.runtimes.llama_cpp import devices

        return "cuda" in devices()
    except Exception:  # llama.cpp not installed: no GPU it can use
        return False


# The order files are handed to workers in (xdist takes them from the front, and keeps it only
# with `--no-loadscope-reorder`: by default it reorders files by their number of tests): the
# longest first, so that the short ones fill in at the end and both workers finish together
# (about 700 s of the 1,440 s of tests each, against 813 s with xdist's order); first of all
# the file whose first test builds the shared project, so that its other users, which come
# after the two longest files, find it built. Files not named follow in collection order.
ORDER = ("test_pipeline_e2e.py", "test_gguf.py", "test_quantization.py", "test_chat_pipeline.py", "test_fanout.py",
         "test_release_e2e.py", "test_torch_ladder.py", "test_baseline.py", "test_drift_e2e.py", "test_runner.py",
         "test_calibration_text.py")


def _file_rank(item) -> int:
    name = item.path.name
    return ORDER.index(name) if name in ORDER else len(ORDER)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)
    gpu = [item for item in items if "gpu" in item.keywords]
    # a GPU test of llama.cpp runs where llama.cpp can use the GPU, the others where torch can
    torch_gpu, llama_gpu = (has_cuda(), llama_cpp_has_cuda()) if gpu else (False, False)
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu:
        if not (llama_gpu if item.path.name == "test_llama_cuda.py" else torch_gpu):
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


def small_project(root: Path) -> Path:
    """A git repository holding this working tree (tracked and untracked-not-ignored files,
    no dvc.lock) with the committed configuration at small settings: a two-variant GGUF
    ladder, four items per family, loose budgets. Nothing is built yet."""
    import shutil
    import subprocess

    import yaml

    from quantbuild.config import compose

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file() and not name.startswith("dvc.lock"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # The committed configuration, never the user's working params.yaml (keys, experiments).
    params = yaml.safe_load(committed("params.yaml"))
    params["calibration"].update(samples=6, seq_len=96, sensitivity={"samples": 2, "family_tokens": 256},
                                 imatrix_samples=40, imatrix_chunk=128)
    # Two GGUF variants of the default ladder (one with the importance matrix) keep this at
    # about a minute; test_quantization covers every method.
    ladder = compose(REPO / "conf", ["quant=[gguf_q8_0,gguf_q4_k_m_imat]"])["quant"]["variants"]
    params["quant"]["variants"] = ladder
    params["eval"].update(limit=4, batch_size=8)
    params["eval"]["latency"].update(prompt_lengths=[16], new_tokens=2, warmup=0, repeats=1)
    params["eval"]["memory"].update(context_lengths=[32])
    # Four items per family are noise; these budgets still check that the gate runs.
    # One timed round of two tokens decides nothing: the latency check runs, with a wide limit.
    params["gate"] = {"max_perplexity_increase_pct": 50.0, "max_kld_mean": 1.0, "max_kld_p99": 10.0,
                      "min_top1_agreement": 0.5, "max_family_drop": {"structured": 0.5},
                      "max_latency_paired_ratio": 10.0, "latency_noise_margin": 0.05, "max_memory_ratio": 0.95,
                      "memory_context": 32}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"],
                    ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    return root


def copy_project(source: Path, target: Path) -> Path:
    """A full copy of a built project (git history, DVC cache, workspace artifacts), for a
    test that changes it; DVC's cache is copied, not linked, so the source stays as built."""
    import shutil

    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The small project after one full `dvc repro`, built once per test session and shared
    by every worker. Never change it: copy it with `copy_project`."""
    import shutil

    from filelock import FileLock

    # under xdist every worker has its own base folder inside one shared by all of them
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root, done = shared / "built-project" / "repo", shared / "built-project.done"
    with FileLock(str(shared / "built-project.lock")):
        if not done.is_file():
            if root.exists():  # a worker's earlier attempt failed: start again
                shutil.rmtree(root)
            root.mkdir(parents=True)
            small_project(root)
            run(root, str(BIN / "dvc"), "repro", check=True)
            done.write_text(str(root))
    return root
