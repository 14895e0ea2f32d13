"""Fetch a baseline model from a pinned source and check every file against its pin.

Sources: `path` (a local folder) and `hf` (a Hub repo at a 40-hex commit, through
huggingface_hub; HF_HUB_OFFLINE is honoured by the library). The Hub does not verify
downloads by default, so every file's sha256 is compared with `model.files`. Pickle weights
are refused unless `model.allow_pickle` is set, and safetensors headers are parsed before
anything downstream loads them.
"""

from __future__ import annotations

from pathlib import Path

from quantbuild.config import ModelConfig
from quantbuild.errors import IntegrityError
from quantbuild.hashing import copy_hashed, staged_dir, write_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
RECORD = "fetch_record.json"


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except Exception as err:  # the library raises several types for a bad header
        raise IntegrityError(f"{path.name}: not a valid safetensors file ({err})") from None


def _check_config(path: Path) -> None:
    """A pinned config.json must be a JSON object naming its architecture: the stages after
    fetch load it, and a bad one must fail here, in one line, not later in a traceback."""
    import json

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path.name}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise IntegrityError(f"{path.name}: not a model config (expected a JSON object with a 'model_type' string)")


def _source_folder(model: ModelConfig) -> Path:
    if model.source == "path":
        folder = Path(model.path or "")
        if not folder.is_dir():
            raise IntegrityError(f"model.path {folder}: folder not found")
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model.repo_id, revision=model.revision, allow_patterns=sorted(model.files)))
    except Exception as err:  # network, auth, offline mode: one line for the user
        raise IntegrityError(f"model {model.repo_id}@{model.revision}: download failed ({err})") from None


def fetch(model: ModelConfig, out: Path) -> dict:
    """Copy the pinned files of `model` into `out` after checking each one.

    Nothing is written to `out` unless every file passes: a mismatch leaves the previous
    baseline folder untouched.
    """
    for name in sorted(model.files):
        if name.endswith(PICKLE_SUFFIXES) and not model.allow_pickle:
            raise IntegrityError(
                f"{name}: pickle weights can run code on load and are refused (set model.allow_pickle: true to accept)"
            )
    folder = _source_folder(model)
    for name in sorted(model.files):
        if not (folder / name).is_file():
            raise IntegrityError(f"{name}: pinned file missing from the source {folder}")
    record = {
        "name": model.name,
        "source": model.source,
        "location": model.path if model.source == "path" else model.repo_id,
        "revision": model.revision,
        "files": dict(sorted(model.files.items())),
    }
    with staged_dir(out) as staging:
        # each file is checked as copied (one read of an 8B model's 16 GB, and the bytes
        # checked are the bytes kept); a failure removes the staging folder, not `out`
        for name, expected in sorted(model.files.items()):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            actual = copy_hashed(folder / name, target)
            if actual != expected:
                raise IntegrityError(f"{name}: sha256 mismatch (expected {expected}, got {actual})")
            if name.endswith(".safetensors"):
                _check_safetensors(target)
            if name == "config.json":
                _check_config(target)
        write_json(staging / RECORD, record)
    return record
