"""The mixed-precision planner: one for the GPTQ `mixed` method and GGUF's auto-mix.

Each layer starts at a given level (its cheapest candidate format, or, in a repair round,
the level the previous round gave it); then, greedily, the promotion (layer, any higher
level) that removes the most divergence per extra stored bit is applied while the stored
bits stay within the budget. A layer's divergence at a level is read from the sensitivity
stage's table, measured at that very format, and weighted by an objective over the probe
sets: the calibration mix for a first plan, the failing families in a repair round.
Levels and their stored cost are the format's; the ranking and the budget are this
module's. This is the multiple-choice knapsack solved greedily by gain per bit, as
ExLlamaV3 does; promotions may skip levels, so a measurement that is not monotone in bits
(noise on an insensitive layer) neither blocks a worthwhile jump nor buys a useless one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

from quantbuild.errors import ConfigError

# The first plan minimises the divergence on the calibration mix.
DEFAULT_OBJECTIVE = {"calibration": 1.0}


@dataclass(frozen=True)
class Candidate:
    """One format a planner may give a layer: a llama.cpp tensor type (with or without the
    importance matrix) or a GPTQ bit width and group size (with the variant's other settings)."""

    format: str
    name: str
    imatrix: bool = False
    bits: int = 0
    group_size: int = 0
    gptq: tuple = ()

    @property
    def key(self) -> str:
        return f"{self.name}+imatrix" if self.imatrix else self.name


def gptq_level(bits: int, group_size: int) -> str:
    return f"{bits}b-g{group_size}"


def candidates_of(variant: Any) -> list[Candidate]:
    """The formats `variant`'s planner chooses among, cheapest first; [] when it plans nothing."""
    if variant.method == "gguf" and getattr(variant, "target_bpw", 0):
        return [Candidate("gguf", name, imatrix=bool(variant.imatrix)) for name in variant.mix_types]
    if variant.method == "mixed" and getattr(variant, "target_bits", 0):
        settings = (bool(variant.sym), bool(variant.desc_act), float(variant.damp_percent))
        return [Candidate("gptq", gptq_level(bits, group), bits=bits, group_size=group, gptq=settings)
                for bits, group in ((variant.bits, variant.group_size),
                                    (variant.promote_bits, variant.promote_group_size))]
    return []


def require_sensitivity(setting: str, layers: dict, sensitivity: Optional[dict], candidates: list[str]) -> dict:
    """The sensitivity stage's table for every layer in `layers` at every key in
    `candidates`; `setting` (e.g. `quant.variants.x.target_bpw=3.5`) names what needs it."""
    if sensitivity is None:
        raise ConfigError(f"params.yaml: {setting} needs the per-layer sensitivity the sensitivity stage measures "
                          f"(allowed: 0, or set calibration.sensitivity.samples > 0 and run `dvc repro`)")
    measured = sensitivity["layers"]
    unknown = sorted(set(layers) - set(measured))
    if unknown:
        raise ConfigError(f"sensitivity: no measurement for layer {unknown[0]} (it was measured on another model; "
                          f"rerun the sensitivity stage)")
    missing = [key for key in candidates if key not in sensitivity.get("candidates", [])]
    if missing:
        raise ConfigError(f"sensitivity: {setting} chooses among {', '.join(candidates)}, but {missing[0]} was not "
                          f"measured (measured: {', '.join(sensitivity.get('candidates', []))}; rerun the "
                          f"sensitivity stage)")
    return measured


def divergence(measured: dict, key: str, objective: dict[str, float]) -> float:
    """A layer's measured KL divergence at candidate `key`, weighted over the probe sets."""
    values = measured["kld"][key]
    return sum(weight * values.get(probe, 0.0) for probe, weight in sorted(objective.items()))


@dataclass(frozen=True)
class Level:
    """One precision a layer may take: its name in the format, its stored bits per weight,
    and its key in the sensitivity table (None: not measured, a fixed level)."""

    precision: Hashable
    bits_per_weight: float
    key: Optional[str] = None


@dataclass(frozen=True)
class Promotion:
    layer: str
    source: Level
    target: Level
    gain: float
    extra_bits: float


def promote(levels: dict[str, list[Level]], weights: dict[str, int], start: dict[str, int], budget_bits: float,
            cost: Callable[[str, Level], float]) -> tuple[dict[str, int], list[Promotion]]:
    """Level index per layer after greedy promotion, and the promotions in the order made.

    `levels[name]` is ordered cheapest first; `start[name]` the index to start from;
    `budget_bits` the total stored bits allowed; `cost(name, level)` the divergence the
    layer contributes at that level. Only promotions that reduce the divergence are made.
    Ties go to the first layer by name and the cheaper level, so the plan is deterministic.
    """
    chosen = dict(start)
    used = sum(levels[name][chosen[name]].bits_per_weight * weights[name] for name in levels)
    made: list[Promotion] = []
    while True:
        best: Optional[tuple[float, Promotion]] = None
        for name in sorted(levels):
            current = levels[name][chosen[name]]
            for upper in levels[name][chosen[name] + 1:]:
                extra = (upper.bits_per_weight - current.bits_per_weight) * weights[name]
                if extra <= 0 or used + extra > budget_bits + 1e-9:
                    continue
                gain = cost(name, current) - cost(name, upper)
                if gain <= 0:
                    continue
                if best is None or gain / extra > best[0]:
                    best = (gain / extra, Promotion(name, current, upper, gain, extra))
        if best is None:
            return chosen, made
        step = best[1]
        used += step.extra_bits
        chosen[step.layer] = levels[step.layer].index(step.target)
        made.append(step)


def planned_bits_per_weight(levels: dict[str, list[Level]], chosen: dict[str, int], weights: dict[str, int]) -> float:
    total = sum(weights.values())
    return sum(levels[name][chosen[name]].bits_per_weight * weights[name] for name in levels) / max(1, total)


def objective_of(sensitivity: dict) -> dict[str, float]:
    """The probe-set weights to minimise: a repair round sets its own, else the default."""
    return dict(sensitivity.get("objective") or DEFAULT_OBJECTIVE)


def start_of(sensitivity: dict, name: str, options: list[Level]) -> int:
    """Where `name` starts: the level a repair round's previous plan gave it, else the cheapest."""
    previous = (sensitivity.get("start") or {}).get(name)
    if previous is None:
        return 0
    wanted = tuple(previous) if isinstance(previous, list) else previous
    return next((index for index, level in enumerate(options) if level.precision == wanted), 0)


def plan_levels(setting: str, layers: dict, levels: dict[str, list[Level]], target_bits: float,
                sensitivity: Optional[dict], too_small: Callable[[float], str]
                ) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(start, chosen level index, reason per promoted layer) for a mix within `target_bits`
    per weight: every layer starts where `start_of` says, a target below that plan is a
    ConfigError (`too_small(bits)` its message), then greedy promotion on the measured table."""
    weights = {name: out * inp for name, (out, inp) in layers.items()}
    start = {name: start_of(sensitivity or {}, name, levels[name]) for name in layers}
    floor = planned_bits_per_weight(levels, start, weights)
    if floor > target_bits + 1e-9:
        raise ConfigError(too_small(floor))
    candidates = list(dict.fromkeys(level.key for options in levels.values() for level in options if level.key))
    measured = require_sensitivity(setting, layers, sensitivity, candidates)
    objective = objective_of(sensitivity)
    chosen, made = promote(levels, weights, start, target_bits * sum(weights.values()),
                           lambda name, level: divergence(measured[name], level.key, objective))
    return start, chosen, describe_promotions(made, objective)


def describe_promotions(made: list[Promotion], objective: dict[str, float]) -> dict[str, str]:
    """Per promoted layer, why: from which level to which, and the divergence removed."""
    probes = "+".join(sorted(objective))
    reasons: dict[str, list[str]] = {}
    for step in made:
        reasons.setdefault(step.layer, []).append(f"{step.source.key or step.source.precision}->"
                                                  f"{step.target.key or step.target.precision}")
    gains: dict[str, float] = {}
    for step in made:
        gains[step.layer] = gains.get(step.layer, 0.0) + step.gain
    return {layer: f"promoted {' '.join(path)} ({probes} KL -{gains[layer]:.3g})" for layer, path in reasons.items()}
