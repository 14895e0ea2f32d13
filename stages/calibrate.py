"""Stage calibrate: compose the seeded calibration mix and store its token IDs and digest.

    python -m stages.calibrate
"""

from pathlib import Path

from quantbuild.calibration import compose_calibration
from quantbuild.config import Config
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths
    record = compose_calibration(config.calibration, Path(paths.calibration_data), Path(paths.baseline),
                                 Path(paths.calibration))
    say(f"calibration: {record['samples']} samples, {record['tokens']} tokens, digest {record['digest'][:12]}")


if __name__ == "__main__":
    run_stage(main)
