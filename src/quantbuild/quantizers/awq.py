"""AWQ (activation-aware weight quantization) through GPTQModel's AWQ implementation,
written in the AutoAWQ GEMM checkpoint format (`quant_method: awq`, `format: gemm`), which
AWQ-aware loaders (transformers, vLLM, GPTQModel) read.

GPTQModel picks a CUDA packing kernel for AWQ by default; on a machine without CUDA we ask
for its portable torch kernel (`awq_torch`), which packs the same GEMM layout. The GEMM
layout is a 4-bit format, so 4 bits is all this method allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.quantizers import Inputs, Method


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    from quantbuild.quantizers.gptqmodel_backend import ensure_cpu_workers, quantize_and_save

    ensure_cpu_workers()
    import torch
    from gptqmodel import AWQConfig

    config = AWQConfig(bits=variant.bits, group_size=variant.group_size, sym=variant.sym, offload_to_disk=False)
    backend = "auto" if torch.cuda.is_available() else "awq_torch"
    return quantize_and_save(inputs.baseline, config, inputs.calibration, out, backend=backend)


METHOD = Method(name="awq", bits=(4,), group_sizes=(32, 64, 128), needs_calibration=True, quantize=_quantize)
