"""Calibration sources: text the quantizers see when they measure activations.

Four sources, one JSONL file each (`{id, source, text, messages?, tools?}` per line):
workflow prompts (the task families' prompts with their answers), tool-call patterns,
long-context samples and domain prose. Drawn from seeds disjoint from the eval seeds. A
conversational record also carries the exchange as `messages` (the answer as the last,
assistant turn) and `tools`: for an instruct model the calibration stage renders those
through its chat template, as the model sees text in deployment.
"""

import json
import random
from pathlib import Path
from typing import Any

from quantbuild.errors import DataError
from quantbuild.tasks import long_context, prose, reasoning, retrieval, tools, training_text
from quantbuild.tasks.chat_forms import answer_message
from quantbuild.tasks.items import Item

SOURCES = ("workflow_prompts", "tool_calls", "long_context", "domain_text")


def _conversation(item: Item) -> dict:
    record: dict = {"text": training_text(item), "messages": [*item.messages, answer_message(item)]}
    if item.tools:
        record["tools"] = item.tools
    return record


def _record(source: str, rng: random.Random, index: int) -> dict:
    if source == "workflow_prompts":
        builder = (retrieval.make_item, reasoning.make_item, tools.make_item)[index % 3]
        return _conversation(builder(rng, "calibration"))
    if source == "tool_calls":
        return _conversation(tools.make_item(rng, "calibration"))
    if source == "long_context":
        tokens = rng.choice(sorted(long_context.WORDS_FOR_TOKENS))
        return _conversation(long_context.make_item(rng, "calibration", tokens, rng.choice(long_context.DEPTHS)))
    return {"text": " ".join(prose.paragraph(rng) for _ in range(3))}


def generate(source: str, count: int, seed: int) -> list[dict]:
    rng = random.Random(f"calibration:{source}:{seed}")
    return [{"id": f"{source}-{seed}-{i:05d}", "source": source, **_record(source, rng, i)} for i in range(count)]


def rendered(record: dict, template: Any) -> str:
    """A conversational record's exchange through an instruct model's chat template (a
    prompts.ChatTemplate), its answer the last turn."""
    return template.render(record["messages"], record.get("tools"), add_generation_prompt=False)


def load_source(path: Path) -> list[dict]:
    """Records of one calibration file ({text, messages?, tools?}); a missing, empty or
    malformed file is a DataError naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: calibration source not found")
    from quantbuild.tasks.items import read_text_lines

    records = []
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"]:
            raise DataError(f"{path}:{number}: each line needs a non-empty string field 'text'")
        messages = record.get("messages")
        if messages is not None and not (isinstance(messages, list) and messages and all(
                isinstance(message, dict) and isinstance(message.get("role"), str) for message in messages)):
            raise DataError(f"{path}:{number}: 'messages' must be a non-empty list of {{role, content}} objects")
        records.append({key: record[key] for key in ("text", "messages", "tools") if key in record})
    if not records:
        raise DataError(f"{path}: calibration source is empty")
    return records
