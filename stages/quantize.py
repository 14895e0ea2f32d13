"""Stage quantize@VARIANT: build one quantized variant of the baseline.

    python -m stages.quantize VARIANT
"""

import sys
from pathlib import Path

from quantbuild.calibration import load_calibration
from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.quantization import build_variant
from quantbuild.quantizers import Inputs
from quantbuild.sensitivity import load_sensitivity
from quantbuild.stage import run_stage


def main(config: Config) -> None:
    name = sys.argv[1]
    if name not in config.quant.variants:
        raise ConfigError(f"quant.variants: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    make_deterministic(config.seed)
    paths = config.paths
    inputs = Inputs(baseline=Path(paths.baseline), calibration=load_calibration(Path(paths.calibration)),
                    sensitivity=load_sensitivity(Path(paths.calibration)))
    record = build_variant(name, config.quant.variants[name], inputs, Path(paths.quantized) / name)
    print(f"{name}: {record['method']} {record['bits_per_weight']} bits/weight, {record['size_bytes']} bytes, "
          f"{record['wall_seconds']} s")


if __name__ == "__main__":
    run_stage(main)
