"""Stage evaluate@NAME: run the eval suites on the baseline or on one variant, on the
runtime the ladder deploys on (llama.cpp for GGUF variants, whose baseline is its GGUF).

    python -m stages.evaluate baseline
    python -m stages.evaluate VARIANT
"""

import sys
from pathlib import Path

from quantbuild.config import Config, ladder_runtime
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.evaluation.runner import REFERENCE, evaluate, evaluate_gguf
from quantbuild.fingerprint import cpu_info
from quantbuild.quantization import MODEL_DIR
from quantbuild.quantizers.gguf import BASE_FILE, MODEL_FILE
from quantbuild.runtimes import LLAMA_CPP
from quantbuild.runtimes.llama_cpp import repack_allowed
from quantbuild.stage import run_stage, say

BASELINE = "baseline"


def main(config: Config) -> None:
    name = sys.argv[1]
    paths = config.paths
    if name != BASELINE and name not in config.quant.variants:
        raise ConfigError(f"evaluate: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    reference = None if name == BASELINE else Path(paths.eval) / BASELINE / REFERENCE
    out = Path(paths.eval) / name
    make_deterministic(config.seed)
    if ladder_runtime(config) == LLAMA_CPP:
        if name == BASELINE:
            path, kv_type = Path(paths.gguf_base) / BASE_FILE, "f16"
        else:
            path, kv_type = Path(paths.quantized) / name / MODEL_DIR / MODEL_FILE, config.quant.variants[name].kv_cache_type
        base = Path(paths.gguf_base) / BASE_FILE
        metrics = evaluate_gguf(path, kv_type, config.eval, Path(paths.eval_data), out, reference,
                                repack_allowed(cpu_info()["isa"]), baseline=None if name == BASELINE else base)
    else:
        model_dir = Path(paths.baseline) if name == BASELINE else Path(paths.quantized) / name / MODEL_DIR
        metrics = evaluate(model_dir, config.eval, Path(paths.eval_data), out, reference,
                           baseline=None if name == BASELINE else Path(paths.baseline))
    scores = ", ".join(f"{family} {values['score']:.3f}" for family, values in sorted(metrics["families"].items()))
    say(f"{name} ({metrics['deploy_runtime']}): perplexity {metrics.get('perplexity', float('nan')):.4f}, {scores}")


if __name__ == "__main__":
    run_stage(main)
