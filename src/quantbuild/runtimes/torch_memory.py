"""Model memory on the torch runtime: by context length, and the memory cliff.

Model memory is what the model holds, not what the Python process holds: on a GPU the
allocator's peak (`torch.cuda.max_memory_allocated`) per length; on a CPU the bytes of
every weight and buffer tensor (each storage once) plus the KV cache the forward pass
actually returned (its tensors, at their dtype). KV bytes per token are measured from those
tensors, so variants of one architecture and KV dtype report the same number. The cliff is
the context length at which weights + KV cache cross `budget_mb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def kv_bytes_per_token(config: Any, bytes_per_value: int) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_value


def _tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind `tensors` (tied weights count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _kv_tensors(past: Any) -> list:
    """The key/value tensors of a transformers cache (DynamicCache or legacy tuples)."""
    import torch

    found = []

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for entry in value:
                walk(entry)

    layers = getattr(past, "layers", None)
    if layers is not None:
        for layer in layers:
            walk([getattr(layer, "keys", None), getattr(layer, "values", None)])
    else:
        walk(past.to_legacy_cache() if hasattr(past, "to_legacy_cache") else past)
    return found


def measure_memory(model: Any, context_lengths: list[int], budget_mb: float, artifact: Path, seed: int) -> dict:
    import torch

    device = next(model.parameters()).device
    weights = _tensor_bytes([*model.parameters(), *model.buffers()])
    generator = torch.Generator().manual_seed(seed)
    by_context, per_token = {}, 0.0
    for length in sorted(context_lengths):
        input_ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            out = model(input_ids=input_ids, use_cache=True)
        kv = sum(tensor.numel() * tensor.element_size() for tensor in _kv_tensors(out.past_key_values))
        per_token = kv / length
        total = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else weights + kv
        by_context[str(length)] = {"peak_mb": round(total / 2**20, 3), "weights_mb": round(weights / 2**20, 3),
                                   "kv_cache_mb": round(kv / 2**20, 3)}
        del out
    cliff = int((budget_mb * 2**20 - weights) // per_token) if per_token else None
    return {
        "device": device.type,
        "runtime": "torch",
        "measured": "allocator peak" if device.type == "cuda" else "weight and KV cache tensors",
        "artifact_mb": round(sum(path.stat().st_size for path in artifact.glob("*.safetensors")) / 2**20, 3),
        "kv_cache_bytes_per_token": round(per_token),
        "by_context": by_context,
        "budget_mb": budget_mb,
        "memory_cliff_tokens": max(0, cliff) if cliff is not None else None,
    }
