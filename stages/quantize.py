"""Stage quantize@VARIANT: build one quantized variant of the baseline.

    python -m stages.quantize VARIANT
"""

import sys
from dataclasses import replace
from pathlib import Path

from quantbuild.calibration import RECORD as CALIBRATION_RECORD
from quantbuild.calibration import load_calibration
from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.fingerprint import scopes_of
from quantbuild.hashing import read_json, sha256_json
from quantbuild.release.manifest import SCHEMA
from quantbuild.quantization import build_variant
from quantbuild.quantizers import Inputs
from quantbuild.sensitivity import load_sensitivity
from quantbuild.sources import RECORD as FETCH_RECORD
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    name = sys.argv[1]
    if name not in config.quant.variants:
        raise ConfigError(f"quant.variants: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    make_deterministic(config.seed)
    paths = config.paths
    variant = config.quant.variants[name]
    inputs = Inputs(baseline=Path(paths.baseline), calibration=load_calibration(Path(paths.calibration)),
                    sensitivity=load_sensitivity(Path(paths.calibration)), gguf_base=Path(paths.gguf_base))
    if variant.method == "gguf":
        # What a lone .gguf carries of its lineage (the file travels without its bundle).
        fetched = read_json(Path(paths.baseline) / FETCH_RECORD)
        calibration = read_json(Path(paths.calibration) / CALIBRATION_RECORD)
        build_scope = read_json(Path(paths.fingerprint) / f"{scopes_of(variant.method)[0]}.json")
        inputs = replace(inputs, lineage={
            "baseline": {key: fetched.get(key) for key in ("name", "source", "location", "revision", "files")},
            "calibration": {key: calibration[key] for key in ("digest", "samples", "tokens", "seed", "composition")},
            "build_fingerprint_sha256": sha256_json(build_scope),
            "manifest_schema": SCHEMA,
        })
    record = build_variant(name, variant, inputs, Path(paths.quantized) / name)
    say(f"{name}: {record['method']} {record['bits_per_weight']} bits/weight, {record['size_bytes']} bytes, "
          f"{record['wall_seconds']} s")


if __name__ == "__main__":
    run_stage(main)
