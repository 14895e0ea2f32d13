"""The baseline at its own precision on the torch runtime: float16 or bfloat16 safetensors,
loaded by `AutoModelForCausalLM.from_pretrained` alone. It never wins a size or speed check;
a torch ladder carries it so that the gate has the higher-precision format to keep when no
quantized variant passes with a measured win (`gate.fallback: baseline`), as a GGUF ladder
carries F16. It is measured like any variant: on the ladder's device, against the baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quantbuild.errors import ConfigError
from quantbuild.quantizers.base import Inputs, Method, measurements, save_with_transformers

DTYPES = ("float16", "bfloat16")


def _check(key: str, variant: Any) -> None:
    if variant.dtype not in DTYPES:
        raise ConfigError(f"params.yaml: {key}.dtype={variant.dtype!r} is not supported by dense "
                          f"(allowed: {' | '.join(DTYPES)})")


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    import torch

    started = time.perf_counter()
    save_with_transformers(inputs.baseline, out, dtype=getattr(torch, variant.dtype))
    return measurements(started)


METHOD = Method(name="dense", bits=(16,), group_sizes=(-1,), needs_calibration=False, quantize=_quantize,
                library="transformers", check=_check)
