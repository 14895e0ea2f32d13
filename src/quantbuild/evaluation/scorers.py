"""Scorers turn one generated completion into named 0/1 outcomes for an item.

Each scorer returns a dict of outcomes; the first key is the item's headline score
("correct"), the others are the diagnostics a family reports (parse rate, citation, ...).
`failure` names why an incorrect answer is wrong, for the per-item outcomes.

Tool calls are parsed in the model's own syntax (`tool_call_format`, see
`quantbuild.tasks.tool_calls`): `wrapper` (the syntax's wrapper present and well formed),
`parsed` (a call came out), `valid` (it matches the item's schema), `correct` (every field).
"""

from __future__ import annotations

import re
from typing import Callable

from quantbuild.tasks import tool_calls
from quantbuild.tasks.items import Item

_CITATION = re.compile(r"\[(?P<citation>[^\]]+)\]")


def _normalise(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).lower()


def score_exact(item: Item, output: str) -> dict[str, float]:
    return {"correct": float(output.strip() == str(item.expected).strip())}


def score_contains(item: Item, output: str) -> dict[str, float]:
    return {"correct": float(str(item.expected) in output)}


def score_json_tool_call(item: Item, output: str, tool_call_format: str = tool_calls.RAW_JSON) -> dict[str, float]:
    """wrapper: the format's wrapper is well formed; parsed: a call came out; valid: it
    matches the item's schema; correct: every field equal."""
    import jsonschema

    parsed = tool_calls.parse(tool_call_format, output)
    if parsed.call is None:
        return {"correct": 0.0, "wrapper": float(parsed.wrapper), "parsed": 0.0, "valid": 0.0}
    valid = jsonschema.Draft202012Validator(item.schema or {}).is_valid(parsed.call)
    return {"correct": float(parsed.wrapper and valid and parsed.call == item.expected),
            "wrapper": float(parsed.wrapper), "parsed": 1.0, "valid": float(valid)}


def score_cited_answer(item: Item, output: str) -> dict[str, float]:
    """answer and citation are scored separately; correct needs both. The citation is the
    one bracketed id in the output (before or after the answer); the answer is the rest."""
    citations = _CITATION.findall(output)
    citation = citations[0].strip() if len(citations) == 1 else ""
    answer = _CITATION.sub(" ", output)
    answer_ok = _normalise(answer) == _normalise(item.expected["answer"])
    citation_ok = citation == item.expected["citation"]
    return {"correct": float(answer_ok and citation_ok), "answer": float(answer_ok), "citation": float(citation_ok)}


SCORERS: dict[str, Callable[..., dict[str, float]]] = {
    "exact": score_exact,
    "contains": score_contains,
    "json_tool_call": score_json_tool_call,
    "cited_answer": score_cited_answer,
}


def score(item: Item, output: str, tool_call_format: str = tool_calls.RAW_JSON) -> dict[str, float]:
    if item.scorer == "json_tool_call":
        return score_json_tool_call(item, output, tool_call_format)
    return SCORERS[item.scorer](item, output)


def failure(outcomes: dict[str, float]) -> str | None:
    """Why an answer with these outcomes is wrong: the first diagnostic it fails
    (`wrapper` before `parsed` before `valid` ...), `wrong` when only the headline does."""
    if outcomes["correct"] >= 1:
        return None
    failed = [key for key, value in outcomes.items() if key != "correct" and value < 1]
    return {"wrapper": "malformed_wrapper", "parsed": "unparsed", "valid": "invalid_arguments",
            "answer": "wrong_answer", "citation": "wrong_citation"}.get(failed[0], failed[0]) if failed else "wrong"
