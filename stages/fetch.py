"""Stage fetch: copy the pinned baseline into the artifacts, checking every file's sha256.

    python -m stages.fetch
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.sources import fetch
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    record = fetch(config.model, Path(config.paths.baseline))
    say(f"fetched {record['name']}: {len(record['files'])} files match their pins")


if __name__ == "__main__":
    run_stage(main)
