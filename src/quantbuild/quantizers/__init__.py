"""Quantizer registry: one module per method, each declaring what it supports.

`check_variant` validates a variant config before any work (bits, group size, method);
`check_against_model` validates it against the baseline's layer widths; `quantize` runs
the method and returns the quantize record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantbuild.errors import ConfigError


@dataclass(frozen=True)
class Method:
    name: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    needs_calibration: bool
    quantize: Callable[[Any, Path, list[list[int]], Path], dict]


def _registry() -> dict[str, Method]:
    from quantbuild.quantizers import gptq, rtn

    return {module.METHOD.name: module.METHOD for module in (rtn, gptq)}


def check_variant(key: str, variant: Any) -> Method:
    methods = _registry()
    if variant.method not in methods:
        raise ConfigError(f"params.yaml: {key}.method={variant.method!r} is not allowed (allowed: {' | '.join(sorted(methods))})")
    method = methods[variant.method]
    if variant.bits not in method.bits:
        raise ConfigError(f"params.yaml: {key}.bits={variant.bits} is not supported by {method.name} (allowed: {', '.join(map(str, method.bits))})")
    if variant.group_size not in method.group_sizes:
        raise ConfigError(f"params.yaml: {key}.group_size={variant.group_size} is not supported by {method.name} (allowed: {', '.join(map(str, method.group_sizes))})")
    if not 0 < variant.damp_percent < 1:
        raise ConfigError(f"params.yaml: {key}.damp_percent={variant.damp_percent} is not allowed (allowed: 0 < value < 1)")
    return method


def check_against_model(key: str, variant: Any, widths: dict[str, int]) -> None:
    """A group size must divide the input width of every quantized layer."""
    if variant.group_size == -1:
        return
    for name, width in sorted(widths.items()):
        if width % variant.group_size:
            raise ConfigError(
                f"params.yaml: {key}.group_size={variant.group_size} does not divide {name}={width} "
                f"(allowed: -1 or a divisor of every layer width)"
            )


def get_method(name: str) -> Method:
    return _registry()[name]
