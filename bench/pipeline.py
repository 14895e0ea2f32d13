"""Pipeline overhead benchmarks (numbers for the closing note and bench/README.md).

    python bench/pipeline.py [--repeats 5]

1. fingerprint: wall time of the stage as DVC runs it (`python -m stages.fingerprint`), and
   of `fingerprints()` in process.
2. no-op `dvc repro`: the full pipeline when nothing changed (only `fingerprint` runs) vs a
   trivial one-stage DVC pipeline measured in the same run; the ratio is the overhead of
   quantbuild's pipeline shape. Builds the pipeline first if it is not up to date.
Prints medians; these machines are noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def timed(command: list[str], cwd: Path, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return times


def trivial_pipeline(folder: Path) -> None:
    for command in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(command, cwd=folder, env=ENV, check=True)
    (folder / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    (folder / "in.txt").write_text("x\n")
    subprocess.run([str(BIN / "dvc"), "repro"], cwd=folder, env=ENV, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    sys.path.insert(0, str(ROOT / "src"))
    from quantbuild.fingerprint import fingerprints

    in_process = []
    for _ in range(repeats):
        started = time.perf_counter()
        fingerprints()
        in_process.append(time.perf_counter() - started)
    stage = timed([sys.executable, "-m", "stages.fingerprint"], ROOT, repeats)
    subprocess.run([str(BIN / "dvc"), "repro"], cwd=ROOT, env=ENV, check=True, capture_output=True)
    full = timed([str(BIN / "dvc"), "repro"], ROOT, repeats)
    with tempfile.TemporaryDirectory() as scratch:
        trivial_pipeline(Path(scratch))
        trivial = timed([str(BIN / "dvc"), "repro"], Path(scratch), repeats)
    rows = [
        ("fingerprints() in process", statistics.median(in_process)),
        ("stage fingerprint (python -m)", statistics.median(stage)),
        ("no-op dvc repro, full pipeline", statistics.median(full)),
        ("no-op dvc repro, one-stage pipeline", statistics.median(trivial)),
    ]
    print(f"{'measurement':<40} {'median s':>9}   (n={repeats})")
    for name, value in rows:
        print(f"{name:<40} {value:9.3f}")
    print(f"{'ratio full / one-stage':<40} {rows[2][1] / rows[3][1]:9.2f}x")


if __name__ == "__main__":
    main()
