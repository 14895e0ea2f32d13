"""Running GPTQModel: its worker-pool setting, a quantize-and-save helper, and loading.

GPTQModel sizes its CPU thread pool from the core count and crashes on 2-core machines
("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"), so we
set GPTQMODEL_CPU_WORKERS to at least 2 before it is imported, unless the user set it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

# Files GPTQModel writes that carry timings, not weights: kept out of the artifact so the
# same inputs give the same artifact hashes.
NONDETERMINISTIC_FILES = ("quant_log.csv",)


def ensure_cpu_workers() -> None:
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        default = min(12, max(1, ((os.cpu_count() or 1) + 1) // 2))
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, default))


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

    from quantbuild.quantizers import measurements

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


def load_quantized(folder: Path, runtime: str = "kernel") -> Any:
    """The transformers model behind GPTQModel's loader, in eval mode.

    `kernel`: GPTQModel's own kernels, as deployed. `dequantized`: the same checkpoint
    loaded by GPTQModel, each quantized layer replaced by a float32 Linear holding exactly
    its dequantized weight. On CPUs without fast fp16/bf16 GEMM (no AVX512-FP16/AMX) the
    8-bit torch kernels run ~50x slower than fp32; the dequantized runtime gives the same
    weights at usable speed, with fp32 instead of fp16 accumulation.
    """
    ensure_cpu_workers()
    import json

    import torch
    from gptqmodel import GPTQModel

    if runtime == "kernel":
        return GPTQModel.load(str(folder), device="cpu").model.eval()
    method = json.loads((folder / "quantize_config.json").read_text()).get("quant_method", "gptq")
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
    return model.float().eval()


def load_checkpoint(folder: Path, runtime: str = "kernel") -> Any:
    """Any artifact quantbuild builds, through the runtime a user deploys it with.

    GPTQ/AWQ checkpoints (`quantize_config.json`) load through GPTQModel; bitsandbytes
    checkpoints (`quantization_config.quant_method: bitsandbytes` in config.json) through
    transformers with bitsandbytes' kernels, which run on CPU in float32, so `runtime`
    does not change them; anything else is a dense transformers checkpoint.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM

    if is_gptqmodel_checkpoint(folder):
        return load_quantized(folder, runtime)
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "bitsandbytes":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
