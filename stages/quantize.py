"""Stage quantize@VARIANT: build one quantized variant of the baseline.

    python -m stages.quantize VARIANT
"""

import sys
from pathlib import Path

from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.quantization import build_variant, pipeline_inputs
from quantbuild.quantizers import get_method
from quantbuild.runtimes.protocol import LLAMA_CPP
from quantbuild.sensitivity import load_sensitivity
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    name = sys.argv[1]
    if name not in config.quant.variants:
        raise ConfigError(f"quant.variants: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    paths = config.paths
    variant = config.quant.variants[name]
    # llama-quantize's variants compute nothing in torch: no deterministic kernels to set (the
    # first use_deterministic_algorithms imports torch's compiler stack, 1.2 s a stage)
    make_deterministic(config.seed, torch=get_method(variant.method).library != LLAMA_CPP)
    inputs = pipeline_inputs(config, variant, load_sensitivity(Path(paths.sensitivity), name))
    record = build_variant(name, variant, inputs, Path(paths.quantized) / name)
    say(f"{name}: {record['method']} {record['bits_per_weight']} bits/weight, {record['size_bytes']} bytes, "
        f"built in {record['wall_seconds']} s")
    if record.get("validation"):
        from quantbuild.plan_validation import describe

        say(f"{name}: {describe(record['validation'])}")


if __name__ == "__main__":
    run_stage(main)
