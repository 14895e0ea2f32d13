"""bitsandbytes NF4/FP4 (optionally with double quantization of the block scales) and
LLM.int8, through transformers' bitsandbytes integration, serialized with
`save_pretrained` so the artifact reloads with `AutoModelForCausalLM.from_pretrained`
alone (the `quantization_config` in config.json names the format), without the original
weights.

bitsandbytes quantizes 4-bit weights in blocks of 64 values and 8-bit weights per output
row; those are the only group sizes this method accepts (64 and -1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quantbuild.errors import ConfigError
from quantbuild.quantizers.base import Inputs, Method, measurements, save_with_transformers

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZE = {4: 64, 8: -1}


def _check(key: str, variant: Any) -> None:
    if variant.group_size != BLOCK_SIZE[variant.bits]:
        raise ConfigError(f"params.yaml: {key}.group_size={variant.group_size} is not supported by bnb at "
                          f"{variant.bits} bits (allowed: {BLOCK_SIZE[variant.bits]})")
    if variant.quant_type not in QUANT_TYPES:
        raise ConfigError(f"params.yaml: {key}.quant_type={variant.quant_type!r} is not supported by bnb "
                          f"(allowed: {' | '.join(QUANT_TYPES)})")
    if variant.bits == 8 and variant.double_quant:
        raise ConfigError(f"params.yaml: {key}.double_quant=True is not supported by bnb at 8 bits "
                          f"(allowed: false; double quantization applies to 4-bit weights)")


def bnb_config(variant: Any) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if variant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=variant.quant_type,
                              bnb_4bit_use_double_quant=variant.double_quant,
                              bnb_4bit_compute_dtype=torch.float32)


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    import torch

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    save_with_transformers(inputs.baseline, out, quantization_config=bnb_config(variant), device_map=device)
    return measurements(started)


# The group size is checked per bit width in _check.
METHOD = Method(name="bnb", bits=(4, 8), group_sizes=(-1, 32, 64, 128), needs_calibration=False, quantize=_quantize,
                library="transformers", check=_check)
