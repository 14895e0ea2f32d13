"""The bundle manifest: a versioned record of every packaged file and the whole lineage.

Schema `quantbuild.manifest/v1`. Readers refuse other versions loudly rather than guess.
Paths inside a manifest are POSIX paths relative to the bundle; anything absolute, with
`..`, or resolving outside the bundle (a symlink) is rejected.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from quantbuild.errors import IntegrityError

SCHEMA = "quantbuild.manifest/v1"
MANIFEST = "manifest.json"


def safe_relative(bundle: Path, name: str) -> Path:
    """`bundle / name`, refusing names that could point outside the bundle."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise IntegrityError(f"manifest path {name!r} escapes the bundle")
    path = bundle / pure
    if path.is_symlink() or not path.resolve().is_relative_to(bundle.resolve()):
        raise IntegrityError(f"{name}: is a symlink or resolves outside the bundle")
    return path


def read_manifest(bundle: Path) -> dict[str, Any]:
    if not bundle.is_dir():
        raise IntegrityError(f"{bundle}: bundle folder not found")
    path = bundle / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{bundle}: no {MANIFEST} (not a quantbuild bundle)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise IntegrityError(f"{path}: unknown manifest schema {found!r} (this quantbuild reads {SCHEMA})")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise IntegrityError(f"{path}: manifest lists no files")
    return manifest
