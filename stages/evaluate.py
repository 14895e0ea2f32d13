"""Stage evaluate@NAME-TARGET: run the eval suites on the baseline or on one variant, on one
deploy target of the run (the ladder's runtime on a device: llama.cpp on the CPU or on a
CUDA GPU for GGUF variants, whose baseline is its GGUF).

    python -m stages.evaluate baseline TARGET
    python -m stages.evaluate VARIANT TARGET
"""

import sys
from pathlib import Path

from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.evaluation.runner import evaluate_on_ladder, target_dir
from quantbuild.quantization import MODEL_DIR
from quantbuild.runtimes import ladder_runtime
from quantbuild.runtimes.protocol import LLAMA_CPP
from quantbuild.stage import progress, run_stage, say

BASELINE = "baseline"


def main(config: Config) -> None:
    if len(sys.argv) != 3:
        raise ConfigError("evaluate: usage: python -m stages.evaluate baseline|VARIANT TARGET")
    name, target = sys.argv[1:]
    paths = config.paths
    if name != BASELINE and name not in config.quant.variants:
        raise ConfigError(f"evaluate: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    if target not in config.eval.targets:
        raise ConfigError(f"evaluate: {target!r} is not a target of this run (eval.targets: "
                          f"{', '.join(config.eval.targets)})")
    llama = ladder_runtime(config) == LLAMA_CPP
    if llama:
        # llama.cpp's libraries before any other native library (numpy's, next line): the
        # stage as DVC ran it crashed on the H200 in model loading otherwise, as the same
        # stage with the bindings loaded first did not (bench/README.md, issue #26)
        from quantbuild.runtimes.llama_bindings import bindings

        bindings()
    make_deterministic(config.seed, torch=not llama)
    model_dir = None if name == BASELINE else Path(paths.quantized) / name / MODEL_DIR
    kv_type = "f16" if name == BASELINE else getattr(config.quant.variants[name], "kv_cache_type", "f16")
    metrics = evaluate_on_ladder(config, model_dir, kv_type, target_dir(config, target) / name, target, log=progress)
    stopped = metrics.get("sequential", {}).get("stopped", {})
    scores = ", ".join(f"{family} {values['score']:.3f}"
                       + (f" ({stopped[family]['items']} of {stopped[family]['of']}: decided)" if family in stopped else "")
                       for family, values in sorted(metrics["families"].items()))
    say(f"{name} on {target}: perplexity {metrics.get('perplexity', float('nan')):.4f}, {scores}")


if __name__ == "__main__":
    run_stage(main)
