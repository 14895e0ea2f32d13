"""Deploy runtimes: one adapter per runtime a variant ships for.

A variant's method decides its runtime (`runtime_of`): GGUF variants deploy on llama.cpp,
every other format on the torch stack (GPTQModel's kernels, bitsandbytes, transformers).
A ladder deploys on one runtime, and its baseline is measured on that runtime in the same
pipeline run (for llama.cpp: the baseline's own F16 GGUF), so a variant is never judged
against numbers from another runtime.
"""

from __future__ import annotations

LLAMA_CPP = "llama.cpp"
TORCH = "torch"


def runtime_of(method: str) -> str:
    return LLAMA_CPP if method == "gguf" else TORCH
