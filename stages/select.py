"""Stage select: the release gate. Writes decision.json; fails if no variant passes.

    python -m stages.select
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.evaluation.runner import METRICS
from quantbuild.gate import require_release, select
from quantbuild.hashing import read_json, write_json
from quantbuild.quantization import RECORD
from quantbuild.stage import run_stage


def main(config: Config) -> None:
    paths = config.paths

    baseline = read_json(Path(paths.eval) / "baseline" / METRICS)
    names = sorted(config.quant.variants)
    variants = {name: read_json(Path(paths.eval) / name / METRICS) for name in names}
    records = {name: read_json(Path(paths.quantized) / name / RECORD) for name in names}
    decision = select(baseline, variants, records, config.gate)
    write_json(Path(paths.release) / "decision.json", decision)
    print(f"release gate: chose {require_release(decision)}")


if __name__ == "__main__":
    run_stage(main)
