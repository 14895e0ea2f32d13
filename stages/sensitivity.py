"""Stage sensitivity: per layer, the KL divergence at each candidate format of the ladder's
planned variants, on the calibration mix and per task family (src/quantbuild/sensitivity.py).

    python -m stages.sensitivity
"""

from pathlib import Path

from quantbuild.calibration import load_calibration
from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.sensitivity import write_sensitivity
from quantbuild.stage import progress, run_stage, say


def main(config: Config) -> None:
    make_deterministic(config.seed)
    paths = config.paths
    record = write_sensitivity(Path(paths.baseline), load_calibration(Path(paths.calibration)), config.quant.variants,
                               config.calibration.sensitivity, Path(paths.gguf_base), Path(paths.sensitivity),
                               log=progress, imatrix=Path(paths.imatrix))
    planned = sorted(name for name, entry in record["variants"].items() if entry["planned"])
    checked = [f"{name} {entry['check']['kept']} of {entry['check']['judged']}"
               for name, entry in sorted(record["variants"].items()) if entry.get("check")]
    say(f"sensitivity: {', '.join(planned) if planned else 'no planned variant'} (measured in {record['wall_seconds']} s)"
        + (f"; stretches kept by the whole plan's KL: {', '.join(checked)}" if checked else ""))


if __name__ == "__main__":
    run_stage(main)
