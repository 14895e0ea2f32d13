"""The planner's check of whole plans (issue #28, item 2): promotion in stretches of the
budget, each kept only where a measurement of the whole plan improves, and the quantize
stage's replay of those verdicts from the sensitivity table."""

import copy

import pytest

from quantbuild.errors import ConfigError
from quantbuild.quantizers.planner import ATTEMPTS, Level, PlanCheck, plan_levels

LAYERS = {name: (10, 10) for name in ("a", "b", "c", "d")}
LEVELS = {name: [Level(f"T{bits}", float(bits), f"T{bits}") for bits in (2, 4, 8)] for name in LAYERS}
# the table: layer a looks the most sensitive by far, the others less and less
TABLE_KL = {"a": {"T2": 9.0, "T4": 1.0, "T8": 0.1}, "b": {"T2": 4.0, "T4": 1.0, "T8": 0.5},
            "c": {"T2": 3.0, "T4": 1.5, "T8": 1.0}, "d": {"T2": 2.0, "T4": 1.9, "T8": 1.8}}


def _table() -> dict:
    return {"candidates": ["T2", "T4", "T8"],
            "layers": {name: {"weights": 100, "kld": {key: {"calibration": value} for key, value in kl.items()}}
                       for name, kl in TABLE_KL.items()}}


def _whole(plan: dict) -> dict:
    """A whole-plan measurement where the table misleads: widening layer a makes the model
    worse (its error cancelled another's), so whole plans with it wider measure higher."""
    total = sum(TABLE_KL[name][level.key] for name, level in plan.items())
    return {"calibration": total + (40.0 if plan["a"].key != "T2" else 0.0), "structured": total}


def _plan(table: dict, check=None) -> dict:
    _, chosen, _ = plan_levels("quant.variants.mix.target_bpw=5", LAYERS, LEVELS, 5.0, table,
                               lambda floor: f"below {floor}", check)
    return {name: LEVELS[name][index].key for name, index in chosen.items()}


def test_a_stretch_the_whole_plan_refutes_is_undone_and_its_bits_spent_elsewhere():
    table = _table()
    # on the table alone the greedy widens a first
    assert _plan(table)["a"] != "T2"
    calls = []

    def measure(plan):
        calls.append(plan)
        return _whole(plan)
    check = PlanCheck(3, measure, {"seed": 0})
    plan = _plan(table, check)
    steps = check.record["steps"]
    assert plan["a"] == "T2", plan
    # the budget (5 bits a weight over 400 weights) holds, and is spent on the others
    assert sum(int(key[1:]) for key in plan.values()) * 100 <= 5.0 * 400 and plan != {n: "T2" for n in LAYERS}
    refused = [step for step in steps if not step["kept"]]
    assert refused and refused[0]["stretch"] == 1
    # every kept stretch lowers the measured mean, from the start's
    means = [sum(check.record["start"]["kld"].values()) / 2]
    for step in steps:
        mean = sum(step["kld"].values()) / 2
        assert (mean < means[-1]) == step["kept"], steps
        if step["kept"]:
            means.append(mean)
    # one measurement of the start and one per step, at most ATTEMPTS per stretch
    assert len(calls) == 1 + len(steps) <= 1 + ATTEMPTS * 3
    # the quantize stage replays the verdicts from the table, with no measurement
    recorded = {**table, "check": check.record}
    assert _plan(recorded) == plan
    # a repair round (its own objective) plans on the table alone
    assert _plan({**recorded, "objective": {"calibration": 1.0}}) == _plan(table)


@pytest.mark.parametrize("edit", ["promotions", "missing", "extra"])
def test_a_table_whose_check_does_not_replay_is_one_line(edit):
    check = PlanCheck(3, _whole, {})
    _plan(_table(), check)
    record = copy.deepcopy(check.record)
    if edit == "promotions":
        record["steps"][0]["promotions"] += 1
    elif edit == "missing":
        record["steps"].pop()
    else:
        record["steps"].append(dict(record["steps"][-1], stretch=99))
    with pytest.raises(ConfigError) as error:
        _plan({**_table(), "check": record})
    assert "does not replay" in str(error.value) and "\n" not in str(error.value)
