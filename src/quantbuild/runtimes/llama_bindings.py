"""llama.cpp's Python bindings, loaded once per process, with llama.cpp's log captured
(`LOG`) instead of printed.

Load them before gguf-py in a process that reads a GGUF file and then runs it
(`gguf_file.gguf_py` does): gguf-py imports sentencepiece, whose wheel carries its own GNU
OpenMP runtime, and llama.cpp's CUDA build loaded after it crashed in model loading on an
H200 (bench/README.md). This module imports nothing of quantbuild's runtimes, so the GGUF
reader and the llama.cpp runtime can both use it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

from quantbuild.errors import RuntimeUnavailable
from quantbuild.runtimes.llama_build import version

# every line llama.cpp logged in this process, in order (readers slice from a mark)
LOG: list[str] = []
_CALLBACK: list[Any] = []
# set (to anything) to see llama.cpp's log on stderr as well, e.g. the reason for an abort
ECHO = "QUANTBUILD_LLAMA_LOG"


def bindings() -> Any:
    """llama_cpp's low-level API, its backends initialised and its log going to `LOG`."""
    version()
    try:
        import llama_cpp
    except (ImportError, OSError) as err:
        raise RuntimeUnavailable(f"llama.cpp: the bindings do not load ({err}; run `make install`)") from None
    if not _CALLBACK:
        echo = bool(os.environ.get(ECHO))

        @llama_cpp.llama_log_callback
        def collect(level: int, text: bytes, user_data: Any) -> None:
            LOG.append(text.decode("utf-8", errors="replace"))
            if echo:  # (where llama.cpp aborts the process, its reason is only in its log)
                sys.stderr.write(LOG[-1])

        _CALLBACK.append(collect)  # alive as long as the process: llama.cpp calls it
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp
