"""Fan a ladder out over machines: Ray runs the stages, a shared DVC remote carries them.

DVC has no multi-host scheduler, but what it records travels: a stage's outputs and its
run-cache entry, pushed to a shared remote, let any machine restore that stage without
running it. `quantbuild fanout` uses that:

1. The driver's repository must be committed (every task checks out that commit) and the
   driver's `fingerprint` stage runs first: its environment is the reference.
2. On the Ray cluster (`--address`, or a local one of `--workers` CPUs), each task works in
   a fresh clone of the commit, with the shared remote set. It runs the fingerprint stage
   and compares every fingerprint file with the driver's: a worker whose environment
   differs (library versions, llama.cpp build, CPU ISA, GPU) is refused before any work,
   naming the drifted keys, since its outputs would not be the driver's build and DVC
   would not reuse them. Otherwise it runs `dvc repro` of its stages (restoring upstream
   stages from the run-cache other tasks pushed) and pushes outputs and run-cache.
   Order: one task for the shared upstream stages, then one task per variant
   (`quantize@V`, `evaluate@V`) in parallel, then one for the rest (repair, select,
   package), whose `dvc.lock` records the whole build.
3. The driver writes that `dvc.lock` and pulls: a `dvc repro` then finds every stage up to
   date and runs only `fingerprint`, which always runs and here changes nothing.

Ray is an optional dependency (`pip install 'quantbuild[ray]'`); without it, and by
default, the pipeline runs on one machine with `dvc repro`. The driver runs on a node of the
cluster (`--address HEAD:6379`): that extra installs no Ray Client, so `ray://` addresses
are refused.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from quantbuild.errors import ConfigError, DriftError, QuantbuildError

UPSTREAM = ("fetch", "calibrate", "gguf_base", "imatrix", "sensitivity", "evaluate_baseline@{t}")
# the variant's build, then its evaluation on each deploy target of the run
PER_VARIANT = ("quantize@{v}", "evaluate@{v}-{t}")
FINISH = ("repair", "select", "package")
FINGERPRINT_DIR = "artifacts/fingerprint"
# Ray retries an address nothing answers at for minutes; a TCP connect is refused or times
# out in seconds. The environment variable overrides the default.
PROBE_TIMEOUT_S = 5.0
PROBE_TIMEOUT_ENV = "QUANTBUILD_RAY_PROBE_TIMEOUT"
# Addresses Ray resolves itself (a cluster it starts here, or the one `ray start` recorded):
# nothing to probe.
RAY_FINDS = ("auto", "local")


def _run(command: list[str], cwd: Path, what: str, env: Optional[dict] = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise QuantbuildError(f"{what}: {' '.join(command[:3])} failed: {(lines or ['no output'])[-1].strip()}")
    return result.stdout + result.stderr


def fingerprint_files(root: Path) -> dict[str, Any]:
    """Every fingerprint file of a checkout, by path relative to the fingerprint folder."""
    folder = root / FINGERPRINT_DIR
    return {path.relative_to(folder).as_posix(): json.loads(path.read_text())
            for path in sorted(folder.rglob("*.json"))}


def fingerprint_drift(expected: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`file: key: driver -> worker` for every differing fingerprint value."""
    from quantbuild.fingerprint import drift

    lines = []
    for name in sorted(set(expected) | set(current)):
        for key, old, new in drift(expected.get(name, {}), current.get(name, {})):
            lines.append(f"{name}: {key}: {old!r} -> {new!r}")
    return lines


def _dvc() -> list[str]:
    return [str(Path(sys.executable).parent / "dvc")]


def _env() -> dict[str, str]:
    """This environment with its Python's scripts first on PATH (DVC runs `python -m stages.X`)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _stages(names: tuple[str, ...], variant: str = "", targets: list[str] = ()) -> list[str]:
    """The DVC stage names of `names` for one variant and every deploy target, in order."""
    return list(dict.fromkeys(name.format(v=variant, t=target) for name in names for target in targets))


def run_task(repo_url: str, commit: str, remote_url: str, stages: list[str], expected: dict[str, Any],
             want_lock: bool = False) -> dict[str, Any]:
    """One fanout task on a worker: clone, check the fingerprint, repro `stages`, push.
    Returns what ran, the worker, and (with `want_lock`) the resulting dvc.lock."""
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="quantbuild-fanout-"))
    try:
        root = scratch / "repo"
        env = _env()
        _run(["git", "clone", "--quiet", repo_url, str(root)], scratch, "fanout clone")
        _run(["git", "checkout", "--quiet", commit], root, "fanout checkout")
        dvc = _dvc()
        _run([*dvc, "remote", "add", "--local", "--force", "--default", "fanout", remote_url], root, "fanout remote", env)
        _run([*dvc, "repro", "--single-item", "fingerprint"], root, "fanout fingerprint", env)
        drifted = fingerprint_drift(expected, fingerprint_files(root))
        if drifted:
            raise DriftError(f"worker {platform.node()}: its environment differs from the driver's, so it may not "
                             f"build for it: {'; '.join(drifted[:3])}" + (f" (+{len(drifted) - 3} more)"
                                                                            if len(drifted) > 3 else ""))
        # The run-cache entries other tasks pushed (a first task finds none); `repro --pull`
        # then fetches the outputs of each stage it restores from them.
        subprocess.run([*dvc, "fetch", "--run-cache", "--quiet"], cwd=root, capture_output=True, env=env)
        output = _run([*dvc, "repro", "--pull", *stages], root, f"fanout {' '.join(stages)}", env)
        _run([*dvc, "push", "--run-cache", "--quiet"], root, "fanout push", env)
        # DVC announces every stage it reproduces; one it restores from the run-cache is also
        # "cached - skipping run".
        restored = sorted({line.split("'")[1] for line in output.splitlines()
                           if line.startswith("Stage '") and "is cached" in line})
        ran = sorted({line.split("'")[1] for line in output.splitlines()
                      if line.startswith("Running stage '")} - set(restored))
        lock = (root / "dvc.lock").read_text() if want_lock else None
        return {"stages": stages, "ran": ran, "restored": restored, "worker": platform.node(),
                "seconds": round(time.perf_counter() - started, 1), "lock": lock}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _require_clean(root: Path) -> str:
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], root, "fanout")
    dirty = [line[3:] for line in status.splitlines() if line[3:] != "dvc.lock"]
    if dirty:
        raise ConfigError(f"fanout: {dirty[0]} has uncommitted changes (workers build the commit, HEAD): commit "
                          f"them first")
    return _run(["git", "rev-parse", "HEAD"], root, "fanout").strip()


def default_remote_url(root: Path) -> str:
    """The repository's default DVC remote as an absolute URL or path workers can reach."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        name = config["core"].get("remote")
        if not name or name not in config["remote"]:
            raise ConfigError("fanout: no default DVC remote (workers exchange stages through one): "
                              "`dvc remote add -d NAME URL`, or pass --remote")
        url = config["remote"][name]["url"]
    # DVC resolves a local remote's path against its config file already; keep URLs as they are.
    return url if "://" in url or os.path.isabs(url) else str((root / url).resolve())


def ray_endpoint(address: Optional[str]) -> Optional[tuple[str, int]]:
    """The (host, port) of `HOST:PORT` or `ray://HOST:PORT` (`[IPv6]:PORT` too); None for
    the addresses Ray resolves itself (none, `auto`, `local`). Anything else is a ConfigError."""
    if address is None or address in RAY_FINDS:
        return None
    parts = urlsplit(f"//{address.removeprefix('ray://')}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number, or out of range
        host, port = None, None
    if not host or port is None or parts.path or parts.query or parts.fragment:
        raise ConfigError(f"fanout: --address {address} is not HOST:PORT (the head's {host or 'HOST'}:6379), auto, "
                          f"or left out for a local cluster")
    return host, port


def probe_timeout(seconds: Optional[float] = None) -> float:
    """`seconds`, else $QUANTBUILD_RAY_PROBE_TIMEOUT, else PROBE_TIMEOUT_S: a positive number."""
    if seconds is None:
        raw = os.environ.get(PROBE_TIMEOUT_ENV)
        try:
            seconds = PROBE_TIMEOUT_S if raw is None else float(raw)
        except ValueError:
            seconds = float("nan")
        where = f"{PROBE_TIMEOUT_ENV}={raw}"
    else:
        where = f"the probe timeout {seconds}"
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"fanout: {where} is not allowed (allowed: a number of seconds > 0)")
    return seconds


def probe(address: Optional[str], timeout: float) -> None:
    """Return once something accepts a TCP connection at `address` within `timeout` seconds
    (at once for an address Ray resolves itself); else one ConfigError line naming it."""
    endpoint = ray_endpoint(address)
    if endpoint is None:
        return
    try:
        with socket.create_connection(endpoint, timeout=timeout):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err)).lower()
        raise ConfigError(f"fanout: nothing answered at {address} within {timeout:g} s ({reason}): is the Ray "
                          f"head running there (`ray start --head`)?") from None


def fanout(root: Path, variants: list[str], address: Optional[str], workers: int, remote: Optional[str],
           repo_url: Optional[str], log: Callable[[str], None], targets: list[str] = ("llama.cpp-cpu",),
           probe_timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Build the ladder on a Ray cluster, each variant evaluated on every deploy target in
    `targets`; afterwards the driver's workspace holds the whole build (dvc.lock, pulled
    outputs). Returns a record of every task. An `address` nothing answers at within
    `probe_timeout_s` (default: `probe_timeout()`) is refused before any work."""
    try:
        import ray
    except ImportError:
        raise ConfigError("fanout: Ray is not installed (it is optional: pip install 'quantbuild[ray]')") from None
    if address and address.startswith("ray://"):
        # Ray Client needs `ray[client]` (grpcio), which quantbuild[ray] does not install.
        raise ConfigError(f"fanout: --address {address}: Ray Client (ray://) is not supported; run fanout on a node "
                          f"of the cluster with the head's address, HEAD:6379")
    probe(address, probe_timeout(probe_timeout_s))
    commit = _require_clean(root)
    remote_url = remote or default_remote_url(root)
    if "://" not in remote_url:
        Path(remote_url).mkdir(parents=True, exist_ok=True)
    env = _env()
    # The driver's environment, the reference (the stage's command alone: dvc.lock stays as it is).
    _run([sys.executable, "-m", "stages.fingerprint"], root, "fanout fingerprint", env)
    expected = fingerprint_files(root)
    source = repo_url or str(root)
    started = time.perf_counter()
    try:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(f"fanout: no Ray cluster at {address}: {str(err).strip().splitlines()[0]}") from None
    task = ray.remote(num_cpus=1, max_retries=0)(run_task)
    record: dict[str, Any] = {"commit": commit, "remote": remote_url, "tasks": []}
    try:
        waves = [[_stages(UPSTREAM, targets=targets)],
                 [_stages(PER_VARIANT, variant, targets) for variant in variants], [list(FINISH)]]
        lock = None
        for number, wave in enumerate(waves):
            final = number == len(waves) - 1
            results = ray.get([task.remote(source, commit, remote_url, stages, expected, final) for stages in wave])
            for result in results:
                log(f"fanout: {' '.join(result['stages'])} on {result['worker']}: ran {', '.join(result['ran'])}; "
                    f"restored {len(result['restored'])} from the run-cache ({result['seconds']} s)")
                lock = result.pop("lock") or lock
                record["tasks"].append(result)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, QuantbuildError):
            raise type(cause)(str(cause)) from None
        raise QuantbuildError(f"fanout: a task failed: {str(err).strip().splitlines()[-1]}") from None
    finally:
        ray.shutdown()
    (root / "dvc.lock").write_text(lock)
    _run([*_dvc(), "remote", "add", "--local", "--force", "fanout", remote_url], root, "fanout remote", env)
    _run([*_dvc(), "pull", "--remote", "fanout", "--quiet"], root, "fanout pull", env)
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record
