"""Per-layer sensitivity: how far quantizing one layer alone moves the model's output.

For every decoder linear layer, its weight is replaced by its round-to-nearest
quantize-dequantize round trip (`bits`/`group_size` from `calibration.sensitivity`), the
calibration samples are run, and the mean per-token KL(P_baseline || P_perturbed) over the
full vocabulary is recorded; the weight is then restored. The mixed-precision method ranks
layers by this number. Runs in float32, on CPU or the first GPU, deterministically.

Memory: the baseline's log-probabilities are cached per sample (tokens x vocabulary
floats), so `samples` should stay small for large-vocabulary models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantbuild.config import SensitivityConfig
from quantbuild.hashing import sha256_file

SENSITIVITY = "sensitivity.json"


def _logprobs(model: Any, samples: list[Any]) -> list[Any]:
    import torch

    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1) for ids in samples]


def measure(baseline: Path, calibration: list[list[int]], config: SensitivityConfig) -> dict:
    """{"config", "samples", "tokens", "layers": {name: {"kld", "weights"}}} for every decoder linear."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantbuild.quantizers.rtn import dequantize_weight, quantizable_linears, quantize_weight

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(baseline), dtype=torch.float32).to(device).eval()
    samples = [torch.tensor([ids], device=device) for ids in calibration[: config.samples] if len(ids) > 1]
    reference = _logprobs(model, samples)
    tokens = sum(int(ids.shape[1]) - 1 for ids in samples)
    layers = {}
    for name, module in quantizable_linears(model).items():
        original = module.weight.detach().clone()
        width = original.shape[1]
        group = config.group_size if config.group_size == -1 or width % config.group_size == 0 else -1
        with torch.no_grad():
            codes, scale, zero = quantize_weight(original, config.bits, group, symmetric=True)
            module.weight.copy_(dequantize_weight(codes, scale, zero))
        total = 0.0
        for base, perturbed in zip(reference, _logprobs(model, samples)):
            total += float(torch.sum(base.exp() * (base - perturbed)))
        with torch.no_grad():
            module.weight.copy_(original)
        layers[name] = {"kld": round(total / max(1, tokens), 8), "weights": int(original.numel())}
    return {"config": {"samples": config.samples, "bits": config.bits, "group_size": config.group_size},
            "samples": len(samples), "tokens": tokens, "layers": layers}


def load_sensitivity(folder: Path) -> dict | None:
    """The calibrate stage's sensitivity with the file's sha256, or None where not measured."""
    path = folder / SENSITIVITY
    if not path.is_file():
        return None
    return {**json.loads(path.read_text()), "sha256": sha256_file(path)}
