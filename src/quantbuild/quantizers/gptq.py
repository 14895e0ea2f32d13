"""GPTQ through GPTQModel (the maintained successor of AutoGPTQ), written in the standard
GPTQ checkpoint format (`quantize_config.json` declares `format: gptq`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.quantizers.base import GPTQ_BITS, GPTQ_GROUPS, Inputs, Method


def gptq_config(variant: Any, dynamic: dict | None = None) -> Any:
    from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

    ensure_cpu_workers()
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        bits=variant.bits,
        group_size=variant.group_size,
        sym=variant.sym,
        desc_act=variant.desc_act,
        damp_percent=variant.damp_percent,
        dynamic=dynamic,
        offload_to_disk=False,
    )


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    from quantbuild.quantizers.gptqmodel_backend import quantize_and_save

    return quantize_and_save(inputs.baseline, gptq_config(variant), inputs.calibration, out)


METHOD = Method(name="gptq", bits=GPTQ_BITS, group_sizes=GPTQ_GROUPS, needs_calibration=True, quantize=_quantize)
