"""Building with GPTQModel: quantize the baseline with a GPTQModel config and save the
checkpoint. Loading and running what it builds is the torch runtime's
(runtimes.gptqmodel_loader)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

# Files GPTQModel writes that carry timings, not weights: kept out of the artifact so the
# same inputs give the same artifact hashes.
NONDETERMINISTIC_FILES = ("quant_log.csv",)


def quantize_and_save(baseline: Path, quantize_config: Any, calibration: list[list[int]] | None, out: Path,
                      backend: str = "auto") -> dict:
    """Quantize `baseline` with a GPTQModel config and save the checkpoint its config names.

    `backend` picks the packing kernel (GPTQModel's BACKEND value); "auto" lets it choose.
    """
    ensure_cpu_workers()
    import torch
    from gptqmodel import GPTQModel
    from gptqmodel.utils.backend import BACKEND
    from transformers import AutoTokenizer

    from quantbuild.quantizers.base import measurements

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(baseline))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPTQModel.load(str(baseline), quantize_config, device=device)
    dataset = None
    if calibration is not None:
        dataset = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calibration]
    model.quantize(dataset, batch_size=1, tokenizer=tokenizer, backend=BACKEND(backend))
    model.save(str(out))
    for name in NONDETERMINISTIC_FILES:
        (out / name).unlink(missing_ok=True)
    return measurements(started)
