"""The bundle manifest: a versioned record of every packaged file and the whole lineage.

Schema `quantbuild.release.manifest/v1`. Readers refuse other versions loudly rather than guess.
Paths inside a manifest are POSIX paths relative to the bundle; anything absolute, with
`..`, a backslash or a control character (NUL included), or resolving outside the bundle (a
symlink) is rejected, whoever reads the manifest (a bundle's verify, or a lone file's).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from quantbuild.errors import IntegrityError

SCHEMA = "quantbuild.release.manifest/v1"
MANIFEST = "manifest.json"


def check_name(name: str) -> PurePosixPath:
    """A manifest's file name as a relative POSIX path, or IntegrityError naming it: no
    control character, nothing absolute, no `..`, no backslash."""
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise IntegrityError(f"manifest path {name!r} holds a control character")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise IntegrityError(f"manifest path {name!r} escapes the bundle")
    return pure


def safe_relative(bundle: Path, name: str) -> Path:
    """`bundle / name`, refusing names that could point outside the bundle."""
    path = bundle / check_name(name)
    if path.is_symlink() or not path.resolve().is_relative_to(bundle.resolve()):
        raise IntegrityError(f"{name}: is a symlink or resolves outside the bundle")
    return path


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise IntegrityError(f"{MANIFEST}: duplicate key {duplicated[0]!r} (a manifest names each key once)")
    return dict(pairs)


def read_manifest(bundle: Path) -> dict[str, Any]:
    if not bundle.is_dir():
        raise IntegrityError(f"{bundle}: bundle folder not found")
    path = bundle / MANIFEST
    if path.is_symlink():
        raise IntegrityError(f"{path}: is a symlink (a manifest is a regular file inside its bundle)")
    if not path.is_file():
        raise IntegrityError(f"{bundle}: no {MANIFEST} (not a quantbuild bundle)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else None
        raise IntegrityError(f"{path}: unknown manifest schema {found!r} (this quantbuild reads {SCHEMA})")
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise IntegrityError(f"{path}: manifest lists no files")
    for name, entry in manifest["files"].items():
        check_name(name)
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)) \
                or not isinstance(entry.get("size"), int):
            raise IntegrityError(f"{path}: files.{name} must be {{\"sha256\": 64 hex digits, \"size\": an integer}}")
    for field, kind in (("signing", dict), ("fingerprints", dict), ("variant", dict), ("model", dict)):
        if field in manifest and not isinstance(manifest[field], kind):
            raise IntegrityError(f"{path}: {field} must be a JSON {kind.__name__.replace('dict', 'object')}")
    return manifest
