"""Latency suite: time to first token and decode rate at several prompt lengths.

Each runtime times a KV-cached greedy run (prefill, then one token at a time) so the two
phases are timed separately; warm-up runs are discarded; p50/p95/p99 over the timed runs.
Latency is measured on the runtime the artifact deploys with (`eval.latency.runtime`).

The gate's "not slower" is decided on variant/baseline ratios timed interleaved in one
process (`paired_latency`). Given the gate's bound (its limit plus noise margin), the
measurement goes on while a ratio's interval reaches both sides of it, up to
`eval.latency.max_rounds` rounds, and records whether it stopped decided: the gate then
releases on a verdict (pass, fail) and never on an interval too wide to give one.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterable, Optional

from quantbuild.evaluation.stats import median_interval, percentile

# The paired ratios: time to first token, and decode time per token.
RATIOS = (("ttft", "ttft_s"), ("decode", "decode_s_per_token"))
CONFIDENCE = 0.95


def measure_latency(runtime: Any, config: Any) -> dict[str, dict[str, float]]:
    """Per prompt length: TTFT and per-token decode time percentiles (ms) and decode tokens/s
    over `repeats` timed runs after `warmup` discarded ones, on seeded random prompts."""
    rng = random.Random(0)
    results = {}
    for length in config.latency.prompt_lengths:
        tokens = [rng.randrange(3, runtime.n_vocab) for _ in range(length)]
        for _ in range(config.latency.warmup):
            runtime.timed(tokens, config.latency.new_tokens)
        runs = [runtime.timed(tokens, config.latency.new_tokens) for _ in range(config.latency.repeats)]
        results[str(length)] = summarise_runs([(run.ttft_s, run.decode_s_per_token) for run in runs])
    return results


def summarise_runs(runs: list[tuple[float, float]]) -> dict[str, float]:
    """TTFT and per-token decode percentiles (ms) and decode tokens/s of (seconds, seconds) runs."""
    ttft = [first * 1000 for first, _ in runs]
    decode = [per_token * 1000 for _, per_token in runs]
    return {
        "runs": len(runs),
        **{f"ttft_ms_p{q}": round(percentile(ttft, q), 3) for q in (50, 95, 99)},
        **{f"decode_ms_per_token_p{q}": round(percentile(decode, q), 3) for q in (50, 95, 99)},
        "decode_tokens_per_s_p50": round(1000 / percentile(decode, 50), 2),
    }


def decision_bound(limit: Optional[float], margin: float) -> Optional[float]:
    """The ratio the gate decides "not slower" against: its limit plus the noise margin
    (None: the check is off)."""
    return None if limit is None else limit + margin


def verdict(low: float, high: float, bound: float) -> str:
    """`pass` when the interval lies at or below `bound`, `fail` when it lies wholly above
    it, `undecided` when it reaches both sides."""
    if high <= bound:
        return "pass"
    return "fail" if low > bound else "undecided"


def decided(intervals: Iterable[dict[str, float]], bound: float) -> bool:
    """Whether ratios decide against `bound` together: one lies wholly above it (the variant
    is slower there, whatever the others show), or all lie at or below it."""
    verdicts = [verdict(entry["ci_low"], entry["ci_high"], bound) for entry in intervals]
    return "fail" in verdicts or all(found == "pass" for found in verdicts)


def deciding_ratio(by_length: dict[str, dict[str, Any]], bound: float) -> dict[str, Any]:
    """The ratio that decides against `bound` (`at`: `decode@64`, with its interval and the
    rounds it was timed over): of those lying wholly above it, the one lying highest; else
    the one whose interval reaches highest. Its verdict is the verdict of all of them."""
    ratios = [{**entry[label], "at": f"{label}@{length}", "runs": entry["runs"]}
              for length, entry in by_length.items() for label, _ in RATIOS]
    above = [ratio for ratio in ratios if ratio["ci_low"] > bound]
    if above:
        return max(above, key=lambda ratio: (ratio["ci_low"], ratio["ratio"]))
    return max(ratios, key=lambda ratio: (ratio["ci_high"], ratio["ratio"]))


def ratio_intervals(rounds: list[tuple[Any, Any]], confidence: float) -> dict[str, dict[str, float]]:
    """Per ratio (ttft, decode): the median of the per-round variant/baseline ratios of
    `rounds` ((variant, baseline) timings) and its distribution-free interval, rounded as
    recorded (the stopping rule and the gate read the same numbers)."""
    intervals = {}
    for label, key in RATIOS:
        middle, low, high = median_interval([getattr(variant, key) / getattr(reference, key)
                                             for variant, reference in rounds], confidence)
        intervals[label] = {"ratio": round(middle, 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}
    return intervals


def confidence_per_look(bound: Optional[float], repeats: int, max_rounds: int) -> float:
    """The confidence of each interval the stopping rule looks at. Stopping as soon as an
    interval decides gives noise several chances to decide wrongly, so the 5% error is
    split over the looks the plan allows (Bonferroni): one look without a bound, else one
    after the first `repeats` rounds and one after each further batch of `repeats`."""
    looks = 1 if bound is None else 1 + max(0, math.ceil((max_rounds - repeats) / repeats))
    return 1 - (1 - CONFIDENCE) / looks


def timed_rounds(time_round: Callable[[int], tuple[Any, Any]], bound: Optional[float], repeats: int,
                 max_rounds: int) -> tuple[list[tuple[Any, Any]], dict[str, dict[str, float]]]:
    """(rounds, their ratio intervals at `confidence_per_look`) at one prompt length:
    `repeats` rounds of `time_round(index)` ((variant, baseline) timings), then, while the
    intervals do not decide against `bound`, `repeats` more, never past `max_rounds`.
    Without a bound, exactly `repeats`. The stopping rule reads only the intervals."""
    confidence = confidence_per_look(bound, repeats, max_rounds)
    rounds: list[tuple[Any, Any]] = []
    batch = repeats
    while batch > 0:
        for _ in range(batch):
            rounds.append(time_round(len(rounds)))
        intervals = ratio_intervals(rounds, confidence)
        settled = bound is None or decided(intervals.values(), bound)
        batch = 0 if settled else min(repeats, max_rounds - len(rounds))
    return rounds, intervals


def paired_latency(model: Any, baseline: Any, config: Any, bound: Optional[float] = None) -> dict[str, Any]:
    """Variant/baseline ratios of TTFT and of decode time per token, timed interleaved in one
    process (the order alternating each round), per prompt length: the median of the
    per-round ratios and its distribution-free interval. `model` and `baseline` are any
    runtimes (the `Runtime` protocol's `timed` and `n_vocab`).

    With `bound` (the gate's limit plus its noise margin: `decision_bound`), a prompt length
    whose ratios do not decide against it is timed for more rounds, up to
    `eval.latency.max_rounds`; each length records its rounds (`runs`) and whether it
    stopped `decided`. `worst` is the ratio that decides (`deciding_ratio`).

    Each round times the variant and the baseline back to back, so load on the machine hits
    both sides of a ratio alike; across processes and minutes timings differ by up to 3x at
    p99 on this 2-core machine (bench/gguf_variants.py noise).
    """
    latency = config.latency
    rng = random.Random(1)
    by_length: dict[str, Any] = {}
    for length in latency.prompt_lengths:
        tokens = [rng.randrange(3, model.n_vocab) for _ in range(length)]
        for _ in range(latency.warmup):
            model.timed(tokens, latency.new_tokens)
            baseline.timed(tokens, latency.new_tokens)

        def time_round(index: int) -> tuple[Any, Any]:
            order = [model, baseline] if index % 2 == 0 else [baseline, model]
            timed = {id(side): side.timed(tokens, latency.new_tokens) for side in order}
            return timed[id(model)], timed[id(baseline)]

        rounds, intervals = timed_rounds(time_round, bound, latency.repeats, latency.max_rounds)
        entry: dict[str, Any] = {"runs": len(rounds), **intervals}
        if bound is not None:
            entry["decided"] = decided(intervals.values(), bound)
        by_length[str(length)] = entry
    return {"by_length": by_length, "worst": deciding_ratio(by_length, math.inf if bound is None else bound),
            "bound": bound, "confidence": round(confidence_per_look(bound, latency.repeats, latency.max_rounds), 6),
            **({"max_rounds": latency.max_rounds} if bound is not None else {})}
