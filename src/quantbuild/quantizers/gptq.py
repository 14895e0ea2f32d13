"""GPTQ through GPTQModel (the maintained successor of AutoGPTQ), written in the standard
GPTQ checkpoint format (`quantize_config.json` declares `format: gptq`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantbuild.quantizers import Method


def _quantize(variant: Any, baseline: Path, calibration: list[list[int]], out: Path) -> dict:
    from quantbuild.quantizers.gptqmodel_backend import ensure_cpu_workers, quantize_and_save

    ensure_cpu_workers()
    from gptqmodel import QuantizeConfig

    config = QuantizeConfig(
        bits=variant.bits,
        group_size=variant.group_size,
        sym=variant.sym,
        desc_act=variant.desc_act,
        damp_percent=variant.damp_percent,
        offload_to_disk=False,
    )
    return quantize_and_save(baseline, config, calibration, out)


METHOD = Method(name="gptq", bits=(2, 3, 4, 8), group_sizes=(-1, 32, 64, 128), needs_calibration=True, quantize=_quantize)
