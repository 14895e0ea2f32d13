"""`quantbuild fanout`: a two-variant ladder built by tasks on a local Ray cluster of two
workers through a folder DVC remote. Afterwards the driver's `dvc repro` runs no stage but
fingerprint and its package is byte-identical to a one-machine build; a cluster whose
environment differs from the driver's is refused, naming the drift."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest

from conftest import BIN, BUNDLE, bundle_digests, committed, copy_project, run
from quantbuild.errors import ConfigError
from quantbuild.fanout import fanout, probe, probe_timeout, ray_endpoint

pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.e2e]

def clone(source: Path, target: Path) -> Path:
    assert run(source.parent, "git", "clone", "-q", str(source), str(target)).returncode == 0
    return target


# What no two runs share, on one machine or many: timings (latency suites, the latency check,
# wall time in the records the lock hashes), the cores free when each evaluation started and
# the llama.cpp threads chosen by them, and the digests of the files that hold them.
TIMED = {"manifest.json", "provenance.intoto.json"}


def without_timings(root: Path) -> dict:
    manifest = json.loads((root / BUNDLE / "manifest.json").read_text())
    manifest.pop("dvc_lock")
    # the primary record, and each deploy target's
    for record in (manifest, *manifest["targets"].values()):
        for side in record["evaluation"].values():
            side.pop("latency"), side.pop("latency_vs_baseline", None), side.pop("cores")
            side["llama_cpp"].pop("threads")
        record["gate"]["checks"] = [check for check in record["gate"]["checks"] if check["budget"] != "latency_ratio"]
    manifest["files"] = {name: entry for name, entry in manifest["files"].items() if name not in TIMED}
    return manifest


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory) -> Path:
    """The small project, its gate without the latency check: one timed round decides
    nothing, and the two builds compared here must not choose differently by load alone.
    A copy of the session's built project: drivers clone its commit (no artifacts)."""
    import yaml

    root = copy_project(built_project, tmp_path_factory.mktemp("fanout") / "origin")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["gate"]["max_latency_paired_ratio"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert run(root, "git", "commit", "-qam", "no latency check").returncode == 0
    return root


@pytest.fixture(scope="module")
def single(project) -> Path:
    """The same commit built on one machine by `dvc repro`: the session's build, re-gated
    (only repair, select and package rerun for the changed gate)."""
    result = run(project, str(BIN / "dvc"), "repro")
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"select", "package"} <= set(re.findall(r"Running stage '([^']+)'", result.stdout))
    return project


def test_a_ladder_fanned_out_over_two_workers_restores_without_running_and_packages_the_same_bytes(
        project, single, tmp_path):
    driver = clone(project, tmp_path / "driver")
    remote = tmp_path / "remote"
    result = run(driver, str(BIN / "quantbuild"), "fanout", "--workers", "2", "--remote", str(remote))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # The upstream task, one task per variant, the finishing task.
    assert "fanout: quantize@gguf_q8_0 evaluate@gguf_q8_0-llama.cpp-cpu on" in result.stdout
    assert "fanout: quantize@gguf_q4_k_m_imat evaluate@gguf_q4_k_m_imat-llama.cpp-cpu on" in result.stdout
    assert "only fingerprint runs" in result.stdout
    # Each task restored what another task built (fetch, whose output persists, and the
    # always-run fingerprint are run by every task): the variant tasks did not rebuild the
    # shared stages, and the finishing task rebuilt no variant.
    lines = {line.split(" on ")[0]: line for line in result.stdout.splitlines() if line.startswith("fanout: ")}
    for variant in ("gguf_q8_0", "gguf_q4_k_m_imat"):
        ran = lines[f"fanout: quantize@{variant} evaluate@{variant}-llama.cpp-cpu"].split("ran ")[1].split(";")[0]
        assert "calibrate" not in ran and "evaluate_baseline@llama.cpp-cpu" not in ran and f"quantize@{variant}" in ran
    finish = lines["fanout: repair select package"].split("ran ")[1].split(";")[0]
    assert "quantize@" not in finish and "evaluate" not in finish and "select" in finish
    repro = run(driver, str(BIN / "dvc"), "repro")
    assert repro.returncode == 0, repro.stderr[-2000:]
    assert set(re.findall(r"Running stage '([^']+)'", repro.stdout)) == {"fingerprint"}
    # The bundle is the one-machine build's: every file byte for byte, except the manifest and
    # provenance, which differ only in what no two runs share (timings).
    ours, theirs = bundle_digests(driver), bundle_digests(single)
    assert set(ours) == set(theirs) and {name for name in ours if ours[name] != theirs[name]} <= TIMED
    assert without_timings(driver) == without_timings(single)
    assert run(driver, str(BIN / "quantbuild"), "verify", BUNDLE).returncode == 0


def test_uncommitted_changes_are_refused_before_any_task(project, tmp_path):
    driver = clone(project, tmp_path / "driver")
    params = driver / "params.yaml"
    params.write_text(params.read_text().replace("seed: 0", "seed: 1", 1))
    result = run(driver, str(BIN / "quantbuild"), "fanout", "--workers", "1", "--remote", str(tmp_path / "r"))
    assert result.returncode == 1
    assert "params.yaml has uncommitted changes" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_cluster_with_a_drifted_environment_is_refused_naming_the_drift(project, tmp_path):
    """A Ray cluster started in an environment with another llama-cpp-python: its workers'
    fingerprint differs from the driver's, so the first task refuses before building."""
    fake = tmp_path / "fake" / "llama_cpp_python-9.9.9.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: 9.9.9\n")
    # Ray's token authentication, on both sides (the default for `ray start` clusters since 2.59).
    auth = {"RAY_AUTH_MODE": "token"}
    drifted = {"PYTHONPATH": str(fake.parent), **auth}
    port = "6391"
    started = run(tmp_path, str(BIN / "ray"), "start", "--head", "--num-cpus", "1", "--port", port,
                  "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats", env=drifted)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        driver = clone(project, tmp_path / "driver")
        result = run(driver, str(BIN / "quantbuild"), "fanout", "--address", f"127.0.0.1:{port}", "--remote",
                     str(tmp_path / "remote"), env=auth)
        assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
        ours = [line for line in result.stderr.splitlines() if line.startswith("quantbuild:")]
        assert len(ours) == 1 and "differs from the driver's" in ours[0] and "llama_cpp_python" in ours[0]
        assert not (driver / "dvc.lock").exists() and not (driver / "artifacts" / "package").exists()
    finally:
        run(tmp_path, str(BIN / "ray"), "stop", "--force")


# An address nothing answers at is refused in seconds, in one line (Ray itself retries for
# minutes); ray:// (Ray Client, which quantbuild[ray] does not install) is refused outright.

def unused_port() -> int:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def test_an_address_nothing_listens_at_fails_in_one_line_within_seconds(tmp_path):
    (tmp_path / "params.yaml").write_text(committed("params.yaml"))
    address = f"127.0.0.1:{unused_port()}"
    started = time.monotonic()
    result = run(tmp_path, str(BIN / "quantbuild"), "fanout", "--address", address,
                 env={"QUANTBUILD_RAY_PROBE_TIMEOUT": "2"})
    assert time.monotonic() - started < 30  # the CLI's imports included; Ray alone would wait minutes
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"quantbuild: fanout: nothing answered at {address} within 2 s (connection refused): is the Ray head "
        f"running there (`ray start --head`)?"]
    assert not (tmp_path / "artifacts").exists()


def test_the_probe_waits_no_longer_than_its_timeout():
    """A listener whose queue is full drops new connections unanswered, as a firewall does."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = [socket.socket() for _ in range(3)]
        for client in waiting:
            client.setblocking(False)
            client.connect_ex(full.getsockname())
        time.sleep(0.2)
        address = "%s:%d" % full.getsockname()
        started = time.monotonic()
        with pytest.raises(ConfigError, match=re.escape(f"nothing answered at {address} within 0.5 s (no answer)")):
            probe(address, 0.5)
        assert time.monotonic() - started < 2
        for client in waiting:
            client.close()


def test_a_listening_address_passes_the_probe_in_every_form():
    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        port = head.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"localhost:{port}"):
            probe(address, 2.0)
    # a cluster Ray starts or finds itself: nothing to probe
    for address in (None, "auto", "local"):
        assert ray_endpoint(address) is None
        probe(address, 0.001)
    assert ray_endpoint("[::1]:6379") == ("::1", 6379) and ray_endpoint("ray://head:10001") == ("head", 10001)


@pytest.mark.parametrize("address,message", [
    ("ray://127.0.0.1:10001", "Ray Client (ray://) is not supported"),
    ("127.0.0.1", "is not HOST:PORT"),
    ("head:port", "is not HOST:PORT"),
    ("head:6379/path", "is not HOST:PORT"),
])
def test_an_address_fanout_cannot_use_is_one_line_before_any_work(address, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        fanout(tmp_path, ["v"], address, 1, None, None, log=print)
    assert len(str(refused.value).splitlines()) == 1 and address in str(refused.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("raw", ["0", "-1", "soon", "inf"])
def test_a_probe_timeout_that_is_no_positive_number_is_refused(raw, monkeypatch):
    monkeypatch.setenv("QUANTBUILD_RAY_PROBE_TIMEOUT", raw)
    with pytest.raises(ConfigError, match=re.escape(f"QUANTBUILD_RAY_PROBE_TIMEOUT={raw} is not allowed")):
        probe_timeout()
    monkeypatch.setenv("QUANTBUILD_RAY_PROBE_TIMEOUT", "0.25")
    assert probe_timeout() == 0.25 and probe_timeout(3) == 3
    monkeypatch.delenv("QUANTBUILD_RAY_PROBE_TIMEOUT")
    assert probe_timeout() == 5.0
