"""Digests and crash-safe writes.

Every artifact folder is written into a sibling temporary folder and renamed into place
only when complete, so a stage killed mid-run (even by SIGKILL) never leaves a folder that
looks finished: a later stage or `verify` sees either the old folder or none. A full disk
(or quota) on the way is one line naming the place, the space free and, where the writer
knows it, the space needed (`DiskFull`); the temporary folder goes, the old folder stays.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from quantbuild.errors import DiskFull

CHUNK = 1 << 20
# the errors of a write that found no room: the device is full, or the user's quota is
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the device holding `path` (or its nearest existing parent)."""
    for place in (path, *path.parents):
        if place.exists():
            return shutil.disk_usage(place).free
    return shutil.disk_usage(".").free


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def disk_full(path: Path, needed: Optional[int] = None) -> DiskFull:
    """The one line for a write to `path` that found no space (`needed` bytes, where known)."""
    wanted = f", about {_mib(needed)} needed" if needed else ""
    return DiskFull(f"{path}: no space left on its device ({_mib(free_bytes(path))} free{wanted}); free some "
                    f"space and rerun (earlier outputs are as they were)")


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in NO_SPACE


def require_space(folder: Path, needed: int) -> None:
    """DiskFull before a write of `needed` bytes into `folder` that cannot fit."""
    if free_bytes(folder) < needed:
        raise disk_full(folder, needed)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def copy_hashed(source: Path, target: Path) -> str:
    """Copy `source` to `target`, returning the sha256 of the bytes written: one read, and
    the digest is of the copy itself, not of a file that could change before it is copied."""
    digest = hashlib.sha256()
    with source.open("rb") as reading, target.open("wb") as writing:
        while block := reading.read(CHUNK):
            digest.update(block)
            writing.write(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(value: Any) -> str:
    """Digest of a JSON value in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(value, sort_keys=True, separators=(",", ":")).encode())


def digest_tree(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under `folder`, keyed by POSIX relative path, sorted."""
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically (temp file + rename) with sorted keys, for stable bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final`.

    On any exception the temporary folder is removed and `final` is left as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full(Path(err.filename) if getattr(err, "filename", None) else final) from None
        raise
    previous = final.with_name(f".{final.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)


def remove_staging_debris(root: Path) -> list[Path]:
    """Remove the `.NAME.partial` / `.NAME.previous` folders a killed stage left under `root`.

    DVC may restore a killed stage from its run-cache without running it, so debris is not
    left to the stage that made it: every stage clears it when it starts (DVC runs one stage
    of a repository at a time).
    """
    removed = []
    for pattern in (".*.partial", ".*.previous"):
        for path in sorted(root.rglob(pattern)) if root.is_dir() else []:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
