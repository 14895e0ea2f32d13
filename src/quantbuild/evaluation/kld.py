"""Language modelling as llama.cpp's `llama-perplexity --kl-divergence` measures it.

The held-out texts, in file order, joined by newlines and tokenized as one stream (BOS
first, as llama.cpp reads a file); cut into consecutive chunks of `eval.kl_context` tokens
whose first token is replaced by BOS; in each chunk the second half of the positions is
scored (every scored token has at least half a context of history). Perplexity, KL divergence to the baseline (mean, p99), top-1
agreement and the KL divergence by position in the chunk come from those positions, so the
numbers compare with llama.cpp's own tool and a long-context penalty is visible.

The reference keeps the baseline's whole distribution per scored position (float16) where
the vocabulary is at most `eval.kl_full_vocab` tokens, so the KL divergence is exact; above
that, the top-k log-probabilities plus the tail mass (a lower bound: on this model top-32
read 77-90% of the full value, top-512 90-98%).

The short per-item figures (each item on its own, from its first token) stay beside it as
`items_*`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from quantbuild.evaluation.distributions import compare_from, reference_from

BINS = 4


def chunks(stream: list[int], context: int, bos: Optional[int]) -> list[list[int]]:
    """llama-perplexity's chunks of the token stream (one shorter chunk when the stream is
    shorter than a context), BOS first."""
    size = min(context, len(stream))
    if size < 4:
        return []
    out = [list(stream[start:start + size]) for start in range(0, len(stream) - size + 1, size)]
    if bos is not None:
        for chunk in out:
            chunk[0] = bos
    return out


def scored(logprobs_of: Callable[[list[int]], Any], pieces: list[list[int]]) -> Iterator[tuple[Any, Any]]:
    """(log-probabilities [P, vocab], targets [P]) of each chunk's second half: the rows of
    positions first .. n-2, predicting tokens first+1 .. n-1, first = n // 2."""
    import numpy as np

    for chunk in pieces:
        first = len(chunk) // 2
        yield logprobs_of(chunk)[first:], np.asarray(chunk[first + 1:], dtype=np.int64)


def _reference(logprobs_of: Callable, pieces: list[list[int]], top_k: int, full: bool) -> tuple[dict, dict]:
    """(tensors to store, metrics) for the baseline: its distribution at every scored position."""
    tensors, metrics = reference_from(scored(logprobs_of, pieces), top_k, full)
    return tensors, {**metrics, "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0, "chunks": len(pieces)}


def _compare(logprobs_of: Callable, pieces: list[list[int]], stored: dict) -> dict:
    """Perplexity, KL divergence (mean, p99, by position in the chunk) and top-1 agreement
    against the stored reference."""
    per_chunk: list = []
    metrics = compare_from(scored(logprobs_of, pieces), stored, per_chunk)
    by_bin: dict[str, list[float]] = {}
    for chunk, kld in zip(pieces, per_chunk):
        first, size = len(chunk) // 2, len(chunk)
        width = max(1, -(-(size - 1 - first) // BINS))
        for row, value in enumerate(kld.tolist()):
            start = first + (row // width) * width
            by_bin.setdefault(f"{start}-{min(start + width, size - 1) - 1}", []).append(value)
    metrics["kld_by_position"] = {key: round(sum(values) / len(values), 8)
                                  for key, values in sorted(by_bin.items(), key=lambda kv: int(kv[0].split("-")[0]))}
    return {**metrics, "chunks": len(pieces)}


def measure(logprobs_of: Callable, pieces: list[list[int]], stored: Optional[dict], top_k: int, full: bool,
            items_reference: Callable[[], tuple[dict, dict]], items_compare: Callable[[dict], dict]
            ) -> tuple[Optional[dict], dict]:
    """(reference tensors for the baseline, else None; metrics) on any runtime: the chunked
    figures, and the per-item ones (`items_reference()` / `items_compare(stored)`, the
    runtime's own item scoring) beside them as items_*."""
    if stored is None:
        tensors, metrics = _reference(logprobs_of, pieces, top_k, full)
        item_tensors, items = items_reference()
        items.update({"kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0})
        return {**tensors, **{f"items_{key}": value for key, value in item_tensors.items()}}, _with_items(metrics, items)
    chunked = {key: value for key, value in stored.items() if not key.startswith("items_")}
    item_reference = {key[len("items_"):]: value for key, value in stored.items() if key.startswith("items_")}
    items = items_compare(item_reference) if item_reference else None
    return None, _with_items(_compare(logprobs_of, pieces, chunked), items)


def _with_items(metrics: dict, items: Optional[dict]) -> dict:
    """The chunked metrics, with the per-item figures beside them as items_*."""
    extra = {f"items_{key}": items[key] for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "tokens")
             if items and key in items}
    return {**metrics, **extra}
