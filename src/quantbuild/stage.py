"""The edge every stage runs behind: load and validate params.yaml, run, turn user errors
into one message and a non-zero exit (never a traceback for a problem in the input)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from quantbuild.config import Config, load_config
from quantbuild.errors import QuantbuildError


def run_stage(body: Callable[[Config], None], params: Path = Path("params.yaml")) -> None:
    try:
        body(load_config(params))
    except QuantbuildError as err:
        print(f"quantbuild: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
