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

import math
from typing import Any, Callable, Iterator, Optional

from quantbuild.evaluation.distributions import compare_from, reference_from
from quantbuild.evaluation.stats import percentile

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
    import torch

    for chunk in pieces:
        first = len(chunk) // 2
        yield logprobs_of(chunk)[first:], torch.tensor(chunk[first + 1:], dtype=torch.long)


def reference(logprobs_of: Callable, pieces: list[list[int]], top_k: int, full: bool) -> tuple[dict, dict]:
    """(tensors to store, metrics) for the baseline: its distribution at every scored position."""
    if not full:
        tensors, metrics = reference_from(scored(logprobs_of, pieces), top_k)
    else:
        import torch

        rows, nll, count = [], 0.0, 0
        for logprobs, targets in scored(logprobs_of, pieces):
            rows.append(logprobs.to(torch.float16))
            nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
            count += targets.numel()
        tensors = {"logprobs": torch.cat(rows).contiguous()}
        metrics = {"perplexity": math.exp(nll / count), "tokens": count}
    return tensors, {**metrics, "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0, "chunks": len(pieces)}


def compare(logprobs_of: Callable, pieces: list[list[int]], stored: dict) -> dict:
    """Perplexity, KL divergence (mean, p99, by position) and top-1 agreement against the
    stored reference (exact where it holds whole distributions)."""
    if "logprobs" not in stored:
        metrics = compare_from(scored(logprobs_of, pieces), stored)
        return {**metrics, "chunks": len(pieces)}
    import torch

    reference_rows = stored["logprobs"]
    klds, by_bin, agree, nll, count, offset = [], {}, 0, 0.0, 0, 0
    for chunk, (logprobs, targets) in zip(pieces, scored(logprobs_of, pieces)):
        rows = slice(offset, offset + targets.numel())
        offset += targets.numel()
        if offset > reference_rows.shape[0]:
            raise ValueError(f"reference has {reference_rows.shape[0]} positions, evaluation produced more")
        p_log = torch.log_softmax(reference_rows[rows].float(), dim=-1)
        kld = (p_log.exp() * (p_log - logprobs)).sum(-1).clamp(min=0)
        klds.extend(kld.tolist())
        first, size = len(chunk) // 2, len(chunk)
        width = max(1, -(-(size - 1 - first) // BINS))
        for row, value in enumerate(kld.tolist()):
            start = first + (row // width) * width
            by_bin.setdefault(f"{start}-{min(start + width, size - 1) - 1}", []).append(value)
        agree += int((logprobs.argmax(-1) == p_log.argmax(-1)).sum().item())
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    if offset != reference_rows.shape[0]:
        raise ValueError(f"reference has {reference_rows.shape[0]} positions, evaluation produced {offset}")
    return {"perplexity": math.exp(nll / count), "tokens": count, "kld_mean": sum(klds) / len(klds),
            "kld_p99": percentile(klds, 99), "top1_agreement": agree / count, "chunks": len(pieces),
            "kld_by_position": {key: round(sum(values) / len(values), 8)
                                for key, values in sorted(by_bin.items(), key=lambda kv: int(kv[0].split("-")[0]))}}


def split(tensors: dict) -> tuple[dict, dict]:
    """(chunked reference, per-item reference) of a stored reference file."""
    items = {key[len("items_"):]: value for key, value in tensors.items() if key.startswith("items_")}
    chunked = {key: value for key, value in tensors.items() if not key.startswith("items_")}
    return chunked, items


def join(chunked: dict, items: Optional[dict]) -> dict:
    return {**chunked, **{f"items_{key}": value for key, value in (items or {}).items()}}


def with_items(metrics: dict, items: Optional[dict]) -> dict:
    """The chunked metrics, with the per-item figures beside them as items_*."""
    extra = {f"items_{key}": items[key] for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement", "tokens")
             if items and key in items}
    return {**metrics, **extra}
