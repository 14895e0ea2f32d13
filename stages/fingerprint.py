"""Stage fingerprint: write the build, runtime and llama.cpp fingerprints, and each method's
scopes under methods/ (always runs; cheap).

    python -m stages.fingerprint
"""

from pathlib import Path

from quantbuild.config import Config
from quantbuild.fingerprint import fingerprints, method_files, scopes_of
from quantbuild.hashing import write_json
from quantbuild.quantizers import method_names
from quantbuild.stage import run_stage


def main(config: Config) -> None:
    out = Path(config.paths.fingerprint)
    prints = fingerprints()
    for scope, values in prints.items():
        write_json(out / f"{scope}.json", values)
    for name, values in method_files(prints, method_names()).items():
        write_json(out / "methods" / name, values)
    # The baseline is measured on the ladder's runtime: its stage depends on that scope only.
    ladder_method = next(iter(config.quant.variants.values())).method
    write_json(out / "methods" / "baseline.runtime.json", prints[scopes_of(ladder_method)[1]])


if __name__ == "__main__":
    run_stage(main)
