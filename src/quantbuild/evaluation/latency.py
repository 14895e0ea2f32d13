"""Latency suite: time to first token and decode rate at several prompt lengths.

A plain KV-cached greedy loop (prefill, then one token at a time) so the two phases are
timed separately; warm-up runs are discarded; p50/p95/p99 over the timed runs. Latency is
measured on the runtime the artifact deploys with (`eval.latency_runtime`).
"""

from __future__ import annotations

import time
from typing import Any

from quantbuild.evaluation.stats import percentile


def _one_run(model: Any, input_ids: Any, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds per decoded token after it) for one greedy run."""
    import torch

    with torch.inference_mode():
        started = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        first = time.perf_counter() - started
        past = out.past_key_values
        decode_started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        per_token = (time.perf_counter() - decode_started) / max(1, new_tokens - 1)
    return first, per_token


def measure_latency(model: Any, vocab_size: int, prompt_lengths: list[int], new_tokens: int, warmup: int,
                    repeats: int, seed: int) -> dict[str, dict[str, float]]:
    """Per prompt length: TTFT and per-token decode time percentiles (ms), decode tokens/s."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    results = {}
    for length in prompt_lengths:
        input_ids = torch.randint(3, vocab_size, (1, length), generator=generator).to(device)
        for _ in range(warmup):
            _one_run(model, input_ids, new_tokens)
        results[str(length)] = summarise_runs([_one_run(model, input_ids, new_tokens) for _ in range(repeats)])
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
