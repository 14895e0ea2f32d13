"""Stage select: the release gate. Writes decision.json; fails if nothing may be released.

    python -m stages.select
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.evaluation.runner import MEASUREMENTS, OUTCOMES
from quantbuild.gate import require_release, select
from quantbuild.hashing import read_json, write_json
from quantbuild.quantization import RECORD
from quantbuild.stage import run_stage, say


def _measured(folder: Path) -> dict:
    return {**read_json(folder / MEASUREMENTS), "outcomes": read_json(folder / OUTCOMES)}


def main(config: Config) -> None:
    paths = config.paths
    baseline = _measured(Path(paths.eval) / "baseline")
    names = sorted(config.quant.variants)
    variants = {name: _measured(Path(paths.eval) / name) for name in names}
    records = {name: read_json(Path(paths.quantized) / name / RECORD) for name in names}
    decision = select(baseline, variants, records, config.gate)
    write_json(Path(paths.release) / "decision.json", decision)
    chosen = require_release(decision)
    note = " (baseline precision: no quantized variant showed a win)" if decision["fell_back"] else ""
    say(f"release gate: chose {chosen}{note}")


if __name__ == "__main__":
    run_stage(main)
