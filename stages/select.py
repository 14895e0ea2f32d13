"""Stage select: the release gate over the ladder and the repair stage's kept builds.
Writes decision.json; fails if nothing may be released.

    python -m stages.select
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.gate import require_release, select
from quantbuild.hashing import read_json, write_json
from quantbuild.quantization import RECORD
from quantbuild.repair import REPAIR, locate, measured, repaired_variants
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths
    repair = read_json(Path(paths.repair) / REPAIR)
    names = sorted(config.quant.variants) + sorted(repaired_variants(repair))
    baseline = measured(Path(paths.eval) / "baseline")
    folders = {name: locate(paths, name) for name in names}
    variants = {name: measured(evaluated) for name, (_, evaluated) in folders.items()}
    records = {name: read_json(built / RECORD) for name, (built, _) in folders.items()}
    decision = select(baseline, variants, records, config.gate)
    decision["repair"] = repair
    write_json(Path(paths.release) / "decision.json", decision)
    chosen = require_release(decision)
    note = " (baseline precision: no quantized variant showed a win)" if decision["fell_back"] else ""
    say(f"release gate: chose {chosen}{note}")


if __name__ == "__main__":
    run_stage(main)
