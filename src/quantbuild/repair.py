"""The closed loop: repair a planned variant that fails a family's budget at the gate.

"If quality regressions cluster in one task family, you raise precision for the critical
layers." For each planned variant of the ladder (a GGUF auto-mix or a GPTQ `mixed` variant)
that the gate fails on family checks only, each round

1. re-plans from the variant's current plan (no layer is lowered) with the objective set to
   the failing families' KL (the sensitivity stage measured each layer's KL on each family's
   answer positions, at every candidate format), `repair.step_bits` more bits per weight
   than the last round, never above `repair.max_bits_per_weight`;
2. rebuilds the variant with that plan (`<variant>_r<k>`), evaluates it on every deploy
   target of the run against the same baselines, and gates it again.

A variant is repaired for the targets where it fails family budgets only (its families
there, together); a round passes when it passes on each of them.

It stops at the first round that passes, when the size ceiling or `repair.max_rounds` is
reached, or when a check other than a family budget fails. Every round (what it promoted,
from which format to which, the KL it removed on which families, what still failed) and the
verdict go to `repair.json`, which the select stage puts in `decision.json`. Only the last
round's build is kept; it competes in the gate like any ladder variant.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

from quantbuild.evaluation.runner import MEASUREMENTS, OUTCOMES, target_dir
from quantbuild.gate import describe, select
from quantbuild.hashing import read_json, staged_dir, write_json
from quantbuild.quantization import MODEL_DIR, RECORD, build_variant, pipeline_inputs
from quantbuild.quantizers.planner import candidates_of
from quantbuild.sensitivity import load_sensitivity

REPAIR = "repair.json"
QUANTIZED, EVALUATED = "quantized", "eval"
SEPARATE_VARIANT = ("a separate model variant for that workload (or a larger size) is the user's call: "
                    "raise repair.max_bits_per_weight, or relax the family's budget knowingly")


def measured(folder: Path) -> dict:
    """A variant's measurements with its per-item outcomes, as the gate reads them."""
    return {**read_json(folder / MEASUREMENTS), "outcomes": read_json(folder / OUTCOMES)}


def family_failures(entry: dict) -> tuple[list[str], list[dict]]:
    """(families whose budget failed, every other failed check) of one gated variant."""
    failed = [check for check in entry["checks"] if not check["pass"]]
    families = sorted(check["budget"][: -len("_drop")] for check in failed
                      if check["kind"] == "quality" and check["budget"].endswith("_drop"))
    others = [check for check in failed if not (check["kind"] == "quality" and check["budget"].endswith("_drop"))]
    return families, others


def _target_field(variant: Any) -> str:
    return "target_bpw" if variant.method == "gguf" else "target_bits"


def _precisions(record: dict) -> dict[str, Any]:
    """Each layer's precision in a quantize record: a llama.cpp type, or [bits, group size]."""
    if record["method"] == "gguf":
        return {name: entry["type"] for name, entry in record["layers"].items()}
    return {name: [entry["bits"], entry["group_size"]] for name, entry in record["layers"].items()}


def _promoted(before: dict[str, Any], record: dict) -> list[dict]:
    after = _precisions(record)
    return [{"layer": name, "from": before[name], "to": after[name], "reason": record["layers"][name].get("reason", "")}
            for name in sorted(after) if after[name] != before.get(name)]


def repair_variant(config: Any, name: str, baselines: dict[str, dict], entries: dict[str, dict], record: dict,
                   out: Path, log: Callable[[str], None]) -> dict:
    """The rounds for one failing planned variant, built under `out/quantized` and evaluated
    on every target under `out/eval/<target>`. `entries`: its gate entry on each target it
    is repaired for (where it fails family budgets only)."""
    from quantbuild.evaluation.runner import evaluate_on_ladder

    variant, settings, paths = config.quant.variants[name], config.repair, config.paths
    failed_at_first = sorted({family for entry in entries.values() for family in family_failures(entry)[0]})
    families = failed_at_first
    sensitivity = load_sensitivity(Path(paths.sensitivity), name)
    field = _target_field(variant)
    start, target = _precisions(record), float(getattr(variant, field))
    rounds: list[dict] = []
    kept: Optional[str] = None
    verdict = ""
    for number in range(1, settings.max_rounds + 1):
        target = round(min(settings.max_bits_per_weight, target + settings.step_bits), 6)
        if target <= (rounds[-1]["target_bits_per_weight"] if rounds else float(getattr(variant, field))):
            verdict = f"could not repair {', '.join(families)}: repair.max_bits_per_weight={settings.max_bits_per_weight} reached"
            break
        repaired = f"{name}_r{number}"
        request = {**sensitivity, "objective": {family: 1.0 for family in families}, "start": start}
        built = replace(variant, **{field: target})
        folder = out / QUANTIZED / repaired
        record_now = build_variant(repaired, built, pipeline_inputs(config, built, request), folder)
        gated = {}
        for deploy in config.eval.targets:
            evaluated = out / EVALUATED / deploy / repaired
            evaluate_on_ladder(config, folder / MODEL_DIR, getattr(built, "kv_cache_type", "f16"), evaluated, deploy)
            if deploy in entries:
                gated[deploy] = select(baselines[deploy], {repaired: measured(evaluated)}, {repaired: record_now},
                                       config.gate, deploy)["variants"][repaired]
        failing = sorted({family for entry in gated.values() for family in family_failures(entry)[0]})
        others = [check for entry in gated.values() for check in family_failures(entry)[1]]
        passed = all(entry["pass"] for entry in gated.values())
        rounds.append({
            "round": number, "variant": repaired, "target_bits_per_weight": target,
            "bits_per_weight": record_now["bits_per_weight"], "size_bytes": record_now["size_bytes"],
            "objective": sorted(families), "promoted": _promoted(start, record_now),
            "failed": [f"{deploy}: {describe(check)}" for deploy, entry in gated.items()
                       for check in entry["checks"] if not check["pass"]],
            "pass": passed, "targets": sorted(gated),
        })
        log(f"repair {repaired}: {target} bits/weight target, {len(rounds[-1]['promoted'])} layers promoted, "
            f"{'passes' if passed else 'fails ' + ', '.join(failing + [c['budget'] for c in others])}")
        if kept is not None:
            shutil.rmtree(out / QUANTIZED / kept)
            for deploy in config.eval.targets:
                shutil.rmtree(out / EVALUATED / deploy / kept)
        kept = repaired
        if passed:
            verdict = f"repaired in round {number}: {repaired} ({record_now['bits_per_weight']} bits/weight) passes"
            break
        if others:
            verdict = (f"not repairable by precision: {repaired} also fails "
                       f"{', '.join(sorted({check['budget'] for check in others}))}")
            break
        families = failing or families
        start = _precisions(record_now)
    if not verdict:
        verdict = f"could not repair {', '.join(families)} in repair.max_rounds={settings.max_rounds} rounds"
    repaired_ok = bool(rounds and rounds[-1]["pass"])
    return {"status": "repaired" if repaired_ok else "unrepaired", "failed_families": failed_at_first,
            "targets": sorted(entries), "rounds": rounds, "final": kept, "verdict": verdict,
            **({} if repaired_ok else {"advice": SEPARATE_VARIANT})}


def repair_ladder(config: Any, out: Path, log: Callable[[str], None]) -> dict:
    """Gate the ladder on every target; repair every planned variant that fails family
    budgets only on some target; write `out/repair.json` (and the kept builds) and return it."""
    paths = config.paths
    names = sorted(config.quant.variants)
    records = {name: read_json(Path(paths.quantized) / name / RECORD) for name in names}
    baselines, decisions = {}, {}
    for deploy in config.eval.targets:
        baselines[deploy] = measured(target_dir(config, deploy) / "baseline")
        variants = {name: measured(target_dir(config, deploy) / name) for name in names}
        decisions[deploy] = select(baselines[deploy], variants, records, config.gate, deploy)
    result: dict[str, Any] = {"config": asdict(config.repair), "variants": {}}
    with staged_dir(out) as staging:
        for name in names:
            if not candidates_of(config.quant.variants[name]):
                continue
            entries = {deploy: decision["variants"][name] for deploy, decision in decisions.items()}
            failing = {deploy: entry for deploy, entry in entries.items() if not entry["pass"]}
            kinds = {deploy: family_failures(entry) for deploy, entry in failing.items()}
            repairable = {deploy: failing[deploy] for deploy, (families, others) in kinds.items()
                          if families and not others}
            if not failing:
                outcome = {"status": "not needed", "verdict": "passes the gate as planned"}
            elif not repairable:
                failed = [check for entry in failing.values() for check in entry["checks"] if not check["pass"]]
                outcome = {"status": "not repairable",
                           "verdict": f"fails {', '.join(sorted({check['budget'] for check in failed}))}: only family "
                                      f"budgets are repaired by raising precision"}
            elif config.repair.max_rounds == 0:
                families = sorted({family for deploy in repairable for family in kinds[deploy][0]})
                outcome = {"status": "off", "verdict": f"fails {', '.join(families)}; repair.max_rounds=0"}
            else:
                outcome = repair_variant(config, name, baselines, repairable, records[name], staging, log)
            result["variants"][name] = outcome
        write_json(staging / REPAIR, result)
    return result


def repaired_variants(repair: Optional[dict]) -> dict[str, str]:
    """Kept repair builds: repaired name -> the ladder variant it repairs."""
    return {outcome["final"]: name for name, outcome in sorted(((repair or {}).get("variants") or {}).items())
            if outcome.get("final")}


def locate(paths: Any, name: str, target: str) -> tuple[Path, Path]:
    """(quantize folder, eval folder on deploy target `target`) of a ladder variant, a kept
    repair build or the baseline (`baseline`, whose quantize folder is the baseline's)."""
    repaired = Path(paths.repair) / QUANTIZED / name
    if repaired.is_dir():
        return repaired, Path(paths.repair) / EVALUATED / target / name
    return Path(paths.quantized) / name, Path(paths.eval) / target / name
