"""Quantizer registry: one module per method, each declaring what it supports.

`check_variant` validates a variant config before any work (bits, group size, method and
the method's own rules); `plan_layers` gives every decoder linear layer its precision and
`check_against_model` validates that plan against the baseline (architecture, layer
widths); `Method.quantize` runs the method and returns its measurements.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from quantbuild.errors import ConfigError

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (-1, 32, 64, 128)


@dataclass(frozen=True)
class Inputs:
    """What a method may read: the baseline folder, calibration token IDs and the variant's
    per-layer sensitivity table from the sensitivity stage (None where it plans nothing); a
    repair round adds its `objective` and `start` plan to that table."""

    baseline: Path
    calibration: list[list[int]]
    sensitivity: Optional[dict] = None
    # The gguf_base stage's folder (the baseline's GGUF and the importance matrix), and the
    # lineage a GGUF file carries in its own metadata; used by the gguf method only.
    gguf_base: Optional[Path] = None
    lineage: Optional[dict] = None


@dataclass(frozen=True)
class Method:
    name: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    needs_calibration: bool
    # (variant, inputs, per-layer plan, output folder) -> measurements
    quantize: Callable[[Any, Inputs, dict, Path], dict]
    # "gptqmodel" (architectures GPTQModel knows), "transformers" (any causal LM) or
    # "llama.cpp" (architectures its converter knows)
    library: str = "gptqmodel"
    # extra rules of this method: (key, variant) -> raises ConfigError
    check: Optional[Callable[[str, Any], None]] = None
    # per-layer precision: (key, variant, layers, sensitivity, baseline) -> {layer: {..., reason}}
    plan: Optional[Callable[[str, Any, dict, Optional[dict], Path], dict]] = None
    # (model folder, plan, layers) -> bits per weight as stored; None: the safetensors count
    effective_bits: Optional[Callable[[Path, dict, dict], dict]] = None


def measurements(started: float) -> dict[str, float]:
    """Wall time since `started`, this process's peak resident memory and, on a GPU, its
    peak allocated GPU memory."""
    import resource
    import time

    import torch

    measured = {"wall_seconds": round(time.perf_counter() - started, 3),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        measured["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return measured


def save_with_transformers(baseline: Path, out: Path, **load: Any) -> None:
    """The baseline loaded by transformers with `load` (a quantization config, a dtype, a
    device map) and saved with its tokenizer into `out`: what reloads with
    `AutoModelForCausalLM.from_pretrained` alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(baseline), **load).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(baseline)).save_pretrained(str(out))


def _registry() -> dict[str, Method]:
    from quantbuild.quantizers import awq, bnb, dense, gguf, gptq, mixed, rtn

    return {module.METHOD.name: module.METHOD for module in (rtn, gptq, awq, bnb, mixed, gguf, dense)}


def allowed(values: tuple) -> str:
    return ", ".join(map(str, values))


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


def model_layers(baseline: Path) -> dict[str, tuple[int, int]]:
    """The decoder's linear layers (module name -> (out, in) features), sorted, read from the
    safetensors headers; embeddings, norms and lm_head stay full precision."""
    from safetensors import safe_open

    layers = {}
    for path in sorted(baseline.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                if name.endswith(".weight") and len(shape) == 2 and ".layers." in f".{name}":
                    layers[name[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
    return dict(sorted(layers.items()))


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
        from quantbuild.quantizers.gptqmodel_backend import ensure_cpu_workers

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


def matching_layers(key: str, pattern: str, layers: dict) -> list[str]:
    """Layers whose whole name matches `pattern`; a pattern that is invalid or matches no
    layer is a config error naming it."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"params.yaml: {key}.pattern={pattern!r} is not a valid regular expression ({err})") from None
    matched = [name for name in layers if compiled.fullmatch(name)]
    if not matched:
        example = next(iter(layers), "?")
        raise ConfigError(f"params.yaml: {key}.pattern={pattern!r} matches no layer (allowed: a regular expression "
                          f"matching whole layer names such as {example!r})")
    return matched


def method_names() -> list[str]:
    return sorted(_registry())


def get_method(name: str) -> Method:
    return _registry()[name]
