"""Write the committed data files: `data/eval/<family>.jsonl`,
`data/calibration/<source>.jsonl` and the example golden family `data/golden/support.jsonl`.

    python -m quantbuild.tasks.write_data --out data
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

from quantbuild.tasks import GENERATORS, calibration_sources
from quantbuild.tasks.items import write_items

# Each use of the generators draws at a seed of its own, so that nothing a method tunes on is
# what it is judged on: eval, calibration, the sensitivity stage's per-family probe items
# (the first of SENSITIVITY_ITEMS items: quantbuild.sensitivity) and those its plans are checked
# on (PLAN_CHECK_SEED), the golden example, and
# plan validation (quantbuild.plan_validation; the bench's test texts from 6001).
EVAL_SEED = 1001
CALIBRATION_SEED = 2001
SENSITIVITY_SEED = 3001
SENSITIVITY_ITEMS = 512
# The items a plan's stretches are checked on as whole plans (quantbuild.probes.check_sets):
# the planner decides on them, so they are tuning data too, held out from the table's own.
PLAN_CHECK_SEED = 3501
VALIDATION_SEED = 5001
EVAL_COUNTS = {"language_modelling": 300, "structured": 300, "retrieval": 300, "long_context": 300, "reasoning": 300}
CALIBRATION_COUNTS = {"workflow_prompts": 256, "tool_calls": 256, "long_context": 64, "domain_text": 128}
# The README's golden-prompt walkthrough gates on this file: requests a support desk sends
# (tool calls and cited answers), at a seed nothing else draws from (it was 3001, the
# sensitivity stage's: the planner tuned on the very items the example gated on).
GOLDEN_SEED = 4001
GOLDEN_COUNTS = {"structured": 40, "retrieval": 40}
GOLDEN_EXAMPLE = Path("golden") / "support.jsonl"


def golden_example() -> list:
    """The example golden family: items of the generated families that no eval file holds
    and the sensitivity stage never scores (the generators' space is finite: another seed
    can repeat a prompt), renamed `support-NNN`."""
    items = []
    for family, count in GOLDEN_COUNTS.items():
        held = {item.prompt for item in GENERATORS[family](EVAL_COUNTS[family], EVAL_SEED)}
        held |= {item.prompt for item in GENERATORS[family](SENSITIVITY_ITEMS, SENSITIVITY_SEED)}
        items += [item for item in GENERATORS[family](4 * count, GOLDEN_SEED) if item.prompt not in held][:count]
    return [replace(item, id=f"support-{index:03d}", family="golden") for index, item in enumerate(items)]


def write_all(out: Path) -> None:
    for family, generate in GENERATORS.items():
        write_items(out / "eval" / f"{family}.jsonl", generate(EVAL_COUNTS[family], EVAL_SEED))
    for source, count in CALIBRATION_COUNTS.items():
        records = calibration_sources.generate(source, count, CALIBRATION_SEED)
        path = out / "calibration" / f"{source}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    write_items(out / GOLDEN_EXAMPLE, golden_example())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"))
    write_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
