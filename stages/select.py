"""Stage select: the release gate over the ladder and the repair stage's kept builds, on
every deploy target of the run. Writes decision.json (one decision per target; the first
target's is its top level); fails if some target has nothing it may release.

    python -m stages.select
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.gate import released, require_release, select_targets
from quantbuild.hashing import read_json, write_json
from quantbuild.quantization import RECORD
from quantbuild.repair import REPAIR, locate, measured, repaired_variants
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths
    repair = read_json(Path(paths.repair) / REPAIR)
    names = sorted(config.quant.variants) + sorted(repaired_variants(repair))
    targets = config.eval.targets
    records = {name: read_json(locate(paths, name, targets[0])[0] / RECORD) for name in names}
    by_target = {target: (measured(locate(paths, "baseline", target)[1]),
                          {name: measured(locate(paths, name, target)[1]) for name in names})
                 for target in targets}
    decision = select_targets(by_target, records, config.gate)
    decision["repair"] = repair
    write_json(Path(paths.release) / "decision.json", decision)
    require_release(decision)
    lines = []
    for target, chosen in released(decision).items():
        fell_back = decision["targets"][target]["fell_back"]
        note = " (baseline precision: no quantized variant showed a win)" if fell_back else ""
        lines.append(f"{chosen} for {target}{note}")
    say("release gate: chose " + "; ".join(lines))


if __name__ == "__main__":
    run_stage(main)
