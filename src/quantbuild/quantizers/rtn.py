"""Round-to-nearest weight-only quantization, per channel (group -1) or grouped.

The `rtn` method itself is GPTQModel's RTN (the library's implementation, written in the
GPTQ checkpoint format). The quantize-dequantize helpers below are ours, written by hand
because no library exposes a simple in-place fake-quant of one layer: sensitivity analysis
and the baseline's model card use them to ask "what if only this changed".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.quantizers.base import GPTQ_BITS, GPTQ_GROUPS, Inputs, Method


def quantize_weight(weight: Any, bits: int, group_size: int, symmetric: bool) -> tuple[Any, Any, Any]:
    """Integer codes, scales and zero points of a 2-D weight `[out, in]`.

    Groups run along the input dimension (as in GPTQ checkpoints); `group_size=-1` means one
    group per output channel. Codes are in [0, 2**bits - 1]; `w ~= (q - zero) * scale`.
    """
    import torch

    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    grouped = weight.float().reshape(out_features, in_features // group, group)
    levels = 2**bits - 1
    if symmetric:
        scale = grouped.abs().amax(dim=-1, keepdim=True) / (levels / 2)
        zero = torch.full_like(scale, (levels + 1) / 2)
    else:
        low = grouped.amin(dim=-1, keepdim=True).clamp(max=0)
        high = grouped.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (high - low) / levels
        zero = torch.round(-low / scale.clamp(min=1e-12))
    scale = scale.clamp(min=1e-12)
    codes = torch.clamp(torch.round(grouped / scale) + zero, 0, levels)
    return codes.to(torch.uint8).reshape(out_features, in_features), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_weight(codes: Any, scale: Any, zero: Any) -> Any:
    out_features, in_features = codes.shape
    groups = scale.shape[1]
    grouped = codes.float().reshape(out_features, groups, in_features // groups)
    return ((grouped - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_features, in_features)


def quantizable_linears(model: Any) -> dict[str, Any]:
    """The decoder's linear layers, by name, sorted (embeddings and lm_head stay full precision)."""
    import torch

    return {
        name: module
        for name, module in sorted(model.named_modules())
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"
    }


def fake_quantize_model(model: Any, bits: int, group_size: int, symmetric: bool) -> None:
    """Replace every decoder linear weight by its quantize-dequantize round trip, in place."""
    import torch

    with torch.no_grad():
        for module in quantizable_linears(model).values():
            codes, scale, zero = quantize_weight(module.weight, bits, group_size, symmetric)
            module.weight.copy_(dequantize_weight(codes, scale, zero).to(module.weight.dtype))


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    """RTN through GPTQModel's own weight-only RTN, written as a GPTQ-format checkpoint so
    every GPTQ-aware loader reads it; no calibration data is used."""
    from quantbuild.quantizers.gptqmodel_backend import quantize_and_save
    from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

    ensure_cpu_workers()  # before gptqmodel is first imported
    from gptqmodel.quantization.config import RTNConfig

    config = RTNConfig(bits=variant.bits, group_size=variant.group_size, sym=variant.sym, offload_to_disk=False)
    return quantize_and_save(inputs.baseline, config, None, out)


METHOD = Method(name="rtn", bits=GPTQ_BITS, group_sizes=GPTQ_GROUPS, needs_calibration=False, quantize=_quantize)
