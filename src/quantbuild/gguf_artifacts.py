"""The gguf_base and imatrix stages' outputs and a gguf variant's file: their names, and
their checked reading, in one place.

The stages that write them (gguf_base, imatrix), the method that reads them
(quantizers.gguf), the sensitivity stage and the evaluation all import them from here, so
none of them imports another for a file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from quantbuild.errors import ConfigError, IntegrityError

# In artifacts/gguf/ (the gguf_base stage): the baseline converted by llama.cpp's converter
# and the stage's record.
BASE_FILE = "base.gguf"
RECORD = "gguf_base_record.json"
# In artifacts/imatrix/ (the imatrix stage): the importance matrix of the calibration mix and
# its record. A stage of its own, so that a calibration change reruns the matrix and the
# variants that use it, never the baseline's conversion or its evaluation.
IMATRIX_FILE = "imatrix.gguf"
IMATRIX_RECORD = "imatrix_record.json"
# In a gguf variant's model/ folder.
MODEL_FILE = "model.gguf"


def _checked(path: Path, record_path: Path, digest: Optional[str], stage: str) -> Path:
    """`path`, when its bytes are the sha256 its stage recorded: a rotten file is never read
    (DVC does not re-hash an unchanged-looking one)."""
    from quantbuild.hashing import sha256_file

    if digest is None or sha256_file(path) != digest:
        raise IntegrityError(f"{path}: sha256 differs from {record_path.name} (rotten, or edited outside the pipeline): "
                             f"`quantbuild verify --workspace --repair`, or `dvc repro -f -s {stage}`")
    return path


def require_base(folder: Optional[Path]) -> Path:
    """The baseline GGUF: one line when the gguf_base stage has not written it, or when its
    bytes differ from the sha256 the stage recorded."""
    from quantbuild.hashing import read_json

    if folder is None or not (folder / BASE_FILE).is_file():
        raise ConfigError(f"gguf: no baseline GGUF at {folder}/{BASE_FILE} (the gguf_base stage writes it: "
                          f"run `dvc repro`)")
    if not (folder / RECORD).is_file():  # a folder made outside the stage: nothing recorded to compare
        return folder / BASE_FILE
    return _checked(folder / BASE_FILE, folder / RECORD, read_json(folder / RECORD).get("base_sha256"), "gguf_base")


def imatrix_record(folder: Optional[Path]) -> Optional[dict]:
    """What the imatrix stage recorded of its matrix (digest, tokens, chunks, composition),
    None where it computed none."""
    from quantbuild.hashing import read_json

    if folder is None or not (folder / IMATRIX_RECORD).is_file():
        return None
    return read_json(folder / IMATRIX_RECORD).get("imatrix")


def require_imatrix(folder: Optional[Path]) -> Path:
    """The importance matrix: one line when the imatrix stage has not written it (no gguf
    variant asked for it when it ran), or when its bytes differ from its record."""
    matrix = (folder or Path("?")) / IMATRIX_FILE
    if folder is None or not matrix.is_file():
        raise ConfigError(f"gguf: imatrix: true, but the imatrix stage wrote no {matrix} (run `dvc repro`)")
    if not (folder / IMATRIX_RECORD).is_file():
        return matrix
    return _checked(matrix, folder / IMATRIX_RECORD, (imatrix_record(folder) or {}).get("sha256"), "imatrix")
