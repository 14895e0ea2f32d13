"""Stage evaluate@NAME: run the eval suites on the baseline or on one variant, on the
runtime the ladder deploys on (llama.cpp for GGUF variants, whose baseline is its GGUF).

    python -m stages.evaluate baseline
    python -m stages.evaluate VARIANT
"""

import sys
from pathlib import Path

from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.evaluation.runner import evaluate_on_ladder
from quantbuild.quantization import MODEL_DIR
from quantbuild.stage import run_stage, say

BASELINE = "baseline"


def main(config: Config) -> None:
    name = sys.argv[1]
    paths = config.paths
    if name != BASELINE and name not in config.quant.variants:
        raise ConfigError(f"evaluate: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    make_deterministic(config.seed)
    model_dir = None if name == BASELINE else Path(paths.quantized) / name / MODEL_DIR
    kv_type = "f16" if name == BASELINE else getattr(config.quant.variants[name], "kv_cache_type", "f16")
    metrics = evaluate_on_ladder(config, model_dir, kv_type, Path(paths.eval) / name)
    scores = ", ".join(f"{family} {values['score']:.3f}" for family, values in sorted(metrics["families"].items()))
    say(f"{name} ({metrics['deploy_runtime']}): perplexity {metrics.get('perplexity', float('nan')):.4f}, {scores}")


if __name__ == "__main__":
    run_stage(main)
