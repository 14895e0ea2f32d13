"""The edge every stage runs behind: load and validate params.yaml, run, turn user errors
into one message and a non-zero exit (never a traceback for a problem in the input).

Libraries print banners, progress bars and warnings to stderr while they load (torchao's
optional kernels, torch's pytree notices, transformers' weight loading); a stage keeps
them in `logs/<stage>.log` so the terminal shows the one line each stage prints, and
errors. A real bug's traceback goes to both.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

from quantbuild.config import Config
from quantbuild.validation import load_config
from quantbuild.errors import QuantbuildError
from quantbuild.hashing import disk_full, is_disk_full, remove_staging_debris

LOGS = Path("logs")
_STARTED = [time.perf_counter()]
# the terminal's stderr while a stage runs (fd 2 goes to the stage's log): progress lines
_TERMINAL: list[TextIO] = []


def say(line: str) -> None:
    """The stage's one line on the terminal: what it produced, and the whole stage's time
    (loading libraries and checking inputs included), labelled."""
    print(f"{line}  [stage {time.perf_counter() - _STARTED[0]:.1f} s]", flush=True)


def progress(line: str) -> None:
    """A step of a long stage, on the terminal as it happens (and in the stage's log)."""
    stamp = f"  ... {line}  [{time.perf_counter() - _STARTED[0]:.0f} s]"
    print(stamp, file=sys.stderr, flush=True)
    if _TERMINAL:
        print(stamp, file=_TERMINAL[0], flush=True)


@contextmanager
def _stderr_to(log: Path) -> Iterator[TextIO]:
    """Point file descriptor 2 (Python and C alike) at `log`; yield the terminal's stderr."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with log.open("w", encoding="utf-8") as handle:
        os.dup2(handle.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def stage_name() -> str:
    module = Path(sys.argv[0]).stem
    return "@".join([module, *sys.argv[1:2]]) if len(sys.argv) > 1 else module


def run_stage(body: Callable[[Config], None], params: Path = Path("params.yaml")) -> None:
    log = LOGS / f"{stage_name()}.log"
    _STARTED[0] = time.perf_counter()
    with _stderr_to(log) as terminal:
        _TERMINAL[:] = [terminal]
        # a crash in native code (llama.cpp, torch) leaves the Python stack in the log
        faulthandler.enable()
        try:
            config = load_config(params)
            remove_staging_debris(Path(config.paths.artifacts))
            body(config)
        except QuantbuildError as err:
            print(f"quantbuild: {err}", file=terminal)
            code = err.exit_code
        except BaseException as err:
            if is_disk_full(err):  # a write outside the staged folders (they say so themselves)
                print(f"quantbuild: {disk_full(Path(getattr(err, 'filename', None) or '.'))}", file=terminal)
            else:
                details = traceback.format_exc()
                print(details, file=sys.stderr)
                print(f"{details}(library output: {log})", file=terminal)
            code = 1
        else:
            code = 0
        _TERMINAL.clear()
        terminal.close()
    if code:
        sys.exit(code)
