"""The release half never trusts the DVC cache blindly, records what it released, and runs
one command at a time: hermetic tests on a small git + DVC-layout repository."""

from __future__ import annotations

import fcntl
import hashlib
import subprocess

import pytest

from quantbuild.release.registry import (ReleaseError, describe_missing, find_object, object_copies, release_record,
                                         repair, repository_lock)
from quantbuild.release.releasing import record_problems, rollback


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text('[core]\n    remote = local\n[\'remote "local"\']\n    url = ../../remote\n')
    for command in (["git", "init", "-q"], ["git", "config", "user.name", "t"], ["git", "config", "user.email", "t@t"]):
        subprocess.run(command, cwd=repo, check=True)
    return repo


def _store(root, data: bytes) -> str:
    md5 = hashlib.md5(data).hexdigest()
    path = root / "files" / "md5" / md5[:2] / md5[2:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return md5


def test_a_rotten_cache_copy_is_never_used_and_repair_restores_it_from_the_remote(tmp_path):
    repo = _repo(tmp_path)
    cache, remote = repo / ".dvc" / "cache", tmp_path / "remote"
    md5 = _store(cache, b"weights")
    assert _store(remote, b"weights") == md5
    cached = cache / "files" / "md5" / md5[:2] / md5[2:]
    cached.write_bytes(b"weightz")  # a flipped byte; DVC's own status would still say clean
    assert [(label, intact) for label, _, intact in object_copies(repo, md5)] == [("cache", False),
                                                                                 ("remote local", True)]
    assert find_object(repo, md5) == remote / "files" / "md5" / md5[:2] / md5[2:]
    assert "restored in the cache" in repair(repo, md5)
    assert cached.read_bytes() == b"weights" and repair(repo, md5) is None


def test_an_object_rotten_everywhere_is_named_not_used(tmp_path):
    repo = _repo(tmp_path)
    md5 = _store(repo / ".dvc" / "cache", b"weights")
    (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).write_bytes(b"other")
    assert find_object(repo, md5) is None
    assert describe_missing(repo, md5, "model.gguf") .startswith(f"model.gguf: the stored object {md5} is corrupted "
                                                                 f"in the cache")
    assert "no intact copy" in repair(repo, md5)
    assert describe_missing(repo, "0" * 32, "x") == f"x: object {'0' * 32} is in neither the DVC cache nor the remote"


def test_the_release_record_binds_the_manifest_and_its_signing_state(tmp_path):
    repo = _repo(tmp_path)
    (repo / "f").write_text("x")
    subprocess.run(["git", "add", "f"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "r1"], cwd=repo, check=True)
    digest = "a" * 64
    subprocess.run(["git", "tag", "-a", "m@v1.0.0", "-m", f"m-v: gguf 3.5 bits/weight, manifest sha256 {digest}, signed"],
                   cwd=repo, check=True)
    record = release_record(repo, "m", "v1.0.0")
    assert record == {"manifest_sha256": digest, "signed": True}
    assert record_problems(record, {"_sha256": digest, "signing": {}}) == []
    # the signature and its record stripped, the digests updated: the release record still knows
    downgraded = record_problems(record, {"_sha256": "b" * 64})
    assert downgraded == ["manifest.json: not the manifest this version was released with (its sha256 differs from "
                          "the release record)", "manifest.json: released signed, now unsigned (signature downgrade)"]
    assert release_record(repo, "m", "v9.9.9") == {}


def test_one_release_command_at_a_time_and_none_during_a_dvc_run(tmp_path):
    repo = _repo(tmp_path)
    with repository_lock(repo, "release"):
        with pytest.raises(ReleaseError, match="another quantbuild release, rollback or repair is running"):
            with repository_lock(repo, "rollback"):
                pass
    dvc_lock = repo / ".dvc" / "tmp" / "lock"
    with dvc_lock.open("w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        before = sorted(path.name for path in repo.iterdir())
        with pytest.raises(ReleaseError) as refused:
            rollback(repo, "m", "v1.0.0", None)
        assert str(refused.value).startswith("rollback: a dvc command (repro, checkout, gc) is running")
        assert "\n" not in str(refused.value) and sorted(path.name for path in repo.iterdir()) == before
    with repository_lock(repo, "release"):
        pass  # free again
