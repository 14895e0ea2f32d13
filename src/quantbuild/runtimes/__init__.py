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


def require_target(runtime: str) -> None:
    """Fail in one line, before any work, when this machine cannot run `runtime`."""
    from quantbuild.errors import RuntimeUnavailable

    if runtime == LLAMA_CPP:
        from quantbuild.runtimes.llama_cpp import require_available

        require_available()
    elif runtime == TORCH:
        try:
            import torch  # noqa: F401
        except ImportError as err:
            raise RuntimeUnavailable(f"target torch: not available here ({err}; run `make install`)") from None
    else:
        raise RuntimeUnavailable(f"target {runtime!r}: unknown (known: {LLAMA_CPP}, {TORCH})")
