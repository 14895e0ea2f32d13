"""What the sensitivity stage scores, and so what a plan is chosen on: the probe sets.

One set of the calibration mix (`calibration.sensitivity.samples` samples, every position)
and one per task family (the answer positions of fresh items of that family, as many as fit
in `calibration.sensitivity.family_tokens` tokens, at a seed of their own:
quantbuild.tasks.write_data). The sensitivity stage measures on them; plan validation
rebuilds them from a table to report a plan's divergence on its own tokens beside held-out
text's (`planner_probes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from quantbuild.config import SensitivityConfig
from quantbuild.tasks.write_data import SENSITIVITY_ITEMS, SENSITIVITY_SEED

# The task families the gate budgets (language modelling is the calibration mix's KL).
FAMILIES = ("long_context", "reasoning", "retrieval", "structured")
# Items for the per-family measurement, at a seed of their own.
FAMILY_SEED = SENSITIVITY_SEED
MAX_FAMILY_ITEMS = SENSITIVITY_ITEMS
CALIBRATION = "calibration"


@dataclass(frozen=True)
class Probe:
    """Token IDs and the positions whose next-token distribution is compared."""

    ids: list[int]
    first: int  # the first scored position (predicting token first + 1)


def probe_sets(tokenizer: Any, calibration: list[list[int]], config: SensitivityConfig) -> dict[str, list[Probe]]:
    """`calibration`: the first `config.samples` samples, every position; one set per family:
    generated items, in order, until their tokens reach `config.family_tokens` (so a family of
    short answers gets as many scored positions as it needs, one of long contexts as few
    items as its length allows), the positions that predict the answer."""
    from quantbuild.tasks import GENERATORS

    sets = {CALIBRATION: [Probe(list(ids), 0) for ids in calibration[: config.samples] if len(ids) > 1]}
    if config.family_tokens:
        for family in FAMILIES:
            sets[family] = _answers(tokenizer, GENERATORS[family](MAX_FAMILY_ITEMS, FAMILY_SEED), config.family_tokens)
    return sets


def check_sets(tokenizer: Any, calibration: list[list[int]], config: SensitivityConfig) -> dict[str, list[Probe]]:
    """The probes whole plans are checked on while the planner promotes (held out from the
    table's own, `probe_sets`): the next `config.samples` calibration samples, and per family
    items drawn at PLAN_CHECK_SEED less any prompt the table's items, the eval files or the
    golden example hold, as many as `probe_sets` takes."""
    sets = {CALIBRATION: [Probe(list(ids), 0) for ids in calibration[config.samples: 2 * config.samples]
                          if len(ids) > 1]}
    if config.family_tokens:
        for family in FAMILIES:
            sets[family] = _answers(tokenizer, check_items(family), config.family_tokens)
    return {name: probes for name, probes in sets.items() if probes}


def check_items(family: str) -> list:
    """The family's items drawn at PLAN_CHECK_SEED, less any prompt the table's items
    (`probe_sets`), the eval files or the golden example hold."""
    from quantbuild.tasks import GENERATORS
    from quantbuild.tasks.write_data import EVAL_COUNTS, EVAL_SEED, PLAN_CHECK_SEED, golden_example

    held = {item.prompt for item in golden_example()}
    held |= {item.prompt for seed, count in ((FAMILY_SEED, MAX_FAMILY_ITEMS), (EVAL_SEED, EVAL_COUNTS[family]))
             for item in GENERATORS[family](count, seed)}
    return [item for item in GENERATORS[family](MAX_FAMILY_ITEMS, PLAN_CHECK_SEED) if item.prompt not in held]


def _answers(tokenizer: Any, items: Any, tokens: int) -> list[Probe]:
    """Probes of `items`, in order, until their tokens reach `tokens`: prompt and expected
    answer, scored on the positions that predict the answer. For an instruct model (its
    tokenizer has a chat template) the conversation through the template and the answer
    turn, as the deployed model reads them (and as plan validation scores them)."""
    from quantbuild.prompts import conversation_pair, tokenizer_template
    from quantbuild.tasks import training_pair

    template = tokenizer_template(tokenizer)
    probes: list[Probe] = []
    counted = 0
    for item in items:
        prompt, target = training_pair(item) if template is None else conversation_pair(item, template)
        start = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + target)["input_ids"]
        if len(ids) > start:
            probes.append(Probe(ids, start - 1))
            counted += len(ids)
        if counted >= tokens:
            break
    return probes


def probes_digest(sets: dict[str, list[Probe]]) -> dict[str, dict]:
    from quantbuild.hashing import sha256_bytes

    return {name: {"sequences": len(probes), "scored_tokens": sum(len(p.ids) - 1 - p.first for p in probes),
                   "digest": sha256_bytes(json.dumps([[p.first, p.ids] for p in probes]).encode())}
            for name, probes in sets.items()}


def planner_probes(baseline: Path, calibration: list[list[int]], table: dict) -> Optional[list[tuple[list[int], int]]]:
    """The token sequences a plan was chosen on, each with its first scored position (the
    sensitivity table's probe sets, rebuilt and checked against its digests); None where the
    table does not say how they were drawn or they no longer match."""
    settings = table.get("probe_settings")
    if not settings:
        return None
    from transformers import AutoTokenizer

    sets = probe_sets(AutoTokenizer.from_pretrained(str(baseline)), calibration,
                      SensitivityConfig(samples=settings["samples"], family_tokens=settings["family_tokens"]))
    if probes_digest(sets) != table.get("probes"):
        return None
    return [(probe.ids, probe.first) for probes in sets.values() for probe in probes]
