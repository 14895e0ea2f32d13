"""Compact reference distributions and KL divergence against them.

Full logits are vocabulary x positions floats (tens of GB for a real model, as llama.cpp's
KL file shows). We keep, per position, the baseline's top-k token IDs and log-probabilities;
the rest of the mass is one bucket. KL(P_base || Q_variant) over those k+1 outcomes is a
lower bound of the full KL (coarsening never increases divergence) and tight when the top-k
holds most of the mass, which k=32 does for small-vocabulary models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from quantbuild.evaluation.stats import percentile


def reference_from(positions: Iterable[tuple[Any, Any]], top_k: int, full: bool = False) -> tuple[dict, dict]:
    """(tensors to store, metrics) over any runtime's (log-probabilities, targets) batches:
    per position the top-k log-probabilities, or with `full` the whole distribution
    (float16), and the perplexity."""
    import torch

    ids, values, rows, nll, count = [], [], [], 0.0, 0
    for logprobs, targets in positions:
        if full:
            rows.append(logprobs.to(torch.float16))
        else:
            top = torch.topk(logprobs, top_k, dim=-1)
            ids.append(top.indices.to(torch.int32))
            values.append(top.values)
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    if full:
        tensors = {"logprobs": torch.cat(rows).contiguous()}
    else:
        tensors = {"topk_ids": torch.cat(ids).contiguous(), "topk_logprobs": torch.cat(values).contiguous()}
    return tensors, {"perplexity": math.exp(nll / count), "tokens": count}


def _row_kld(stored: dict, rows: slice, logprobs: Any) -> tuple[Any, Any]:
    """(KL divergence per position, the reference's top-1 token) for the stored rows: exact
    against a whole stored distribution, else over the top-k plus one tail bucket."""
    import torch

    if "logprobs" in stored:
        p_log = torch.log_softmax(stored["logprobs"][rows].float(), dim=-1)
        return (p_log.exp() * (p_log - logprobs)).sum(-1).clamp(min=0), p_log.argmax(-1)
    ref_ids, ref_logprobs = stored["topk_ids"][rows].long(), stored["topk_logprobs"][rows].float()
    p_top = ref_logprobs.exp()
    q_top = logprobs.gather(-1, ref_ids)
    p_rest = (1 - p_top.sum(-1)).clamp(min=1e-10)
    q_rest = (1 - q_top.exp().sum(-1)).clamp(min=1e-10)
    kld = (p_top * (ref_logprobs - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kld.clamp(min=0), ref_ids[:, 0]


def compare_from(positions: Iterable[tuple[Any, Any]], stored: dict, per_batch: list | None = None) -> dict:
    """Perplexity, and KL divergence / top-1 agreement against a stored top-k or
    whole-distribution reference, over any runtime's (log-probabilities, targets) batches;
    each batch's per-position KLD is appended to `per_batch` when given."""
    size = stored["logprobs" if "logprobs" in stored else "topk_ids"].shape[0]
    klds, agree, nll, count, offset = [], 0, 0.0, 0, 0
    for logprobs, targets in positions:
        rows = slice(offset, offset + targets.numel())
        offset += targets.numel()
        if offset > size:
            raise ValueError(f"reference has {size} positions, evaluation produced more")
        kld, top = _row_kld(stored, rows, logprobs)
        klds.extend(kld.tolist())
        if per_batch is not None:
            per_batch.append(kld)
        agree += int((logprobs.argmax(-1) == top).sum().item())
        nll -= logprobs.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
    if offset != size:
        raise ValueError(f"reference has {size} positions, evaluation produced {offset}")
    return {
        "perplexity": math.exp(nll / count),
        "tokens": count,
        "kld_mean": sum(klds) / len(klds),
        "kld_p99": percentile(klds, 99),
        "top1_agreement": agree / count,
    }


def save_reference(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def load_reference(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
