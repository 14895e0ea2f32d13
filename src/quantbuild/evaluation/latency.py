"""Latency suite: time to first token and decode rate at several prompt lengths.

A plain KV-cached greedy loop (prefill, then one token at a time) so the two phases are
timed separately; warm-up runs are discarded; p50/p95/p99 over the timed runs. Latency is
measured on the runtime the artifact deploys with (`eval.latency_runtime`).
"""

from __future__ import annotations

import random
import time
from types import SimpleNamespace
from typing import Any

from quantbuild.evaluation.stats import median_interval, percentile


def _one_run(model: Any, input_ids: Any, new_tokens: int) -> tuple[float, float]:
    """(seconds to first token, seconds per decoded token after it) for one greedy run."""
    import torch

    # CUDA kernels run asynchronously: the clock is read only once the device has finished.
    sync = torch.cuda.synchronize if input_ids.is_cuda else (lambda: None)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        out = model(input_ids=input_ids, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        first = time.perf_counter() - started
        past = out.past_key_values
        decode_started = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync()
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


class TorchTimer:
    """A torch model behind the `timed` interface of llama.cpp's model, so both runtimes
    time a variant interleaved with its baseline the same way."""

    def __init__(self, model: Any):
        self.model = model
        self.n_vocab = model.config.vocab_size

    def timed(self, tokens: list[int], new_tokens: int) -> Any:
        import torch

        device = next(self.model.parameters()).device
        first, per_token = _one_run(self.model, torch.tensor([tokens], device=device), new_tokens)
        return SimpleNamespace(ttft_s=first, decode_s_per_token=per_token)


def paired_latency(model: Any, baseline: Any, config: Any) -> dict[str, Any]:
    """Variant/baseline ratios of TTFT and of decode time per token, timed interleaved in one
    process (the order alternating each round), per prompt length: the median of the
    per-round ratios and its distribution-free 95% interval. `model` and `baseline` are any
    runtime's models with `timed(tokens, new_tokens)` and `n_vocab` (llama.cpp's, `TorchTimer`).

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
