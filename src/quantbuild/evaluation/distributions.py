"""Compact reference distributions and KL divergence against them.

Full logits are vocabulary x positions floats (tens of GB for a real model, as llama.cpp's
KL file shows). We keep, per position, the baseline's top-k token IDs and log-probabilities;
the rest of the mass is one bucket. KL(P_base || Q_variant) over those k+1 outcomes is a
lower bound of the full KL (coarsening never increases divergence) and tight when the top-k
holds most of the mass, which k=32 does for small-vocabulary models.

Everything here is numpy, as the runtime protocol's log-probabilities are: a llama.cpp
evaluation never loads torch (on a CUDA machine llama.cpp's CUDA build and torch's crash
in one process; bench/README.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from quantbuild.evaluation.stats import percentile


def largest(logprobs: Any, k: int) -> tuple[Any, Any]:
    """(indices int32, values) of each row's k largest entries, largest first, equal values
    in index order."""
    import numpy as np

    k = min(k, logprobs.shape[-1])
    part = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
    part.sort(axis=-1)
    values = np.take_along_axis(logprobs, part, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1).astype(np.int32), np.take_along_axis(values, order, -1)


def log_softmax(logits: Any) -> Any:
    """Row-wise log-softmax of float logits, as float32: the exponentials in float32, their sum,
    its log and the subtraction in float64, so each row's normaliser is as exact as a float64
    pass makes it. A float64 pass throughout (as before) took 1.5-2.5x as long on this CPU:
    2.3 s per 1,024 positions of a 128k vocabulary against 0.9, and the mean KL divergence of
    two nearby distributions is the same to eight digits (`bench/log_softmax.py`)."""
    import numpy as np

    shifted = np.asarray(logits, dtype=np.float32)
    shifted = shifted - shifted.max(axis=-1, keepdims=True)
    normaliser = np.log(np.exp(shifted).sum(axis=-1, keepdims=True, dtype=np.float64))
    return (shifted - normaliser).astype(np.float32)


def target_logprobs(logprobs: Any, targets: Any) -> float:
    """The summed log-probability of each row's target token (float64)."""
    import numpy as np

    return float(np.take_along_axis(logprobs, targets[:, None], -1).sum(dtype=np.float64))


def reference_from(positions: Iterable[tuple[Any, Any]], top_k: int, full: bool = False) -> tuple[dict, dict]:
    """(arrays to store, metrics) over any runtime's (log-probabilities, targets) batches:
    per position the top-k log-probabilities, or with `full` the whole distribution
    (float16), and the perplexity."""
    import numpy as np

    ids, values, rows, nll, count = [], [], [], 0.0, 0
    for logprobs, targets in positions:
        if full:
            rows.append(logprobs.astype(np.float16))
        else:
            top_ids, top_values = largest(logprobs, top_k)
            ids.append(top_ids)
            values.append(top_values)
        nll -= target_logprobs(logprobs, targets)
        count += targets.size
    if full:
        arrays = {"logprobs": np.ascontiguousarray(np.concatenate(rows))}
    else:
        arrays = {"topk_ids": np.ascontiguousarray(np.concatenate(ids)),
                  "topk_logprobs": np.ascontiguousarray(np.concatenate(values))}
    return arrays, {"perplexity": math.exp(nll / count), "tokens": count}


def _row_kld(stored: dict, rows: slice, logprobs: Any) -> tuple[Any, Any]:
    """(KL divergence per position, the reference's top-1 token) for the stored rows: exact
    against a whole stored distribution, else over the top-k plus one tail bucket."""
    import numpy as np

    if "logprobs" in stored:
        p_log = log_softmax(stored["logprobs"][rows].astype(np.float32))
        return np.maximum((np.exp(p_log) * (p_log - logprobs)).sum(-1), 0), p_log.argmax(-1)
    ref_ids, ref_logprobs = stored["topk_ids"][rows].astype(np.int64), stored["topk_logprobs"][rows].astype(np.float32)
    p_top = np.exp(ref_logprobs)
    q_top = np.take_along_axis(logprobs, ref_ids, -1)
    p_rest = np.maximum(1 - p_top.sum(-1), 1e-10)
    q_rest = np.maximum(1 - np.exp(q_top).sum(-1), 1e-10)
    kld = (p_top * (ref_logprobs - q_top)).sum(-1) + p_rest * (np.log(p_rest) - np.log(q_rest))
    return np.maximum(kld, 0), ref_ids[:, 0]


def compare_from(positions: Iterable[tuple[Any, Any]], stored: dict, per_batch: list | None = None) -> dict:
    """Perplexity, and KL divergence / top-1 agreement against a stored top-k or
    whole-distribution reference, over any runtime's (log-probabilities, targets) batches;
    each batch's per-position KLD is appended to `per_batch` when given."""
    size = stored["logprobs" if "logprobs" in stored else "topk_ids"].shape[0]
    klds, agree, nll, count, offset = [], 0, 0.0, 0, 0
    for logprobs, targets in positions:
        rows = slice(offset, offset + targets.size)
        offset += targets.size
        if offset > size:
            raise ValueError(f"reference has {size} positions, evaluation produced more")
        kld, top = _row_kld(stored, rows, logprobs)
        klds.extend(kld.tolist())
        if per_batch is not None:
            per_batch.append(kld)
        agree += int((logprobs.argmax(-1) == top).sum())
        nll -= target_logprobs(logprobs, targets)
        count += targets.size
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
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def load_reference(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))
