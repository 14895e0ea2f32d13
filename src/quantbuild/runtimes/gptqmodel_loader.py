"""GPTQModel's loader and kernels: how a GPTQ, AWQ, RTN or mixed checkpoint runs on the
torch runtime, as GPTQModel's kernels or dequantized to float32.

GPTQModel sizes its CPU thread pool from the core count and crashes on 2-core machines
("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"), so
GPTQMODEL_CPU_WORKERS is set to at least 2 before it is imported, unless the user set it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quantbuild.errors import RuntimeUnavailable


def ensure_cpu_workers() -> None:
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        default = min(12, max(1, ((os.cpu_count() or 1) + 1) // 2))
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, default))


def is_gptqmodel_checkpoint(folder: Path) -> bool:
    return (folder / "quantize_config.json").is_file()


RUNTIMES = ("kernel", "dequantized")
# The portable torch kernel of each GPTQModel method, used to read packed weights back.
TORCH_BACKENDS = {"gptq": "gptq_torch", "awq": "awq_torch"}


def dense_weight(module: Any) -> Any:
    """The dequantized weight of a GPTQModel quantized linear, as [out_features, in_features]."""
    if hasattr(module, "dequantize_weight"):
        # GPTQ kernels dequantize to [in_features, out_features] (they compute x @ W).
        return module.dequantize_weight().float().t()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales, bits=module.bits,
                           group_size=module.group_size).float().t()


def load_quantized(folder: Path, runtime: str = "kernel", device: str = "cpu",
                   kernels: dict[str, str] | None = None) -> Any:
    """The transformers model behind GPTQModel's loader, in eval mode.

    `kernel`: GPTQModel's own kernels, as deployed: on a CUDA `device` the backend `kernels`
    names for the checkpoint's format (float16), on a CPU GPTQModel's own choice.
    `dequantized`: the same checkpoint loaded by GPTQModel, each quantized layer replaced by
    a float32 Linear holding exactly its dequantized weight. On CPUs without fast fp16/bf16
    GEMM (no AVX512-FP16/AMX) the 8-bit torch kernels run ~50x slower than fp32; the
    dequantized runtime gives the same weights at usable speed, with fp32 accumulation.
    """
    ensure_cpu_workers()
    import json

    import torch
    from gptqmodel import GPTQModel

    method = json.loads((folder / "quantize_config.json").read_text()).get("quant_method", "gptq")
    if runtime == "kernel":
        if device != "cuda":
            return GPTQModel.load(str(folder), device="cpu").model.eval()
        backend = (kernels or {}).get(method)
        if backend is None:
            raise RuntimeUnavailable(f"{folder}: eval.gpu_kernels names no kernel for {method} checkpoints")
        try:
            loaded = GPTQModel.load(str(folder), device="cuda", backend=backend, dtype=torch.float16)
        except (ValueError, NotImplementedError, TypeError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeUnavailable(f"{folder}: GPTQModel kernel {backend!r} cannot load this {method} checkpoint "
                                     f"on CUDA ({first}); choose another in eval.gpu_kernels.{method}") from None
        return loaded.model.eval()
    model = GPTQModel.load(str(folder), device="cpu", backend=TORCH_BACKENDS.get(method, "gptq_torch"),
                           dtype=torch.float16).model
    replacements = [(name, module) for name, module in model.named_modules() if hasattr(module, "qweight")]
    for name, module in replacements:
        with torch.no_grad():
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(dense_weight(module))
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model.float().to(device).eval()


def kernel_names(model: Any) -> list[str]:
    """The classes that run the model's quantized layers (GPTQModel's QuantLinear kernels,
    bitsandbytes' Linear4bit/Linear8bitLt), as measured: what the evaluation really ran."""
    return sorted({type(module).__name__ for module in model.modules()
                   if hasattr(module, "qweight") or type(module).__name__ in ("Linear4bit", "Linear8bitLt")})
