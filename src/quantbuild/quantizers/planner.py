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

Layers measured alone do not add up exactly to a plan: quantization errors of several
layers interact. `promote_checked` therefore lets a measurement of the whole plan decide:
the greedy goes in stretches of the budget, and a stretch is kept only where the plan with
it diverges less than the plan without it (`PlanCheck`, on probes held out from the table's).
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
            cost: Callable[[str, Level], float], barred: frozenset = frozenset()
            ) -> tuple[dict[str, int], list[Promotion]]:
    """Level index per layer after greedy promotion, and the promotions in the order made.

    `levels[name]` is ordered cheapest first; `start[name]` the index to start from;
    `budget_bits` the total stored bits allowed; `cost(name, level)` the divergence the
    layer contributes at that level; `barred` the (layer, precision) promotions not to make.
    Only promotions that reduce the divergence are made. Ties go to the first layer by name
    and the cheaper level, so the plan is deterministic.
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
                if extra <= 0 or used + extra > budget_bits + 1e-9 or (name, upper.precision) in barred:
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


# A stretch whose whole plan does not measure better is tried this many times in all, its
# promotions barred after each refusal, before the planner goes on to the next stretch.
ATTEMPTS = 2


def promote_checked(levels: dict[str, list[Level]], weights: dict[str, int], start: dict[str, int],
                    budget_bits: float, cost: Callable[[str, Level], float], stretches: int,
                    judge: Callable[[dict[str, int], dict], bool]
                    ) -> tuple[dict[str, int], list[Promotion], list[dict]]:
    """`promote` in `stretches` equal stretches of the bits between the start and
    `budget_bits`, each kept only where `judge(plan, step)` finds the whole plan better than
    the plan before it: a measurement of the plan itself, where the table measured each layer
    alone. A refused stretch has its promotions barred and is tried again without them
    (ATTEMPTS in all); then the planner goes on, the next stretch's bits including what was
    not spent. Returns the plan, its promotions, and each step judged (stretch, promotions,
    bits_per_weight, kept, and what the judge adds)."""
    chosen, made, steps, barred = dict(start), [], [], set()
    floor = planned_bits_per_weight(levels, chosen, weights) * sum(weights.values())
    for stretch in range(1, stretches + 1):
        cap = floor + (budget_bits - floor) * stretch / stretches
        for _ in range(ATTEMPTS):
            trial, promoted = promote(levels, weights, chosen, cap, cost, frozenset(barred))
            if not promoted:
                break
            step = {"stretch": stretch, "promotions": len(promoted),
                    "bits_per_weight": round(planned_bits_per_weight(levels, trial, weights), 6)}
            step["kept"] = bool(judge(trial, step))
            steps.append(step)
            if step["kept"]:
                chosen, made = trial, made + promoted
                break
            barred |= {(p.layer, p.target.precision) for p in promoted}
    return chosen, made, steps


class PlanCheck:
    """Judges a plan's stretches by measuring the whole plan: `measure(plan)` (plan: layer ->
    Level) gives a divergence per probe set; a stretch is kept where their mean is below the
    mean of the plan before it. `record` is what the sensitivity table keeps."""

    def __init__(self, stretches: int, measure: Callable[[dict[str, Level]], dict[str, float]],
                 probes: Optional[dict] = None):
        self.stretches = stretches
        self.measure = measure
        self.probes = probes or {}
        self.levels: dict[str, list[Level]] = {}
        self.current = 0.0
        self.record: dict[str, Any] = {}

    def _scored(self, chosen: dict[str, int]) -> tuple[float, dict[str, float]]:
        scores = self.measure({name: self.levels[name][index] for name, index in chosen.items()})
        return sum(scores.values()) / max(1, len(scores)), {name: float(f"{value:.6g}")
                                                             for name, value in sorted(scores.items())}

    def begin(self, levels: dict[str, list[Level]], start: dict[str, int], weights: dict[str, int]) -> None:
        self.levels = levels
        self.current, scores = self._scored(start)
        self.record = {"stretches": self.stretches, "probes": self.probes,
                       "start": {"bits_per_weight": round(planned_bits_per_weight(levels, start, weights), 6),
                                 "kld": scores}}

    def __call__(self, trial: dict[str, int], step: dict) -> bool:
        mean, step["kld"] = self._scored(trial)
        if mean < self.current:
            self.current = mean
            return True
        return False


def _not_replayed(setting: str) -> str:
    return (f"sensitivity: {setting}: the table's plan check does not replay (it judged other promotions; rerun "
            f"the sensitivity stage)")


def replayed(setting: str, recorded: list[dict]) -> Callable[[dict[str, int], dict], bool]:
    """A judge that gives the verdicts the sensitivity stage measured (its table's `check`),
    step by step, and refuses a table whose steps are not the ones this planner makes."""
    steps = iter(recorded)

    def judge(trial: dict[str, int], step: dict) -> bool:
        want = next(steps, None)
        if want is None or (want["stretch"], want["promotions"]) != (step["stretch"], step["promotions"]) or \
                abs(want["bits_per_weight"] - step["bits_per_weight"]) > 1e-6:
            raise ConfigError(_not_replayed(setting))
        step["kld"] = want.get("kld")
        return bool(want["kept"])
    return judge


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
                sensitivity: Optional[dict], too_small: Callable[[float], str], check: Optional[PlanCheck] = None
                ) -> tuple[dict[str, int], dict[str, int], dict[str, str]]:
    """(start, chosen level index, reason per promoted layer) for a mix within `target_bits`
    per weight: every layer starts where `start_of` says, a target below that plan is a
    ConfigError (`too_small(bits)` its message), then greedy promotion on the measured table.

    With `check` (the sensitivity stage) the promotion goes in stretches, each kept only if
    the whole plan measures better (`promote_checked`), and `check.record` says how each
    went; a table that holds such a record (its `check`) replays those verdicts, except in a
    repair round (its own `objective`), which plans from its start on the table alone."""
    weights = {name: out * inp for name, (out, inp) in layers.items()}
    start = {name: start_of(sensitivity or {}, name, levels[name]) for name in layers}
    floor = planned_bits_per_weight(levels, start, weights)
    if floor > target_bits + 1e-9:
        raise ConfigError(too_small(floor))
    candidates = list(dict.fromkeys(level.key for options in levels.values() for level in options if level.key))
    measured = require_sensitivity(setting, layers, sensitivity, candidates)
    objective = objective_of(sensitivity)
    budget = target_bits * sum(weights.values())

    def cost(name: str, level: Level) -> float:
        return divergence(measured[name], level.key, objective)
    recorded = None if sensitivity.get("objective") else sensitivity.get("check")
    if check is not None:
        check.begin(levels, start, weights)
        chosen, made, check.record["steps"] = promote_checked(levels, weights, start, budget, cost, check.stretches,
                                                              check)
    elif recorded:
        chosen, made, steps = promote_checked(levels, weights, start, budget, cost, recorded["stretches"],
                                              replayed(setting, recorded["steps"]))
        if len(steps) != len(recorded["steps"]):
            raise ConfigError(_not_replayed(setting))
    else:
        chosen, made = promote(levels, weights, start, budget, cost)
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
