"""Memory suite: peak memory by context length (KV-cache growth) and the memory cliff.

On a GPU the peak is `torch.cuda.max_memory_allocated` per length. On a CPU it is the
process's peak resident set (lengths run in increasing order, so each peak is that
length's). The KV cache per token is computed from the model config; the cliff is the
context length at which weights + KV cache would exceed `budget_mb`.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any


def kv_bytes_per_token(config: Any, bytes_per_value: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def measure_memory(model: Any, context_lengths: list[int], budget_mb: float, artifact: Path, seed: int) -> dict:
    import torch

    device = next(model.parameters()).device
    dtype_bytes = torch.finfo(next(model.parameters()).dtype).bits // 8
    weights = sum(path.stat().st_size for path in artifact.glob("*.safetensors"))
    per_token = kv_bytes_per_token(model.config, dtype_bytes)
    generator = torch.Generator().manual_seed(seed)
    peaks = {}
    for length in sorted(context_lengths):
        input_ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=True)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks[str(length)] = {"peak_mb": round(peak / 2**20, 2), "kv_cache_mb": round(per_token * length / 2**20, 3)}
    cliff = int((budget_mb * 2**20 - weights) // per_token) if per_token else None
    return {
        "device": device.type,
        "artifact_mb": round(weights / 2**20, 3),
        "kv_cache_bytes_per_token": per_token,
        "by_context": peaks,
        "budget_mb": budget_mb,
        "memory_cliff_tokens": max(0, cliff) if cliff is not None else None,
    }
