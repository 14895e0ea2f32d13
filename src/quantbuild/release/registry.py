"""Releases through GTO (git tags), the audit of every release, and rollback.

A release is a git commit whose `dvc.lock` records the package stage's output; GTO tags
it with a semantic version (`<model>@vX.Y.Z`) and a stage assignment (`<model>#prod#N`).
The bytes live in the DVC cache and the DVC remote, addressed by the md5s in that
`dvc.lock`, so the audit reads each release's manifest from there and re-checks the
digests, and rollback restores a release by checking its `dvc.lock` out.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from quantbuild.errors import QuantbuildError
from quantbuild.release.manifest import MANIFEST, SCHEMA

PACKAGE_STAGE = "package"
SEMVER = re.compile(r"^v\d+\.\d+\.\d+$")


class ReleaseError(QuantbuildError):
    """A release, audit or rollback cannot proceed (dirty tree, unknown target, missing objects)."""


def git(repo: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ReleaseError(f"git {' '.join(args)}: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'failed'}")
    return result.stdout.strip()


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    import shutil
    import sys

    executable = shutil.which("dvc") or str(Path(sys.executable).parent / "dvc")
    return subprocess.run([executable, *args], cwd=repo, capture_output=True, text=True)


def require_clean(repo: Path, action: str) -> None:
    changed = git(repo, "status", "--porcelain", "--untracked-files=no")
    if changed:
        # `git` strips the output, so the first line may have lost its leading status blank.
        first = changed.splitlines()[0].split(maxsplit=1)[-1]
        raise ReleaseError(f"{action}: the working tree has uncommitted changes ({first}"
                           f"{' and more' if len(changed.splitlines()) > 1 else ''}); commit or stash them first")


# --- what a commit released ---------------------------------------------------------


def lock_at(repo: Path, commit: str) -> dict[str, Any]:
    text = git(repo, "show", f"{commit}:dvc.lock", check=False)
    return (yaml.safe_load(text) or {}) if text else {}


def package_out(lock: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The package stage's output entry (path, md5 of the .dir listing) in a dvc.lock."""
    outs = lock.get("stages", {}).get(PACKAGE_STAGE, {}).get("outs", [])
    return outs[0] if outs else None


@contextmanager
def repository_lock(repo: Path, action: str) -> Iterator[None]:
    """One command that rewrites artifacts or the registry at a time (release, rollback,
    audit --repair), and none while a `dvc` command holds DVC's own lock (a repro, checkout
    or gc): refused at once, in one line, with nothing changed."""
    import fcntl

    folder = repo / ".dvc" / "tmp"
    folder.mkdir(parents=True, exist_ok=True)
    dvc_lock = folder / "lock"
    if dvc_lock.exists():
        with dvc_lock.open("a") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            except OSError:
                raise ReleaseError(f"{action}: a dvc command (repro, checkout, gc) is running in this repository "
                                   f"(it holds {dvc_lock}); nothing was changed, try again when it ends") from None
    with (folder / "quantbuild.lock").open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ReleaseError(f"{action}: another quantbuild release, rollback or repair is running in this "
                               f"repository; nothing was changed") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _dvc_config(repo: Path) -> dict[str, Any]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read([repo / ".dvc" / "config", repo / ".dvc" / "config.local"])
    return {section: dict(parser[section]) for section in parser.sections()}


def object_stores(repo: Path) -> list[tuple[str, Path]]:
    """(label, root) of the local DVC cache and of the default remote where it is a folder."""
    config = _dvc_config(repo)
    cache = Path(config.get("cache", {}).get("dir", "cache")).expanduser()
    stores = [("cache", cache if cache.is_absolute() else (repo / ".dvc" / cache).resolve())]
    name = config.get("core", {}).get("remote")
    url = config.get(f"'remote \"{name}\"'", {}).get("url") if name else None
    if url and "://" not in url:
        root = Path(url).expanduser()
        stores.append((f"remote {name}", root if root.is_absolute() else (repo / ".dvc" / root).resolve()))
    return stores


@lru_cache(maxsize=4096)
def _digests(path: Path, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> tuple[str, str]:
    """(md5, sha256) of a file in one pass. Keyed by inode, size and both timestamps as well:
    any write changes the ctime, which nobody can set back, so a rewritten file is hashed
    again, while the audit, rollback and repair of one command read each object once."""
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def file_digests(path: Path) -> tuple[str, str]:
    """(md5, sha256) of a stored object."""
    stat = path.stat()
    return _digests(path, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _copies(repo: Path, md5: str) -> Iterator[tuple[str, Path, bool]]:
    for label, root in object_stores(repo):
        path = root / "files" / "md5" / md5[:2] / md5[2:]
        if path.is_file():
            yield label, path, file_digests(path)[0] == md5.removesuffix(".dir")


def object_copies(repo: Path, md5: str) -> list[tuple[str, Path, bool]]:
    """(store label, path, intact) of every copy of a DVC object: intact when its bytes still
    hash to the md5 it is stored under (DVC itself does not re-check: iterative/dvc#9641)."""
    return list(_copies(repo, md5))


def find_object(repo: Path, md5: str) -> Optional[Path]:
    """An intact copy of a DVC object (the cache first, then a folder remote), or None."""
    return next((path for _, path, intact in _copies(repo, md5) if intact), None)


def describe_missing(repo: Path, md5: str, name: str) -> str:
    """Why no intact copy of `md5` was found: corrupt where, or absent."""
    corrupt = [label for label, _, intact in object_copies(repo, md5) if not intact]
    if corrupt:
        return (f"{name}: the stored object {md5} is corrupted in the {' and the '.join(corrupt)} "
                f"(`quantbuild audit --repair` restores it from an intact copy)")
    return f"{name}: object {md5} is in neither the DVC cache nor the remote"


def repair(repo: Path, md5: str) -> Optional[str]:
    """Replace corrupt copies of `md5` with an intact one; what was done, or None."""
    copies = object_copies(repo, md5)
    good = next((path for _, path, intact in copies if intact), None)
    bad = [(label, path) for label, path, intact in copies if not intact]
    if not bad:
        return None
    if good is None:
        return f"{md5}: corrupted in the {', '.join(label for label, _ in bad)} and no intact copy anywhere"
    import os
    import shutil

    for _, path in bad:
        temporary = path.with_name(f".{path.name}.repair")
        shutil.copyfile(good, temporary)
        os.chmod(temporary, 0o444)
        os.replace(temporary, path)
    return f"{md5}: restored in the {', '.join(label for label, _ in bad)} from an intact copy"


def released_files(repo: Path, out: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """(relative path -> md5 of the package output's files, problems finding its listing)."""
    md5 = out.get("md5", "")
    listing = find_object(repo, md5) if md5.endswith(".dir") else None
    if listing is None:
        return {}, [describe_missing(repo, md5, f"{out.get('path')} listing")]
    try:
        return {entry["relpath"]: entry["md5"] for entry in json.loads(listing.read_text())}, []
    except (ValueError, KeyError, TypeError) as err:
        return {}, [f"{out.get('path')} listing {md5}: not a DVC listing ({err})"]


def read_released_manifest(repo: Path, out: dict[str, Any]) -> tuple[Optional[dict], list[str]]:
    """The manifest a release recorded, read from the cache/remote (an intact copy only), and
    every digest problem: objects missing or corrupted, manifest sha256s that do not match
    the stored files."""
    files, problems = released_files(repo, out)
    manifests = sorted(name for name in files if name.endswith(f"/{MANIFEST}"))
    if not manifests:
        return None, problems or [f"{out.get('path')}: no {MANIFEST} in the released output"]
    bundle_dir = manifests[0].rsplit("/", 1)[0]
    manifest_object = find_object(repo, files[manifests[0]])
    if manifest_object is None:
        return None, [describe_missing(repo, files[manifests[0]], manifests[0])]
    try:
        manifest = json.loads(manifest_object.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        return None, [f"{manifests[0]}: not a readable manifest ({err})"]
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return None, [f"{manifests[0]}: unknown manifest schema"]
    manifest["_sha256"] = file_digests(manifest_object)[1]
    for name, entry in sorted(manifest.get("files", {}).items()):
        md5 = files.get(f"{bundle_dir}/{name}")
        copies = object_copies(repo, md5) if md5 else []
        stored = next((path for _, path, intact in copies if intact), None)
        if stored is None:
            problems.append(describe_missing(repo, md5, name) if md5 else f"{name}: not in the DVC cache or remote")
            continue
        corrupt = [label for label, _, intact in copies if not intact]
        if corrupt:
            problems.append(f"{name}: the stored object {md5} is corrupted in the {' and the '.join(corrupt)} (an "
                            f"intact copy exists: `quantbuild audit --repair` restores it)")
        if file_digests(stored)[1] != entry["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest")
    return manifest, problems


def release_record(repo: Path, artifact: str, version: str) -> dict[str, Any]:
    """What `quantbuild release` wrote into the version's tag: the manifest's sha256 and
    whether the bundle was signed (empty for a release made without them)."""
    message = git(repo, "for-each-ref", f"refs/tags/{artifact}@{version}", "--format=%(contents)", check=False)
    record: dict[str, Any] = {}
    digest = re.search(r"manifest sha256 ([0-9a-f]{64})", message or "")
    if digest:
        record["manifest_sha256"] = digest.group(1)
    signed = re.search(r"\b(signed|unsigned)\b", message or "")
    if signed:
        record["signed"] = signed.group(1) == "signed"
    return record


# --- GTO -----------------------------------------------------------------------------


@dataclass
class Release:
    artifact: str
    version: str
    commit: str
    stages: list[str]


def releases(repo: Path) -> list[Release]:
    """Every registered version in the git history, oldest first, with its current stages."""
    from gto import api

    events = api.history(str(repo), ascending=True)
    found: dict[tuple[str, str], Release] = {}
    for event in events:
        key = (event["artifact"], event["version"])
        if event["event"] == "registration":
            found[key] = Release(event["artifact"], event["version"], event["commit"], [])
    # Which versions each stage points at now: one GTO query per (artifact, stage).
    stages = sorted(set(api.get_stages(str(repo), used=True) or []))
    for artifact in sorted({artifact for artifact, _ in found}):
        for stage in stages:
            current = api.find_versions_in_stage(str(repo), artifact, stage) or []
            for entry in current if isinstance(current, list) else [current]:
                release = found.get((artifact, getattr(entry, "version", None)))
                if release is not None:
                    release.stages.append(stage)
    return list(found.values())


def stage_history(repo: Path, artifact: str, stage: str) -> list[str]:
    """Versions assigned to `stage`, newest first (repeats removed)."""
    from gto import api

    # Assignment tags are `<artifact>#<stage>#N` with N counting up: order by N, not by
    # the tags' one-second timestamps.
    assignments = [event for event in api.history(str(repo), artifact=artifact)
                   if event["event"] == "assignment" and event["stage"] == stage]
    assignments.sort(key=lambda event: int(str(event["ref"]).rsplit("#", 1)[-1]), reverse=True)
    versions: list[str] = []
    for event in assignments:
        if event["version"] not in versions:
            versions.append(event["version"])
    return versions


def resolve(repo: Path, ref: str, artifact: str) -> tuple[str, str, Optional[tuple[str, str]]]:
    """(commit, description, (stage, version) when `ref` names a stage) for a GTO version
    (`v1.2.0`, `name@v1.2.0`), a stage (`prod`, `prod@previous`, `prod@~N`) or any git
    revision."""
    versions = {release.version: release for release in releases(repo) if release.artifact == artifact}
    name, _, version = ref.rpartition("@") if "@v" in ref else ("", "", ref)
    if SEMVER.match(version) and (not name or name == artifact):
        if version not in versions:
            raise ReleaseError(f"rollback target {ref!r}: {artifact} has no version {version} "
                               f"(registered: {', '.join(versions) or 'none'})")
        return versions[version].commit, f"{artifact}@{version}", None
    stage, _, back = ref.partition("@")
    steps = {"": 0, "current": 0, "previous": 1}.get(back, int(back[1:]) if re.fullmatch(r"~\d+", back) else -1)
    history = stage_history(repo, artifact, stage)
    if history and steps >= 0:
        if steps >= len(history):
            raise ReleaseError(f"rollback target {ref!r}: stage {stage} has only {len(history)} assignment(s) "
                               f"({', '.join(history)})")
        return versions[history[steps]].commit, f"{artifact}@{history[steps]} ({ref})", (stage, history[steps])
    commit = git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
    if not commit:
        raise ReleaseError(f"rollback target {ref!r} does not exist (not a version of {artifact}, "
                           f"a stage with assignments, or a git revision)")
    return commit, ref, None


def move_stage(repo: Path, artifact: str, stage: str, version: str) -> None:
    """Point `stage` back at `version`: assign it again, and unassign the versions the stage
    held (GTO tags, no commit), so GTO and `quantbuild audit` show `version` there."""
    from gto import api

    try:
        held = api.find_versions_in_stage(str(repo), artifact, stage) or []
        held = [getattr(entry, "version", entry) for entry in (held if isinstance(held, list) else [held])]
        api.assign(str(repo), artifact, stage, version=version, force=True,
                   message=f"rollback: {artifact} {version} -> {stage}")
        for other in held:
            if other != version:
                api.unassign(str(repo), artifact, version=other, stage=stage,
                             message=f"rollback: {artifact} {other} leaves {stage}")
    except Exception as err:  # GTO raises its own exception types for every refusal
        raise ReleaseError(f"gto: {str(err).splitlines()[0]}") from None


def register(repo: Path, artifact: str, version: Optional[str], stage: Optional[str], message: str) -> str:
    """Tag HEAD as a new version of `artifact` (and assign `stage`); returns the version."""
    from gto import api

    if version is not None and not SEMVER.match(version):
        raise ReleaseError(f"--version {version!r} is not allowed (allowed: vMAJOR.MINOR.PATCH, e.g. v1.0.0)")
    try:
        tag = api.register(str(repo), artifact, "HEAD", version=version, message=message)
        registered = tag.version if hasattr(tag, "version") else version
        if stage:
            api.assign(str(repo), artifact, stage, version=registered, message=f"{artifact} {registered} -> {stage}")
    except Exception as err:  # GTO raises its own exception types for every refusal
        raise ReleaseError(f"gto: {str(err).splitlines()[0]}") from None
    return registered
