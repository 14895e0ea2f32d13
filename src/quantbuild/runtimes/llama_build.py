"""Where llama.cpp is built, and its command-line tools.

`make install` builds the vendored llama.cpp tree of the pinned llama-cpp-python sdist
once into `<venv>/llama.cpp/`: the shared libraries the bindings load (runtimes.llama_cpp),
the llama-quantize / llama-imatrix / llama-perplexity tools, and the converter's source
(runtimes.gguf_file). This module knows that layout; the bindings and the file format
both sit on it, so neither imports the other for it.

The build has the CUDA backend where `make install` found nvcc and an NVIDIA GPU (or was
told `LLAMA_BACKEND=cuda`): `libggml-cuda.so` then sits beside the other libraries, and
`quantbuild-build.json` beside them records what it was compiled with.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from quantbuild.errors import QuantbuildError, RuntimeUnavailable

PACKAGE = "llama-cpp-python"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# ISA flags of the CPUs whose CPU repack path crashed here (runtimes.llama_cpp says how).
REPACK_UNSAFE_ISA = ("amx_int8", "amx_bf16", "amx_tile", "avx512f")
# What `make install` writes beside the binaries: {"backend", "cuda_version", "cuda_architectures"}.
BUILD_INFO = "quantbuild-build.json"


def cores() -> int:
    """The threads the llama.cpp tools run with: every core this process may use. Their
    outputs do not depend on it (each quantized block and each matmul output is one
    thread's work; a test builds a variant on one core and on all and compares), so a
    16-core machine quantizes an 8B model in a minute rather than eight."""
    return len(os.sched_getaffinity(0))


def free_threads(cpus: int, load: float, usable: int) -> int:
    """Threads for the cores actually free: the machine's cores less the cores busy now
    (`load`), to the nearest core, at least 1 and at most the cores this process may run on.
    llama.cpp's threads wait for each other at every barrier, so a thread more than there
    are free cores makes every step wait for a core another job holds (on 2 shared cores,
    an evaluation of 97 s took 513-1,459 s)."""
    return max(1, min(usable, math.floor(cpus - load + 0.5)))


def busy_cores(seconds: float = 0.5) -> float:
    """Cores busy now: the machine's non-idle time over `seconds`, from /proc/stat (the
    1-minute load average, where there is none: it lags, still counting the stage before)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        total, idle = sample()
        time.sleep(seconds)
        total_after, idle_after = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    spent = total_after - total
    return (os.cpu_count() or 1) * (1 - (idle_after - idle) / spent) if spent > 0 else 0.0


def free_cores() -> dict[str, Any]:
    """This machine now: its cores, those this process may run on, the cores busy now and
    the 1-minute load average, and `free_threads` of them."""
    cpus, usable, busy = os.cpu_count() or 1, len(os.sched_getaffinity(0)), busy_cores()
    return {"cpus": cpus, "usable": usable, "busy": round(busy, 2), "load_1min": round(os.getloadavg()[0], 2),
            "threads": free_threads(cpus, busy, usable)}


def version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeUnavailable(f"llama.cpp: {PACKAGE} is not installed (run `make install`)") from None


def home() -> Path:
    """Where `make install` built llama.cpp: `<venv>/llama.cpp`."""
    return Path(sys.prefix) / "llama.cpp"


def sdist_dir() -> Path:
    """The extracted llama-cpp-python sdist `make install` built from (exactly one)."""
    found = sorted(home().glob("llama_cpp_python-*/"))
    if len(found) != 1:
        raise RuntimeUnavailable(f"llama.cpp: expected one built llama-cpp-python source under {home()}, found "
                                 f"{len(found)} (run `make install`)")
    return found[0]


def source_dir() -> Path:
    """The vendored llama.cpp tree (converter, gguf-py) of the pinned sdist."""
    path = sdist_dir() / "vendor" / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise RuntimeUnavailable(f"llama.cpp: the converter is missing at {path} (run `make install`)")
    return path


def tool(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        raise RuntimeUnavailable(f"llama.cpp: {name} is not built at {path} (run `make install`)")
    return path


def bin_dir() -> Path:
    """Where the build's libraries and tools are: `<venv>/llama.cpp/build/bin`."""
    return home() / "build" / "bin"


def build_backend() -> str:
    """The backend llama.cpp was compiled with: "cuda" where its CUDA library sits beside the
    others, else "cpu" (the libraries decide, not a record of them)."""
    return "cuda" if (bin_dir() / "libggml-cuda.so").is_file() else "cpu"


def build_info() -> dict[str, str]:
    """{"backend"}, and for a CUDA build the CUDA version and GPU architectures it was
    compiled for, as `make install` recorded them ("unknown" for a build made before it
    did)."""
    backend = build_backend()
    if backend != "cuda":
        return {"backend": backend}
    try:
        recorded = json.loads((bin_dir() / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    return {"backend": backend, "cuda_version": str(recorded.get("cuda_version", "unknown")),
            "cuda_architectures": str(recorded.get("cuda_architectures", "unknown"))}


def vendored_commit() -> str:
    """The llama.cpp commit the pinned sdist vendors, as its changelog names it."""
    try:
        changelog = sdist_dir() / "CHANGELOG.md"
    except RuntimeUnavailable:
        return "unknown"
    if changelog.is_file():
        found = re.search(r"llama\.cpp@([0-9a-f]{7,40})", changelog.read_text(encoding="utf-8"))
        if found:
            return found.group(1)
    return "unknown"


def repack_allowed(isa: list[str]) -> bool:
    return not any(flag in isa for flag in REPACK_UNSAFE_ISA)


def vendored_converter() -> Path:
    """The vendored tree, importable: its `conversion` package and `gguf-py` sit on sys.path."""
    root = source_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def run_tool(name: str, args: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a llama.cpp tool; its output is returned (and kept out of the user's terminal).
    A failure is one line naming `what` and the tool's last error line."""
    command = [str(tool(name)), *args]
    result = _run_killable(command, cwd)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"error|failed|invalid|unknown", line, re.IGNORECASE)]
        detail = (errors or lines or [f"exit code {result.returncode}"])[-1].strip()
        if result.returncode < 0:
            detail = f"killed by signal {-result.returncode}; {detail}"
        raise QuantbuildError(f"{what}: {name} failed: {detail}")
    return output


# Terminating signals that arrived while a child was starting (`starting_child`).
_starting = False
_deferred: list[int] = []


@contextmanager
def starting_child() -> Iterator[None]:
    """While a child process starts, a raising signal handler that asks `defer_signal`
    holds its signal back; on the way out each one is sent again, so it raises once the
    caller can kill the child. Python runs its handlers in the main thread whichever
    thread the signal reached, so this holds in a process with other threads too, which
    a signal mask (per thread) would not."""
    global _starting
    _starting = True
    try:
        yield
    finally:
        _starting = False
        while _deferred:
            os.kill(os.getpid(), _deferred.pop(0))


def defer_signal(signum: int) -> bool:
    """For a signal handler that raises: True (and the signal kept for later) while a child
    is starting; False when the handler may raise now."""
    if _starting:
        _deferred.append(signum)
        return True
    return False


def _run_killable(command: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    """`subprocess.run(command)` whose child never outlives an exception in this process.

    `subprocess.run` kills its child on any exception raised while it waits, but not on one
    raised while `Popen` is still starting it (the child runs, its Popen object does not
    exist yet): gguf_base's SIGTERM handler raising there orphaned llama-imatrix. Handlers
    that ask `defer_signal` raise after the start instead, where the child is killed.
    """
    process = None
    try:
        with starting_child():
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       errors="replace", cwd=cwd)
        stdout, stderr = process.communicate()
    except BaseException:
        if process is not None:
            process.kill()
            process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
