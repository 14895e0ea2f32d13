"""Write the committed data files: `data/eval/<family>.jsonl` and
`data/calibration/<source>.jsonl`.

    python -m quantbuild.tasks.write_data --out data
"""

import argparse
import json
from pathlib import Path

from quantbuild.tasks import GENERATORS, calibration_sources
from quantbuild.tasks.items import write_items

EVAL_SEED = 1001
CALIBRATION_SEED = 2001
EVAL_COUNTS = {"language_modelling": 300, "structured": 300, "retrieval": 300, "long_context": 300, "reasoning": 300}
CALIBRATION_COUNTS = {"workflow_prompts": 256, "tool_calls": 256, "long_context": 64, "domain_text": 128}


def write_all(out: Path) -> None:
    for family, generate in GENERATORS.items():
        write_items(out / "eval" / f"{family}.jsonl", generate(EVAL_COUNTS[family], EVAL_SEED))
    for source, count in CALIBRATION_COUNTS.items():
        records = calibration_sources.generate(source, count, CALIBRATION_SEED)
        path = out / "calibration" / f"{source}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"))
    write_all(parser.parse_args().out)


if __name__ == "__main__":
    main()
