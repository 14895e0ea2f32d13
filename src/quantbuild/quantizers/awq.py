"""AWQ (activation-aware weight quantization) through GPTQModel's AWQ implementation,
written in the AutoAWQ GEMM checkpoint format (`quant_method: awq`, `format: gemm`), which
AWQ-aware loaders (transformers, vLLM, GPTQModel) read.

Weights are packed by GPTQModel's portable torch kernel (`awq_torch`) on any device: it
writes the same GEMM layout as the CUDA kernels, and its automatic choice on a GPU may pick
a kernel that compiles at first use (Marlin, Machete), which an offline machine cannot. The
quantization itself runs on the GPU where there is one. The GEMM layout is a 4-bit format,
so 4 bits is all this method allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.quantizers.base import Inputs, Method


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    from quantbuild.quantizers.gptqmodel_backend import quantize_and_save
    from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

    ensure_cpu_workers()
    from gptqmodel import AWQConfig

    config = AWQConfig(bits=variant.bits, group_size=variant.group_size, sym=variant.sym, offload_to_disk=False)
    return quantize_and_save(inputs.baseline, config, inputs.calibration, out, backend="awq_torch")


METHOD = Method(name="awq", bits=(4,), group_sizes=(32, 64, 128), needs_calibration=True, quantize=_quantize)
