"""Every suite on llama.cpp, for a GGUF file: what a llama.cpp, Ollama or LM Studio user gets.

Language modelling scores llama.cpp's own log-probabilities against the reference stored
from the baseline's GGUF on the same runtime; the generative families are greedy
generations by llama.cpp's tokenizer and sampler-free argmax; latency is prefill and
decode timed in llama.cpp; memory is what llama.cpp allocates (weights, KV cache at the
variant's KV type, compute buffers) by context length, as its own log reports it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Optional

from quantbuild.config import EvalConfig
from quantbuild.evaluation import distributions, kld
from quantbuild.evaluation.generation import MAX_NEW_TOKENS
from quantbuild.evaluation.latency import paired_latency, summarise_runs
from quantbuild.evaluation.scorers import score
from quantbuild.tasks.items import Item


def threads(config: EvalConfig) -> int:
    return config.threads or os.cpu_count() or 1


def _context(model_tokens: list[int], config: EvalConfig) -> int:
    needed = max([*model_tokens, *(n + config.latency.new_tokens for n in config.latency.prompt_lengths)])
    return max(256, -(-needed // 256) * 256)


def measure(path: Path, kv_type: str, config: EvalConfig, items: dict[str, list[Item]],
            stored: Optional[dict], repack: bool, baseline: Optional[Path] = None) -> dict[str, Any]:
    """{"lm": metrics, "reference": tensors or None, "records": [...], "generative": [...],
    "latency": {...}, "latency_vs_baseline": {...} or None, "memory": {...}} for the GGUF
    file at `path`; with `baseline`, latency is also timed interleaved against it."""
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    workers = threads(config)
    lm_texts = [item.prompt for item in items.get("language_modelling", [])]
    generative = [item for family, family_items in items.items() if family != "language_modelling"
                  for item in family_items]
    with LlamaCppModel(path, n_ctx=256, kv_type=kv_type, threads=workers, repack=repack) as probe:
        lm_tokens = [probe.tokenize(text) for text in lm_texts]
        stream = probe.tokenize("\n".join(lm_texts), add_special=True) if lm_texts else []
        bos = next(iter(probe.tokenize("", add_special=True)), None)
        full = probe.n_vocab <= config.kl_full_vocab
        prompts = [probe.tokenize(item.prompt) for item in generative]
    pieces = kld.chunks(stream, config.kl_context, bos)
    lengths = [len(t) for t in [*lm_tokens, *pieces]] + [len(t) + MAX_NEW_TOKENS.get(i.family, 64)
                                                         for t, i in zip(prompts, generative)]
    result: dict[str, Any] = {"reference": None, "lm": None}
    with LlamaCppModel(path, n_ctx=_context(lengths, config), kv_type=kv_type, threads=workers,
                       repack=repack) as model:
        if pieces:
            result["reference"], result["lm"] = _language_modelling(model, lm_tokens, pieces, stored, full, config)
        records = []
        for item, tokens in zip(generative, prompts):
            output = model.detokenize(model.generate(tokens, MAX_NEW_TOKENS.get(item.family, 64)))
            records.append({"id": item.id, "output": output, **score(item, output)})
        result["generative"], result["records"] = generative, records
        result["latency"] = _latency(model, config)
        result["latency_vs_baseline"] = None
        if baseline is not None:
            with LlamaCppModel(baseline, n_ctx=model.n_ctx, kv_type="f16", threads=workers,
                               repack=repack) as reference:
                result["latency_vs_baseline"] = paired_latency(model, reference, config)
    result["memory"] = _memory(path, kv_type, config, workers, repack)
    result["threads"] = workers
    return result


def _language_modelling(model: Any, lm_tokens: list[list[int]], pieces: list[list[int]], stored: Optional[dict],
                        full: bool, config: EvalConfig) -> tuple[Optional[dict], dict]:
    """(reference tensors for the baseline or None, metrics): llama-perplexity's chunked
    figures, and the per-item ones as items_*."""
    import torch

    from quantbuild.runtimes.llama_cpp import positions

    return kld.measure(lambda chunk: torch.from_numpy(model.logprobs(chunk)), pieces, stored, config.kl_top_k, full,
                       lambda: distributions.reference_from(positions(model, lm_tokens), config.kl_top_k),
                       lambda reference: distributions.compare_from(positions(model, lm_tokens), reference))


def _latency(model: Any, config: EvalConfig) -> dict[str, dict[str, float]]:
    """Per prompt length: TTFT and decode percentiles over `repeats` timed runs after
    `warmup` discarded ones, on seeded random prompts."""
    rng = random.Random(0)
    results = {}
    for length in config.latency.prompt_lengths:
        tokens = [rng.randrange(3, model.n_vocab) for _ in range(length)]
        for _ in range(config.latency.warmup):
            model.timed(tokens, config.latency.new_tokens)
        runs = [model.timed(tokens, config.latency.new_tokens) for _ in range(config.latency.repeats)]
        results[str(length)] = summarise_runs([(run.ttft_s, run.decode_s_per_token) for run in runs])
    return results


def _memory(path: Path, kv_type: str, config: EvalConfig, workers: int, repack: bool) -> dict[str, Any]:
    """Model memory by context length as llama.cpp allocates it, KV bytes per token, and the
    memory cliff: the context where weights + KV + compute buffers cross the budget."""
    from quantbuild.runtimes.llama_cpp import memory_at

    by_context, per_token, fixed = {}, 0.0, 0.0
    for length in sorted(config.memory.context_lengths):
        buffers = memory_at(path, length, kv_type, workers, repack)
        total = sum(buffers.values())
        by_context[str(length)] = {"peak_mb": round(total, 3), "kv_cache_mb": buffers.get("kv_cache", 0.0),
                                   "weights_mb": buffers.get("weights", 0.0), "compute_mb": buffers.get("compute", 0.0),
                                   "output_mb": buffers.get("output", 0.0)}
        per_token = buffers.get("kv_cache", 0.0) * 2**20 / length
        fixed = total - buffers.get("kv_cache", 0.0)
    budget = config.memory.budget_mb
    cliff = int((budget - fixed) * 2**20 // per_token) if per_token else None
    return {
        "device": "cpu",
        "runtime": "llama.cpp",
        "kv_cache_type": kv_type,
        "artifact_mb": round(path.stat().st_size / 2**20, 3),
        "kv_cache_bytes_per_token": round(per_token),
        "by_context": by_context,
        "budget_mb": budget,
        "memory_cliff_tokens": max(0, cliff) if cliff is not None else None,
    }
