"""The task-family suites: perplexity for language modelling, generate-and-score for the
generative families. Pure functions of (model, tokenizer, items); I/O lives in the stage."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from quantbuild.evaluation.distributions import position_logprobs
from quantbuild.evaluation.generation import MAX_NEW_TOKENS, generate_greedy
from quantbuild.evaluation.scorers import score
from quantbuild.tasks.items import Item


def perplexity(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 16) -> dict[str, float]:
    """Token-weighted perplexity of `texts` (each starts with BOS, as in training)."""
    nll, count = 0.0, 0
    for logprobs, targets in position_logprobs(model, tokenizer, texts, batch_size):
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    return {"perplexity": math.exp(nll / count), "tokens": count}


def run_generative(model: Any, tokenizer: Any, items: list[Item], batch_size: int = 32) -> list[dict[str, Any]]:
    """Generate a completion for every item and score it; one record per item, in order."""
    by_family: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_family[item.family].append(index)
    records: list[dict[str, Any]] = [{} for _ in items]
    for family, indices in sorted(by_family.items()):
        prompts = [items[index].prompt for index in indices]
        outputs = generate_greedy(model, tokenizer, prompts, MAX_NEW_TOKENS.get(family, 64), batch_size)
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
