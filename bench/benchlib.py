"""What the bench scripts share: paths, a Markdown table, saving results as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT / "src"))


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    widths = [max(len(str(x)) for x in [h, *[r[i] for r in rows]]) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def save(name: str, results: Any) -> None:
    """bench/out/<name>.json (git-ignored): the raw numbers behind a printed table."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")


def stage_times(log: str) -> dict[str, float]:
    """Each stage's seconds as the stage itself printed them (`... [stage 12.3 s]`) in the
    output of a `dvc repro` that is not `--quiet` (its `Running stage 'NAME':` lines name them;
    a stage's later lines repeat its time so far, so the largest is its time)."""
    import re

    current, times = None, {}
    for line in log.splitlines():
        started = re.match(r"Running stage '([^']+)'", line)
        if started:
            current = started.group(1)
            continue
        took = re.search(r"\[stage ([\d.]+) s\]\s*$", line)
        if current and took:
            # a stage may print several lines, each with its time so far: the last is its time
            times[current] = max(times.get(current, 0.0), float(took.group(1)))
    return times
