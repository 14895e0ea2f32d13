"""The gguf_base stage's outputs and a gguf variant's file: their names, in one place.

The stage that writes them (gguf_base), the method that reads them (quantizers.gguf), the
sensitivity stage and the evaluation all import the names from here, so none of them
imports another for a file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from quantbuild.errors import ConfigError

# In artifacts/gguf/: the baseline converted by llama.cpp's converter, the importance
# matrix, and the stage's record.
BASE_FILE = "base.gguf"
IMATRIX_FILE = "imatrix.gguf"
RECORD = "gguf_base_record.json"
# In a gguf variant's model/ folder.
MODEL_FILE = "model.gguf"


def require_base(folder: Optional[Path], imatrix: bool) -> tuple[Path, Optional[Path]]:
    """(the baseline GGUF, the importance matrix or None): one line when the stage has not
    written what is needed."""
    if folder is None or not (folder / BASE_FILE).is_file():
        raise ConfigError(f"gguf: no baseline GGUF at {folder}/{BASE_FILE} (the gguf_base stage writes it: "
                          f"run `dvc repro`)")
    matrix = folder / IMATRIX_FILE
    if imatrix and not matrix.is_file():
        raise ConfigError(f"gguf: imatrix: true, but the gguf_base stage wrote no {matrix}")
    return folder / BASE_FILE, (matrix if imatrix else None)
