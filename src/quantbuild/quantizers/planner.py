"""The mixed-precision planner, shared by the GPTQ `mixed` method and GGUF's auto-mix.

Each layer starts at its cheapest allowed precision; then, greedily, the promotion (layer,
next precision) that removes the most estimated output divergence per extra stored bit is
applied while the stored bits stay within the budget. Precisions, their stored cost and
the divergence model are the format's; the ranking and the budget are this module's.
This is a multiple-choice knapsack solved greedily by gain per bit, as ExLlamaV3 and
llama.cpp's proposed target-bpw mix (PR #15550) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional


def require_sensitivity(setting: str, layers: dict, sensitivity: Optional[dict]) -> dict:
    """The calibrate stage's per-layer measurements for every layer in `layers`; `setting`
    (e.g. `quant.variants.x.target_bits=3.5`) names what needs them in the error."""
    from quantbuild.errors import ConfigError

    if sensitivity is None:
        raise ConfigError(f"params.yaml: {setting} needs the per-layer sensitivity the calibrate stage measures "
                          f"(allowed: 0, or set calibration.sensitivity.samples > 0)")
    measured = sensitivity["layers"]
    unknown = sorted(set(layers) - set(measured))
    if unknown:
        raise ConfigError(f"calibration sensitivity: no measurement for layer {unknown[0]} (it was measured on "
                          f"another model; rerun the calibrate stage)")
    return measured


@dataclass(frozen=True)
class Level:
    """One precision a layer may take: its name in the format, its stored bits per weight."""

    precision: Hashable
    bits_per_weight: float


def noise_model_kld(measured_kld: float, measured_bits: float, bits: float) -> float:
    """Estimated KL divergence of a layer at `bits`, from one measurement at `measured_bits`.

    Rounding noise power scales with the step squared, i.e. as 4^-bits, and for small
    perturbations the output KL divergence is proportional to that power.
    """
    return measured_kld * 4.0 ** (measured_bits - bits)


def promote(levels: dict[str, list[Level]], weights: dict[str, int], start: dict[str, int], budget_bits: float,
            gain: Callable[[str, Level, Level], float]) -> tuple[dict[str, int], dict[str, Optional[float]]]:
    """Level index per layer after greedy promotion, and the gain each promoted layer got.

    `levels[name]` is ordered cheapest first; `start[name]` the index to start from;
    `budget_bits` the total stored bits allowed. Ties are broken by layer name, so the plan
    is deterministic.
    """
    chosen = dict(start)
    used = sum(levels[name][chosen[name]].bits_per_weight * weights[name] for name in levels)
    gains: dict[str, Optional[float]] = {}
    while True:
        best: tuple[float, str] | None = None
        for name in sorted(levels):
            index = chosen[name]
            if index + 1 >= len(levels[name]):
                continue
            current, upper = levels[name][index], levels[name][index + 1]
            extra = (upper.bits_per_weight - current.bits_per_weight) * weights[name]
            if extra <= 0 or used + extra > budget_bits:
                continue
            ratio = gain(name, current, upper) / extra
            if best is None or ratio > best[0]:
                best = (ratio, name)
        if best is None:
            return chosen, gains
        name = best[1]
        current, upper = levels[name][chosen[name]], levels[name][chosen[name] + 1]
        used += (upper.bits_per_weight - current.bits_per_weight) * weights[name]
        gains[name] = gain(name, current, upper)
        chosen[name] += 1
