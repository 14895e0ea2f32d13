"""A variant's generative families answered until the gate's verdict on them is decided.

The gate decides a family from the paired interval of its drop against the baseline, on the
same items (gate.py): a budgeted family passes when the interval's upper end is within its
budget; a must-not-degrade family fails when the interval's lower end is above zero. Fewer
items than the whole family often decide it already. So a variant's evaluation answers each
gated family in steps, at the looks `eval.sequential.looks` (item counts, in the eval file's
order, which the generators interleave over their strata: the long-context family cycles
through every context length and depth), and after each step computes the same interval at
the stricter `eval.sequential.z`. The family stops where that interval decides:

- a budgeted family passes once the upper end is within its budget, and fails once the lower
  end is beyond it;
- a must-not-degrade family fails once the lower end is above zero; it never stops early to
  pass, since only every item can show the absence of a drop the gate asks for.

Otherwise it goes on to its last item, where the gate's own 95% interval decides as always.
The baseline answers every item (each variant is paired with it). A user's golden families
are always answered whole: their order is the user's, not a generator's.

The error this adds (Haybittle-Peto boundaries, bounded by Bonferroni): at z = 3 a look
reaches a wrong verdict in its deciding direction with probability at most 0.00135, so with
k looks a family's chance of a wrong verdict is at most 0.025 + k x 0.00135 (0.0277 with the
default two looks) against the final look's 0.025 alone. The gate recomputes every stopped
family's interval from the stored outcomes at the recorded z and refuses one that no longer
decides (its budgets changed since the evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from quantbuild.config import GateConfig
from quantbuild.evaluation.stats import paired_drop_interval

BUDGET, MUST_NOT_DEGRADE = "budget", "must_not_degrade"
PASS, FAIL = "pass", "fail"


def family_rules(gate: GateConfig) -> dict[str, tuple[str, float]]:
    """Each gated family -> (its rule, the largest drop it allows): a budget, or 0.0 for a
    family that must not degrade."""
    return {**{family: (BUDGET, float(limit)) for family, limit in gate.max_family_drop.items()},
            **{family: (MUST_NOT_DEGRADE, 0.0) for family in gate.must_not_degrade}}


def early_verdict(rule: str, limit: float, baseline: list[bool], variant: list[bool], z: float) -> Optional[str]:
    """PASS or FAIL where the paired interval at `z` decides the family's rule, else None."""
    _, low, high = paired_drop_interval(baseline, variant, z)
    return verdict_of(rule, limit, low, high)


def verdict_of(rule: str, limit: float, low: float, high: float) -> Optional[str]:
    """PASS or FAIL where the drop's interval [low, high] decides the family's rule, else None."""
    if rule == BUDGET and high <= limit:
        return PASS
    if low > limit:
        return FAIL
    return None


@dataclass(frozen=True)
class Sequential:
    """The baseline's per-item outcomes and the gate's family rules, for deciding at each
    look whether a variant's family may stop (`families`: those that may; looks in items)."""

    baseline: dict[str, dict[str, float]]
    rules: dict[str, tuple[str, float]]
    looks: tuple[int, ...]
    z: float
    families: frozenset[str]

    def steps(self, family: str, total: int) -> list[int]:
        """The item counts after which `family` is answered so far: its looks, then all."""
        if family not in self.families or family not in self.rules:
            return [total]
        return sorted({look for look in self.looks if 0 < look < total}) + [total]

    def decide(self, family: str, answered: dict[str, float]) -> Optional[str]:
        """PASS or FAIL where the items answered so far (id -> 1 when correct) decide the
        family against the baseline's answers on them, else None."""
        rule, limit = self.rules[family]
        ids = sorted(answered)
        before = self.baseline.get(family, {})
        if any(item not in before for item in ids):
            return None  # not the baseline's items: answered whole, and the gate says why
        return early_verdict(rule, limit, [before[item] >= 1 for item in ids], [answered[item] >= 1 for item in ids],
                             self.z)
