"""Latency suite: time to first token and decode rate at several prompt lengths.

Each runtime times a KV-cached greedy run (prefill, then one token at a time) so the two
phases are timed separately; warm-up runs are discarded; p50/p95/p99 over the timed runs.
Latency is measured on the runtime the artifact deploys with (`eval.latency.runtime`).
"""

from __future__ import annotations

import random
from typing import Any

from quantbuild.evaluation.stats import median_interval, percentile


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


def paired_latency(model: Any, baseline: Any, config: Any) -> dict[str, Any]:
    """Variant/baseline ratios of TTFT and of decode time per token, timed interleaved in one
    process (the order alternating each round), per prompt length: the median of the
    per-round ratios and its distribution-free 95% interval. `model` and `baseline` are any
    runtimes (the `Runtime` protocol's `timed` and `n_vocab`).

    Each round times the variant and the baseline back to back, so load on the machine hits
    both sides of a ratio alike; across processes and minutes timings differ by up to 3x at
    p99 on this 2-core machine (bench/gguf_variants.py noise).
    """
    rng = random.Random(1)
    by_length: dict[str, Any] = {}
    worst = {"ratio": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    for length in config.latency.prompt_lengths:
        tokens = [rng.randrange(3, model.n_vocab) for _ in range(length)]
        for _ in range(config.latency.warmup):
            model.timed(tokens, config.latency.new_tokens)
            baseline.timed(tokens, config.latency.new_tokens)
        rounds = []
        for index in range(config.latency.repeats):
            order = [model, baseline] if index % 2 == 0 else [baseline, model]
            timed = {id(side): side.timed(tokens, config.latency.new_tokens) for side in order}
            rounds.append((timed[id(model)], timed[id(baseline)]))
        entry: dict[str, Any] = {"runs": config.latency.repeats}
        for key, label in (("ttft_s", "ttft"), ("decode_s_per_token", "decode")):
            ratios = [getattr(variant, key) / getattr(reference, key) for variant, reference in rounds]
            middle, low, high = median_interval(ratios)
            entry[label] = {"ratio": round(middle, 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}
            # The binding ratio is the one whose interval reaches highest.
            if (low, middle) > (worst["ci_low"], worst["ratio"]):
                worst = {"ratio": round(middle, 4), "ci_low": round(low, 4), "ci_high": round(high, 4),
                         "at": f"{label}@{length}"}
        by_length[str(length)] = entry
    return {"by_length": by_length, "worst": worst}
