"""Quantizer registry: one module per method, each declaring what it supports.

`check_variant` validates a variant config before any work (bits, group size, method and
the method's own rules); `plan_layers` gives every decoder linear layer its precision and
`check_against_model` validates that plan against the baseline (architecture, layer
widths); `Method.quantize` runs the method and returns its measurements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from quantbuild.errors import ConfigError
from quantbuild.quantizers.base import (GPTQ_BITS, GPTQ_GROUPS, Inputs, Method, allowed, matching_layers,
                                        measurements, model_layers, save_with_transformers)

__all__ = ["GPTQ_BITS", "GPTQ_GROUPS", "Inputs", "Method", "allowed", "matching_layers", "measurements",
           "model_layers", "save_with_transformers", "check_variant", "plan_layers", "uniform_plan",
           "check_against_model", "supported_architectures", "method_names", "get_method"]


def _registry() -> dict[str, Method]:
    from quantbuild.quantizers import awq, bnb, dense, gguf, gptq, mixed, rtn

    return {module.METHOD.name: module.METHOD for module in (rtn, gptq, awq, bnb, mixed, gguf, dense)}


def check_variant(key: str, variant: Any) -> Method:
    methods = _registry()
    if variant.method not in methods:
        raise ConfigError(f"params.yaml: {key}.method={variant.method!r} is not allowed (allowed: {' | '.join(sorted(methods))})")
    method = methods[variant.method]
    # bits/group sizes apply to the integer formats; a GGUF variant names llama.cpp types.
    if method.bits and variant.bits not in method.bits:
        raise ConfigError(f"params.yaml: {key}.bits={variant.bits} is not supported by {method.name} (allowed: {allowed(method.bits)})")
    if method.group_sizes and variant.group_size not in method.group_sizes:
        raise ConfigError(f"params.yaml: {key}.group_size={variant.group_size} is not supported by {method.name} (allowed: {allowed(method.group_sizes)})")
    damp_percent = getattr(variant, "damp_percent", None)
    if damp_percent is not None and not 0 < damp_percent < 1:
        raise ConfigError(f"params.yaml: {key}.damp_percent={damp_percent} is not allowed (allowed: 0 < value < 1)")
    if method.check is not None:
        method.check(key, variant)
    return method


def uniform_plan(key: str, variant: Any, layers: dict, sensitivity: Optional[dict], baseline: Path) -> dict:
    if not hasattr(variant, "bits"):
        raise ConfigError(f"params.yaml: {key}: method {variant.method} has no uniform bit width")
    return {name: {"bits": variant.bits, "group_size": variant.group_size, "reason": "variant"} for name in layers}


def plan_layers(key: str, variant: Any, layers: dict, sensitivity: Optional[dict], baseline: Path) -> dict:
    method = check_variant(key, variant)
    return (method.plan or uniform_plan)(key, variant, layers, sensitivity, baseline)


def _architecture(baseline: Path) -> str:
    return json.loads((baseline / "config.json").read_text()).get("model_type", "?")


def supported_architectures(library: str) -> set[str]:
    if library == "gptqmodel":
        from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

        ensure_cpu_workers()
        from gptqmodel.models.auto import SUPPORTED_MODELS

        return set(SUPPORTED_MODELS)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_against_model(key: str, variant: Any, baseline: Path, plan: dict, layers: dict) -> None:
    """The library must support the architecture, and every layer's group size must divide
    its input width."""
    method = check_variant(key, variant)
    if method.library == "llama.cpp":
        from quantbuild.runtimes.gguf_file import check_architecture

        check_architecture(baseline)
        return
    architecture = _architecture(baseline)
    if architecture not in supported_architectures(method.library):
        raise ConfigError(
            f"{baseline}/config.json: model_type={architecture!r} is not supported by {method.name} "
            f"({method.library}; allowed: an architecture {method.library} lists, e.g. llama, qwen2, mistral)"
        )
    for name, precision in sorted(plan.items()):
        group = precision.get("group_size", -1)
        width = layers[name][1]
        if group != -1 and width % group:
            raise ConfigError(
                f"params.yaml: {key}.group_size={group} does not divide {name} input width {width} "
                f"(allowed: -1 or a divisor of every layer width)"
            )


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> Method:
    return _registry()[name]
