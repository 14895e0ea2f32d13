"""What every quantizer shares: the inputs a method reads, the record of a method, the
decoder's layers, and the measurements every build reports.

The methods (one module each) and the registry (`quantizers/__init__`) both import this
module; it imports neither, so the registry can list the methods without a circle.
"""

from __future__ import annotations

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
    # The gguf_base stage's folder (the baseline's GGUF), the imatrix stage's (the importance
    # matrix), and the lineage a GGUF file carries in its own metadata; gguf method only.
    gguf_base: Optional[Path] = None
    imatrix: Optional[Path] = None
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


def allowed(values: tuple) -> str:
    return ", ".join(map(str, values))


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
