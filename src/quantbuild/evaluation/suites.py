"""The task-family suites: perplexity for language modelling, generate-and-score for the
generative families. Pure functions of (runtime, items); I/O lives in the stage."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any, Optional

from quantbuild.evaluation import degenerate
from quantbuild.evaluation.distributions import target_logprobs
from quantbuild.evaluation.scorers import failure, score
from quantbuild.evaluation.sequential import Sequential
from quantbuild.prompts import PromptFormat
from quantbuild.tasks.items import Item

# Greedy tokens each family's answer may take, its end of turn included (a tool call's
# wrapper in a chat model's syntax takes about ten of the structured family's).
MAX_NEW_TOKENS = {"structured": 96, "retrieval": 24, "long_context": 12, "reasoning": 12}
# a golden family (the user's own prompts, named by the user)
GOLDEN_NEW_TOKENS = 96
RAW = PromptFormat(None)


def perplexity(runtime: Any, texts: list[str]) -> dict[str, float]:
    """Token-weighted perplexity of `texts` (each starts with BOS, as in training)."""
    nll, count = 0.0, 0
    for logprobs, targets in runtime.text_positions(texts):
        nll -= target_logprobs(logprobs, targets)
        count += targets.size
    return {"perplexity": math.exp(nll / count), "tokens": count}


def run_generative(runtime: Any, items: list[Item], prompt_format: PromptFormat = RAW,
                   until: Optional[Sequential] = None) -> list[Optional[dict[str, Any]]]:
    """Greedy completions of every item on `runtime`, each prompt formed as the model is
    deployed (`prompt_format`), scored, and checked for degenerate output; one record per
    item, in order: its outcomes (`correct` first, 0/1 each, the degenerate kinds among
    them) and, where it is wrong or degenerate, why (`failure`, `degenerate`).

    `until`: a variant's families answered in steps, each stopping at the first look that
    decides the gate's verdict on it (quantbuild.evaluation.sequential); the items a family
    did not reach have no record (None)."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_family[item.family].append(index)
    records: list[Optional[dict[str, Any]]] = [None for _ in items]
    for family, indices in sorted(by_family.items()):
        done = 0
        for step in (until.steps(family, len(indices)) if until else [len(indices)]):
            _answer(runtime, items, indices[done:step], prompt_format, records)
            done = step
            if step < len(indices) and until.decide(
                    family, {items[index].id: records[index]["correct"] for index in indices[:step]}):
                break
    return records


def _answer(runtime: Any, items: list[Item], indices: list[int], prompt_format: PromptFormat,
            records: list[Optional[dict[str, Any]]]) -> None:
    """Complete, score and check the items at `indices` (one family), into `records`."""
    family = items[indices[0]].family
    prompts = [prompt_format.render(items[index]) for index in indices]
    outputs = runtime.complete(prompts, MAX_NEW_TOKENS.get(family, GOLDEN_NEW_TOKENS), special=prompt_format.chat)
    for index, prompt, output in zip(indices, prompts, outputs):
        item = items[index]
        outcomes = score(item, output.text, prompt_format.tool_call_format)
        found = degenerate.kinds(output.text, output.stopped, prompt + json.dumps(item.expected, ensure_ascii=False))
        record = {"id": item.id, "output": output.text, **outcomes,
                  **{kind: float(kind in found) for kind in degenerate.KINDS}}
        why = failure(outcomes)
        if why is not None:
            record["failure"] = why
        if found:
            record["degenerate"] = found
        records[index] = record


def summarise(items: list[Item], records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of every outcome per family, with the sample count."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for item, record in zip(items, records):
        counts[item.family] += 1
        for key, value in record.items():
            if key not in ("id", "output", "failure", "degenerate"):
                totals[item.family][key] += value
    return {family: {"n": counts[family], **{k: v / counts[family] for k, v in sorted(totals[family].items())}}
            for family in sorted(totals)}
