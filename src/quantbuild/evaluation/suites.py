"""The task-family suites: perplexity for language modelling, generate-and-score for the
generative families. Pure functions of (runtime, items); I/O lives in the stage."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from quantbuild.evaluation.scorers import score
from quantbuild.tasks.items import Item

# Greedy tokens each family's answer may take.
MAX_NEW_TOKENS = {"structured": 72, "retrieval": 20, "long_context": 8, "reasoning": 8, "golden": 64}


def perplexity(runtime: Any, texts: list[str]) -> dict[str, float]:
    """Token-weighted perplexity of `texts` (each starts with BOS, as in training)."""
    nll, count = 0.0, 0
    for logprobs, targets in runtime.text_positions(texts):
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count}


def run_generative(runtime: Any, items: list[Item]) -> list[dict[str, Any]]:
    """Greedy completions of every item on `runtime`, scored; one record per item, in order."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_family[item.family].append(index)
    records: list[dict[str, Any]] = [{} for _ in items]
    for family, indices in sorted(by_family.items()):
        prompts = [items[index].prompt for index in indices]
        outputs = runtime.complete(prompts, MAX_NEW_TOKENS.get(family, 64))
        for index, output in zip(indices, outputs):
            records[index] = {"id": items[index].id, "output": output, **score(items[index], output)}
    return records


def summarise(items: list[Item], records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean of every outcome per family, with the sample count."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    for item, record in zip(items, records):
        counts[item.family] += 1
        for key, value in record.items():
            if key not in ("id", "output"):
                totals[item.family][key] += value
    return {family: {"n": counts[family], **{k: v / counts[family] for k, v in sorted(totals[family].items())}}
            for family in sorted(totals)}
