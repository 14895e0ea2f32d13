"""The gguf_base stage's outputs and a gguf variant's file: their names, in one place.

The stage that writes them (gguf_base), the method that reads them (quantizers.gguf), the
sensitivity stage and the evaluation all import the names from here, so none of them
imports another for a file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from quantbuild.errors import ConfigError, IntegrityError

# In artifacts/gguf/: the baseline converted by llama.cpp's converter, the importance
# matrix, and the stage's record.
BASE_FILE = "base.gguf"
IMATRIX_FILE = "imatrix.gguf"
RECORD = "gguf_base_record.json"
# In a gguf variant's model/ folder.
MODEL_FILE = "model.gguf"


def require_base(folder: Optional[Path], imatrix: bool) -> tuple[Path, Optional[Path]]:
    """(the baseline GGUF, the importance matrix or None): one line when the stage has not
    written what is needed, or when its bytes differ from the sha256s the stage recorded
    (a rotten file is never read: DVC does not re-hash an unchanged-looking one)."""
    from quantbuild.hashing import read_json, sha256_file

    if folder is None or not (folder / BASE_FILE).is_file():
        raise ConfigError(f"gguf: no baseline GGUF at {folder}/{BASE_FILE} (the gguf_base stage writes it: "
                          f"run `dvc repro`)")
    matrix = folder / IMATRIX_FILE
    if imatrix and not matrix.is_file():
        raise ConfigError(f"gguf: imatrix: true, but the gguf_base stage wrote no {matrix}")
    if not (folder / RECORD).is_file():  # a folder made outside the stage: nothing recorded to compare
        return folder / BASE_FILE, (matrix if imatrix else None)
    record = read_json(folder / RECORD)
    recorded = {folder / BASE_FILE: record.get("base_sha256")}
    if imatrix:
        recorded[matrix] = (record.get("imatrix") or {}).get("sha256")
    for path, digest in recorded.items():
        if digest is None or sha256_file(path) != digest:
            raise IntegrityError(f"{path}: sha256 differs from {RECORD} (rotten, or edited outside the pipeline): "
                                 f"`quantbuild verify --workspace --repair`, or `dvc repro -f -s gguf_base`")
    return folder / BASE_FILE, (matrix if imatrix else None)
