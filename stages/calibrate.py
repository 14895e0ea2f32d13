"""Stage calibrate: compose the seeded calibration mix and store its token IDs and digest.
First, the baseline's prompt format is checked against the eval items: an instruct model's
template that does not render them stops the pipeline here, before any model work.

    python -m stages.calibrate
"""

from pathlib import Path

from quantbuild.calibration import compose_calibration
from quantbuild.config import Config
from quantbuild.evaluation.runner import load_eval_items
from quantbuild.prompts import check_baseline
from quantbuild.stage import run_stage, say


def main(config: Config) -> None:
    paths = config.paths
    items, _ = load_eval_items(config.eval, Path(paths.eval_data))
    generative = [item for family, found in items.items() if family != "language_modelling" for item in found]
    prompts = check_baseline(Path(paths.baseline), generative, config.model.tool_call_format)
    if prompts.chat:
        say(f"prompts: the chat template renders all {len(generative)} items; tool calls as {prompts.tool_call_format}")
    record = compose_calibration(config.calibration, Path(paths.calibration_data), Path(paths.baseline),
                                 Path(paths.calibration))
    say(f"calibration: {record['samples']} samples, {record['tokens']} tokens, digest {record['digest'][:12]}")


if __name__ == "__main__":
    run_stage(main)
