"""Releases end to end: sign, release, audit, roll back and repair the cache, on a copy of
the session's built project (its own file, so it runs beside the other e2e files)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, BUNDLE, QUANTIZED, bundle_digests, commit_all, copy_project, dvc, quantbuild, run, stages_run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

@pytest.fixture(scope="module")
def repo(built_project, tmp_path_factory) -> Path:
    return copy_project(built_project, tmp_path_factory.mktemp("release") / "repo")


def test_signed_release_audit_and_rollback(repo):
    # r1: sign the bundle with a fresh key pair, commit, release v1.0.0 to prod.
    assert quantbuild(repo, "keygen", "--out", "keys").returncode == 0
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["package"] = {"signing_key": "keys/quantbuild-signing.key", "public_key": "keys/quantbuild-signing.pub"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(dvc(repo, "repro", check=True).stdout) == {"fingerprint", "package"}
    assert (repo / BUNDLE / "model.sig").is_file()
    assert quantbuild(repo, "verify", BUNDLE).returncode == 0  # public key from params.yaml
    # the report checks the signature now, with the same key, and says so
    quantbuild(repo, "report", "--out", str(repo.parent / "signed.html"), check=True)
    assert "signed, verifies</span> with keys/quantbuild-signing.pub" in (repo.parent / "signed.html").read_text()
    dirty = quantbuild(repo, "release", "--version", "v1.0.0")
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr
    commit_all(repo, "r1")
    released = quantbuild(repo, "release", "--version", "v1.0.0", check=True)
    assert "workflow-llama-8m@v1.0.0" in released.stdout
    tag = run(repo, "git", "for-each-ref", "refs/tags/workflow-llama-8m@v1.0.0", "--format=%(contents)").stdout
    assert "manifest sha256 " in tag and tag.strip().endswith("signed")
    r1 = json.loads((repo / BUNDLE / "manifest.json").read_text())
    r1_files = bundle_digests(repo)
    assert set(run(repo, "git", "tag").stdout.split()) == {"workflow-llama-8m@v1.0.0", "workflow-llama-8m#prod#1"}
    remote = repo.parent / "quantbuild-dvc-remote" / "files" / "md5"
    assert remote.is_dir() and any(remote.iterdir())

    # r2: another calibration seed gives another importance matrix, so other GGUF weights;
    # release v1.1.0, prod moves to it.
    params["calibration"]["seed"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "calibrate" in stages_run(dvc(repo, "repro", check=True).stdout)
    commit_all(repo, "r2")
    quantbuild(repo, "release", "--version", "v1.1.0", check=True)
    r2_files = bundle_digests(repo)
    assert r2_files["model.gguf"] != r1_files["model.gguf"]

    audit = json.loads(quantbuild(repo, "audit", "--json", check=True).stdout)
    assert [(row["version"], row["stages"], row["problems"], row["signed"]) for row in audit] == [
        ("v1.0.0", [], [], True), ("v1.1.0", ["prod"], [], True)]
    assert audit[0]["digests"]["model.gguf"] == r1_files["model.gguf"]
    assert audit[1]["commit"] == run(repo, "git", "rev-parse", "HEAD").stdout.strip()

    # Bad targets and a dirty tree change nothing.
    missing = quantbuild(repo, "rollback", "v9.9.9")
    assert missing.returncode == 1 and "has no version v9.9.9" in missing.stderr
    nowhere = quantbuild(repo, "rollback", "no-such-branch")
    assert nowhere.returncode == 1 and "does not exist" in nowhere.stderr
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n")
    refused = quantbuild(repo, "rollback", "prod@previous")
    assert refused.returncode == 1 and "uncommitted changes" in refused.stderr
    run(repo, "git", "checkout", "--", "params.yaml", check=True)
    assert bundle_digests(repo) == r2_files

    # Rollback to the previous prod version restores r1's bytes exactly, and verifies.
    rolled = quantbuild(repo, "rollback", "prod@previous")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "workflow-llama-8m@v1.0.0" in rolled.stdout and "model.gguf:" in rolled.stdout
    assert bundle_digests(repo) == r1_files
    assert {name: entry["sha256"] for name, entry in r1["files"].items()} == {
        name: digest for name, digest in r1_files.items() if name not in ("manifest.json", "model.sig")}
    assert yaml.safe_load((repo / "params.yaml").read_text())["calibration"]["seed"] != 7
    lineage = json.loads(quantbuild(repo, "lineage", BUNDLE, "--json").stdout)
    assert {link["link"]: link["status"] for link in lineage["children"]}["dvc.lock"] == "ok"
    assert "registry: prod now points at workflow-llama-8m@v1.0.0" in rolled.stdout
    commit_all(repo, "rollback to v1.0.0")
    # audit tells the truth: prod is the version rolled back to
    audit = json.loads(quantbuild(repo, "audit", "--json", check=True).stdout)
    assert [(row["version"], row["stages"]) for row in audit] == [("v1.0.0", ["prod"]), ("v1.1.0", [])]

    # A release whose stored bytes are damaged in the cache and gone from the remote is flagged.
    # (the bundle's signed copy of the weights: signing writes the signature into the GGUF)
    md5 = next(entry["md5"] for entry in yaml.safe_load(run(repo, "git", "show", "HEAD~1:dvc.lock").stdout)
               ["stages"]["package"]["outs"])
    listing = json.loads((repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).read_text())
    weights = next(entry["md5"] for entry in listing if entry["relpath"].endswith("model.gguf"))
    # A flipped byte in the cache copy (the remote's intact): flagged, then repaired from the remote.
    cached = repo / ".dvc" / "cache" / "files" / "md5" / weights[:2] / weights[2:]
    rotten = bytearray(cached.read_bytes())
    rotten[100] ^= 0xFF
    cached.chmod(0o644)
    cached.write_bytes(bytes(rotten))
    flagged = quantbuild(repo, "audit")
    assert flagged.returncode == 1 and "corrupted in the cache" in flagged.stdout, flagged.stdout
    repaired = quantbuild(repo, "audit", "--repair")
    assert repaired.returncode == 0 and "restored in the cache" in repaired.stderr, repaired.stdout + repaired.stderr
    for root in (repo / ".dvc" / "cache" / "files" / "md5", remote):
        (root / weights[:2] / weights[2:]).unlink(missing_ok=True)
    flagged = quantbuild(repo, "audit")
    assert flagged.returncode == 1 and "FLAGGED" in flagged.stdout and "model.gguf: object " in flagged.stdout and "is in neither the DVC cache nor the remote" in flagged.stdout


def test_rollback_ignores_lock_entries_of_variants_no_longer_in_the_pipeline(repo):
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    lock["stages"]["quantize@gone"] = {"cmd": "python -m stages.quantize gone", "outs": [
        {"path": "artifacts/quantized/gone", "hash": "md5", "md5": "0" * 32 + ".dir", "size": 1, "nfiles": 1}]}
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    commit_all(repo, "r3: a lock that still lists a variant removed from the ladder")
    quantbuild(repo, "release", "--version", "v1.2.0", "--no-push", check=True)
    rolled = quantbuild(repo, "rollback", "v1.2.0")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "verify" in rolled.stdout and ": ok" in rolled.stdout


QUANTIZED_FILE = f"artifacts/quantized/{QUANTIZED}/model/model.gguf"


def _flip_keeping_mtime(path: Path) -> None:
    """One byte changed, size and mtime as they were: what DVC does not re-check."""
    import os

    stat = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verify_workspace_names_rot_that_dvc_does_not_see_and_repairs_it(built_project, tmp_path):
    repo = copy_project(built_project, tmp_path / "repo")
    clean = quantbuild(repo, "verify", "--workspace")
    assert clean.returncode == 0 and "the workspace and the DVC cache match" in clean.stdout, clean.stderr
    weights = repo / QUANTIZED_FILE
    before = weights.read_bytes()
    _flip_keeping_mtime(weights)
    rotten = quantbuild(repo, "verify", "--workspace")
    assert rotten.returncode == 1, rotten.stdout
    lines = rotten.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"integrity: {QUANTIZED_FILE}: the workspace copy differs from dvc.lock")
    assert "--repair" in lines[0]
    repaired = quantbuild(repo, "verify", "--workspace", "--repair")
    assert repaired.returncode == 0 and f"repaired: {QUANTIZED_FILE}" in repaired.stdout, repaired.stderr
    assert weights.read_bytes() == before
    # the cache copy rotten too, and no remote holds another: rebuild, named with its stage
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    listing_md5 = next(out["md5"] for out in lock["stages"][f"quantize@{QUANTIZED}"]["outs"])
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    listing = json.loads((cache / listing_md5[:2] / listing_md5[2:]).read_text())
    md5 = next(entry["md5"] for entry in listing if entry["relpath"].endswith("model.gguf"))
    _flip_keeping_mtime(cache / md5[:2] / md5[2:])
    gone = quantbuild(repo, "verify", "--workspace")
    assert gone.returncode == 1 and "the stored object is corrupted in the cache" in gone.stderr
    assert f"rebuild it with `dvc repro --force quantize@{QUANTIZED}`" in gone.stderr


def test_rollback_to_a_release_made_before_signing_warns_and_verifies(built_project, tmp_path):
    repo = copy_project(built_project, tmp_path / "repo")
    commit_all(repo, "r0")
    quantbuild(repo, "release", "--version", "v0.9.0", check=True)
    unsigned = bundle_digests(repo)
    assert quantbuild(repo, "keygen", "--out", "keys").returncode == 0
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["package"] = {"signing_key": "keys/quantbuild-signing.key", "public_key": "keys/quantbuild-signing.pub"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", check=True)
    commit_all(repo, "r1 signed")
    quantbuild(repo, "release", "--version", "v1.0.0", check=True)
    # the public key comes from the params being rolled away from; the release is unsigned
    rolled = quantbuild(repo, "rollback", "v0.9.0")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert "warning: workflow-llama-8m@v0.9.0 was released unsigned" in rolled.stdout
    assert "INTEGRITY" not in rolled.stdout and bundle_digests(repo) == unsigned


def test_a_stage_refuses_a_rotten_input_before_reading_it(built_project, tmp_path):
    """DVC would hand a stage a rotten input whose size and mtime held: quantize and evaluate
    re-hash what they read against the records of the stages that wrote it."""
    repo = copy_project(built_project, tmp_path / "repo")

    def stage(*args: str) -> list[str]:
        result = subprocess.run([str(BIN / "python"), "-m", *args], cwd=repo, capture_output=True, text=True)
        assert result.returncode == 1, result.stderr[-2000:]
        return (result.stdout + result.stderr).strip().splitlines()

    base = repo / "artifacts" / "gguf" / "base.gguf"
    original = base.read_bytes()
    _flip_keeping_mtime(base)
    for args in (("stages.quantize", "gguf_q8_0"), ("stages.evaluate", "baseline", "llama.cpp-cpu")):
        lines = stage(*args)
        assert lines == [f"quantbuild: {base.relative_to(repo)}: sha256 differs from gguf_base_record.json (rotten, "
                         f"or edited outside the pipeline): `quantbuild verify --workspace --repair`, or "
                         f"`dvc repro -f -s gguf_base`"], (args, lines)
    base.write_bytes(original)
    _flip_keeping_mtime(repo / QUANTIZED_FILE)
    lines = stage("stages.evaluate", QUANTIZED, "llama.cpp-cpu")
    assert len(lines) == 1 and "model.gguf: sha256 differs from its quantize record" in lines[0], lines
