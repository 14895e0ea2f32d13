"""Scorers turn one generated completion into named 0/1 outcomes for an item.

Each scorer returns a dict of outcomes; the first key is the item's headline score
("correct"), the others are the diagnostics a family reports (parse rate, citation, ...).
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from quantbuild.tasks.items import Item

_CITATION = re.compile(r"\[(?P<citation>[^\]]+)\]")


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def score_exact(item: Item, output: str) -> dict[str, float]:
    return {"correct": float(output.strip() == str(item.expected).strip())}


def score_contains(item: Item, output: str) -> dict[str, float]:
    return {"correct": float(str(item.expected) in output)}


def score_json_tool_call(item: Item, output: str) -> dict[str, float]:
    """parsed: valid JSON; valid: matches the item's schema; correct: every field equal."""
    import jsonschema

    try:
        call: Any = json.loads(output.strip())
    except json.JSONDecodeError:
        return {"correct": 0.0, "parsed": 0.0, "valid": 0.0}
    valid = jsonschema.Draft202012Validator(item.schema or {}).is_valid(call)
    return {"correct": float(valid and call == item.expected), "parsed": 1.0, "valid": float(valid)}


def score_cited_answer(item: Item, output: str) -> dict[str, float]:
    """answer and citation are scored separately; correct needs both. The citation is the
    one bracketed id in the output (before or after the answer); the answer is the rest."""
    citations = _CITATION.findall(output)
    citation = citations[0].strip() if len(citations) == 1 else ""
    answer = _CITATION.sub(" ", output)
    answer_ok = _normalise(answer) == _normalise(item.expected["answer"])
    citation_ok = citation == item.expected["citation"]
    return {"correct": float(answer_ok and citation_ok), "answer": float(answer_ok), "citation": float(citation_ok)}


SCORERS: dict[str, Callable[[Item, str], dict[str, float]]] = {
    "exact": score_exact,
    "contains": score_contains,
    "json_tool_call": score_json_tool_call,
    "cited_answer": score_cited_answer,
}


def score(item: Item, output: str) -> dict[str, float]:
    return SCORERS[item.scorer](item, output)
