"""Mixed precision: GPTQ with a per-layer bit width and group size.

Two ways to choose the precision, combinable: explicit `overrides` (a pattern over whole
layer names -> bits/group size; the first match wins), and automatic promotion with
`target_bits` > 0: the calibrate stage has measured how far quantizing each layer alone
moves the output distribution (KL divergence against the baseline); the most sensitive
layers per extra stored bit are raised to `promote_bits`/`promote_group_size`, greedily,
while the effective bits per weight (codes, scales, zeros and g_idx) stay within the target.
No maintained library chooses per-layer precision from measured sensitivity under a size
budget, so the planning is ours; the quantization itself is GPTQModel's GPTQ with its
`dynamic` per-module overrides, written in the standard GPTQ checkpoint format.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

from quantbuild.errors import ConfigError
from quantbuild.quantizers.base import GPTQ_BITS, GPTQ_GROUPS, Inputs, Method, allowed, matching_layers
from quantbuild.quantizers.planner import Level, plan_levels


def layer_bits_per_weight(shape: tuple[int, int], bits: int, group_size: int) -> float:
    """Stored bits per weight of one GPTQ-format layer [out, in]: the packed codes, per
    group a fp16 scale and a packed zero point, and one int32 g_idx entry per input."""
    out_features, in_features = shape
    group = in_features if group_size == -1 else group_size
    return bits + (bits + 16) / group + 32 / out_features


def plan_bits_per_weight(plan: dict, layers: dict) -> float:
    stored = sum(layer_bits_per_weight(layers[name], p["bits"], p["group_size"]) * layers[name][0] * layers[name][1]
                 for name, p in plan.items())
    return stored / sum(out * inp for out, inp in layers.values())


def _check(key: str, variant: Any) -> None:
    for index, override in enumerate(variant.overrides):
        where = f"{key}.overrides[{index}]"
        if override.bits not in GPTQ_BITS:
            raise ConfigError(f"params.yaml: {where}.bits={override.bits} is not supported by mixed (allowed: {allowed(GPTQ_BITS)})")
        if override.group_size not in GPTQ_GROUPS:
            raise ConfigError(f"params.yaml: {where}.group_size={override.group_size} is not supported by mixed "
                              f"(allowed: {allowed(GPTQ_GROUPS)})")
    if not variant.overrides and variant.target_bits == 0:
        raise ConfigError(f"params.yaml: {key}: a mixed variant needs overrides, target_bits > 0, or both")
    if variant.target_bits:
        if not 1 < variant.target_bits <= 16:
            raise ConfigError(f"params.yaml: {key}.target_bits={variant.target_bits} is not allowed (allowed: 0 = off, or 1 < value <= 16)")
        if variant.promote_bits not in GPTQ_BITS or variant.promote_bits <= variant.bits:
            raise ConfigError(f"params.yaml: {key}.promote_bits={variant.promote_bits} is not allowed "
                              f"(allowed: one of {allowed(GPTQ_BITS)} above bits={variant.bits})")
        if variant.promote_group_size not in GPTQ_GROUPS:
            raise ConfigError(f"params.yaml: {key}.promote_group_size={variant.promote_group_size} is not allowed "
                              f"(allowed: {allowed(GPTQ_GROUPS)})")


def _promote(key: str, variant: Any, layers: dict, plan: dict, sensitivity: Optional[dict]) -> None:
    from quantbuild.quantizers.planner import gptq_level

    base, promoted = (variant.bits, variant.group_size), (variant.promote_bits, variant.promote_group_size)
    levels = {}
    for name in layers:
        current = (plan[name]["bits"], plan[name]["group_size"])
        if plan[name]["reason"] == "variant":
            levels[name] = [Level(level, layer_bits_per_weight(layers[name], *level), gptq_level(*level))
                            for level in (base, promoted)]
        else:
            levels[name] = [Level(current, layer_bits_per_weight(layers[name], *current))]
    _, chosen, reasons = plan_levels(
        f"{key}.target_bits={variant.target_bits}", layers, levels, variant.target_bits, sensitivity,
        lambda used: (f"params.yaml: {key}.target_bits={variant.target_bits} is below the {used:.4f} "
                      f"bits per weight the plan needs before promotion (allowed: >= {used:.4f})"))
    for name in layers:
        level = levels[name][chosen[name]]
        plan[name]["planned_bits_per_weight"] = level.bits_per_weight
        if plan[name]["reason"] == "variant" and level.precision != base:
            plan[name].update(bits=level.precision[0], group_size=level.precision[1],
                              reason=reasons.get(name, "promoted (start)"))


def _plan(key: str, variant: Any, layers: dict, sensitivity: Optional[dict], baseline: Path) -> dict:
    plan = {name: {"bits": variant.bits, "group_size": variant.group_size, "reason": "variant"} for name in layers}
    for index, override in enumerate(variant.overrides):
        for name in matching_layers(f"{key}.overrides[{index}]", override.pattern, layers):
            if plan[name]["reason"] == "variant":
                plan[name] = {"bits": override.bits, "group_size": override.group_size,
                              "reason": f"override {override.pattern}"}
    if variant.target_bits:
        _promote(key, variant, layers, plan, sensitivity)
    return plan


def dynamic_overrides(variant: Any, plan: dict) -> dict:
    """GPTQModel `dynamic` entries (exact, anchored names) for layers that differ from the variant."""
    return {
        f"+:^{re.escape(name)}$": {"bits": p["bits"], "group_size": p["group_size"]}
        for name, p in sorted(plan.items())
        if (p["bits"], p["group_size"]) != (variant.bits, variant.group_size)
    }


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    from quantbuild.quantizers.gptq import gptq_config
    from quantbuild.quantizers.gptqmodel_backend import quantize_and_save

    config = gptq_config(variant, dynamic_overrides(variant, plan) or None)
    return quantize_and_save(inputs.baseline, config, inputs.calibration, out)


METHOD = Method(name="mixed", bits=GPTQ_BITS, group_sizes=GPTQ_GROUPS, needs_calibration=True, quantize=_quantize,
                check=_check, plan=_plan)
