"""Calibration sources: text the quantizers see when they measure activations.

Four sources, one JSONL file each (`{id, source, text}` per line): workflow prompts (the
task families' prompts with their answers), tool-call patterns, long-context samples and
domain prose. Drawn from seeds disjoint from the eval seeds.
"""

import json
import random
from pathlib import Path

from quantbuild.errors import DataError
from quantbuild.tasks import long_context, prose, reasoning, retrieval, tools, training_text

SOURCES = ("workflow_prompts", "tool_calls", "long_context", "domain_text")


def _text(source: str, rng: random.Random, index: int) -> str:
    if source == "workflow_prompts":
        builder = (retrieval.make_item, reasoning.make_item, tools.make_item)[index % 3]
        return training_text(builder(rng, "calibration"))
    if source == "tool_calls":
        return training_text(tools.make_item(rng, "calibration"))
    if source == "long_context":
        tokens = rng.choice(sorted(long_context.WORDS_FOR_TOKENS))
        return training_text(long_context.make_item(rng, "calibration", tokens, rng.choice(long_context.DEPTHS)))
    return " ".join(prose.paragraph(rng) for _ in range(3))


def generate(source: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"calibration:{source}:{seed}")
    return [{"id": f"{source}-{seed}-{i:05d}", "source": source, "text": _text(source, rng, i)} for i in range(count)]


def load_source(path: Path) -> list[str]:
    """Texts of one calibration file; a missing, empty or malformed file is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: calibration source not found")
    from quantbuild.tasks.items import read_text_lines

    texts = []
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
            raise DataError(f"{path}:{number}: each line needs a non-empty string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise DataError(f"{path}: calibration source is empty")
    return texts
