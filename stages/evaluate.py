"""Stage evaluate@NAME: run the eval suites on the baseline or on one variant.

    python -m stages.evaluate baseline
    python -m stages.evaluate VARIANT
"""

import sys
from pathlib import Path

from quantbuild.config import Config
from quantbuild.determinism import make_deterministic
from quantbuild.errors import ConfigError
from quantbuild.evaluation.runner import REFERENCE, evaluate
from quantbuild.quantization import MODEL_DIR
from quantbuild.stage import run_stage

BASELINE = "baseline"


def main(config: Config) -> None:
    name = sys.argv[1]
    paths = config.paths
    if name == BASELINE:
        model_dir, reference = Path(paths.baseline), None
    elif name in config.quant.variants:
        model_dir, reference = Path(paths.quantized) / name / MODEL_DIR, Path(paths.eval) / BASELINE / REFERENCE
    else:
        raise ConfigError(f"evaluate: no variant {name!r} (defined: {', '.join(sorted(config.quant.variants))})")
    make_deterministic(config.seed)
    metrics = evaluate(model_dir, config.eval, Path(paths.eval_data), Path(paths.eval) / name, reference)
    scores = ", ".join(f"{family} {values['score']:.3f}" for family, values in sorted(metrics["families"].items()))
    print(f"{name}: perplexity {metrics.get('perplexity', float('nan')):.4f}, {scores}")


if __name__ == "__main__":
    run_stage(main)
