"""Stage fingerprint: write the build and runtime fingerprints (always runs; cheap).

    python -m stages.fingerprint
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.fingerprint import fingerprints
from quantbuild.hashing import write_json
from quantbuild.stage import run_stage


def main(config: Config) -> None:
    out = Path(config.paths.fingerprint)
    for scope, values in fingerprints().items():
        write_json(out / f"{scope}.json", values)


if __name__ == "__main__":
    run_stage(main)
