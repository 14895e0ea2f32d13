"""The release gate: a variant is released only for a win measured on its deploy target.

Every variant is measured on the runtime it ships for, against the baseline measured on
that runtime in the same run, and gets three kinds of checks:

- quality: perplexity, KLD, top-1 agreement, and per family the drop in score with a paired
  95% interval (baseline and variant answer the same items). A budgeted family fails when
  the interval's upper end exceeds its budget; a `must_not_degrade` family fails when the
  interval shows a real drop (its lower end above zero). One item more or less does not flip
  a verdict that the interval decides. A variant's family whose evaluation stopped at a look
  (evaluation/sequential.py: its verdict already decided on fewer items, at a stricter z) is
  decided on those items at that z. Degenerate outputs (loops, no stop, a foreign script)
  over every generative item the variant answered are paired the same way: by default a
  variant may not show more of them than the baseline.
- win: smaller model memory at the gate's context than the baseline (weights, KV cache,
  runtime buffers, as the runtime reports them), and "not slower": TTFT and decode time per
  token timed interleaved with the baseline, decided against the limit plus the noise
  margin: pass when every ratio's interval lies at or below it, fail when one lies wholly
  above it, and otherwise undecided, which does not pass. The evaluation re-measures an
  undecided ratio up to `eval.latency.max_rounds` rounds first; a variant is released on a
  measured verdict, never because noise could not show it slower.
- limit: absolute ceilings (peak memory, a p99 tail ratio) where configured.

The gate walks the variants from the most compressed to the least and releases the first
that passes everything. If none does, it keeps the higher precision: the ladder's
baseline-precision variant (`fallback: baseline`, when it passes the quality checks) or
nothing (`fallback: none`, and the select stage fails).
"""

from __future__ import annotations

from typing import Any, Optional

from quantbuild.config import GateConfig
from quantbuild.errors import GateError
from quantbuild.evaluation.latency import deciding_ratio, decision_bound, verdict
from quantbuild.evaluation.sequential import BUDGET, family_rules, verdict_of
from quantbuild.evaluation.stats import Z95, paired_drop_interval
from quantbuild.runtimes import TARGET_RUNTIME, target_of

RULE = ("release the smallest variant that, on its deploy target against the baseline measured there, passes every "
        "quality check and shows an operational win (less model memory, measured not slower); if none does, keep "
        "the higher precision")
BASELINE_PRECISION_BITS = 16.0


def _check(budget: str, kind: str, measured: float, limit: float, higher_is_better: bool = False,
           interval: Optional[tuple[float, float]] = None, applies_to: str = "value") -> dict[str, Any]:
    """One check. `applies_to` names what is compared with the limit: the value, or one end
    of its interval (`ci_low`, `ci_high`)."""
    tested = {"value": measured, "ci_low": interval[0] if interval else measured,
              "ci_high": interval[1] if interval else measured}[applies_to]
    passed = tested >= limit if higher_is_better else tested <= limit
    check = {"budget": budget, "kind": kind, "measured": round(measured, 6), "limit": round(limit, 6),
             "direction": ">=" if higher_is_better else "<=", "applies_to": applies_to, "pass": bool(passed)}
    if interval is not None:
        check["interval"] = [round(interval[0], 6), round(interval[1], 6)]
    return check


def describe(check: dict[str, Any]) -> str:
    """`name = value [low, high] violates <= limit (interval's upper end)` for a failed check;
    for an undecided one, `undecided: too noisy: ...` with the rounds it was measured over."""
    if not isinstance(check["measured"], (int, float)):
        return f"{check['budget']} = {check['measured']} violates {check['direction']} {check['limit']}"
    interval = f" [{check['interval'][0]:.4g}, {check['interval'][1]:.4g}]" if "interval" in check else ""
    if check.get("verdict") == "undecided":
        return (f"undecided: too noisy: {check['budget']} = {check['measured']:.4g}{interval} reaches both sides of "
                f"{check['limit']:.4g} after {check['rounds']} rounds")
    where = {"ci_low": " (interval's lower end)", "ci_high": " (interval's upper end)"}.get(check.get("applies_to"), "")
    return f"{check['budget']} = {check['measured']:.4g}{interval} violates {check['direction']} {check['limit']:.4g}{where}"


def _family_checks(baseline: dict, variant: dict, gate: GateConfig) -> list[dict[str, Any]]:
    checks = []
    stopped = variant.get("sequential", {}).get("stopped", {})
    for family, (rule, limit) in sorted(family_rules(gate).items()):
        before = baseline["outcomes"].get(family, {})
        after = variant["outcomes"].get(family, {})
        stop = stopped.get(family)
        ids = _paired_items(family, before, after, stop)
        paired = ([before[i] >= 1 for i in ids], [after[i] >= 1 for i in ids])
        drop, low, high = paired_drop_interval(*paired, variant["sequential"]["z"] if stop else Z95)
        if rule == BUDGET:
            checks.append(_check(f"{family}_drop", "quality", drop, limit, interval=(low, high), applies_to="ci_high"))
        else:
            checks.append(_check(f"{family}_drop", "quality", drop, 0.0, interval=(low, high), applies_to="ci_low"))
        checks[-1].update({"rule": rule, "n": len(ids)})
        if stop:
            # the family stopped at a look: decided there, at the look's z (evaluation/sequential.py)
            if verdict_of(rule, limit, low, high) != stop["verdict"]:
                raise GateError(f"gate: {family}: its evaluation stopped at {stop['items']} of {stop['of']} items on "
                                f"a verdict these budgets do not give (the gate changed since: `dvc repro -f` evaluates again)")
            checks[-1].update({"of": stop["of"], "z": variant["sequential"]["z"],
                               "scores_on_these_items": [round(sum(side) / len(ids), 6) for side in paired]})
    return checks


def _paired_items(family: str, before: dict, after: dict, stop: Optional[dict]) -> list[str]:
    """The items the baseline and the variant both answered: all of the family's, or, where
    the variant's family stopped at a look, the ones it reached (each of them the baseline's)."""
    if stop is None or len(after) == len(before):
        if sorted(before) != sorted(after):
            raise GateError(f"gate: {family}: the baseline and the variant were scored on different items "
                            f"(re-run `dvc repro` so both are evaluated on the same eval data)")
        return sorted(before)
    if len(after) != stop["items"] or len(before) != stop["of"] or not set(after) <= set(before):
        raise GateError(f"gate: {family}: the variant's evaluation stopped at {stop['items']} of {stop['of']} items, "
                        f"but its outcomes hold {len(after)} items, not all of them the baseline's {len(before)} "
                        f"(re-run `dvc repro`)")
    return sorted(after)


def _degenerate_check(baseline: dict, variant: dict, gate: GateConfig) -> Optional[dict[str, Any]]:
    """More degenerate items than the baseline on the same items (paired interval): every
    generative item the variant answered (a family stopped at a look answered fewer)."""
    if gate.max_degenerate_increase is None:
        return None
    before = baseline["outcomes"].get("degenerate", {})
    after = variant["outcomes"].get("degenerate", {})
    if not before and not after:
        return None
    unanswered = sum(stop["of"] - stop["items"] for stop in variant.get("sequential", {}).get("stopped", {}).values())
    if not after or not set(after) <= set(before) or len(before) - len(after) != unanswered:
        raise GateError("gate: degenerate outputs: the baseline and the variant were checked on different items "
                        "(re-run `dvc repro` so both are evaluated on the same eval data)")
    ids = sorted(after)
    increase, low, high = paired_drop_interval([before[i] >= 1 for i in ids], [after[i] >= 1 for i in ids])
    check = _check("degenerate_increase", "quality", increase, gate.max_degenerate_increase, interval=(low, high),
                   applies_to="ci_low")
    check.update({"n": len(ids), "baseline_items": sum(before[i] < 1 for i in ids),
                  "variant_items": sum(after[i] < 1 for i in ids)})
    return check


def _latency_win(baseline: dict, variant: dict, gate: GateConfig) -> Optional[dict[str, Any]]:
    """"Not slower", with its `verdict`: pass, fail, or undecided (which does not pass)."""
    limit = decision_bound(gate.max_latency_paired_ratio, gate.latency_noise_margin)
    if limit is None:
        return None
    paired = variant.get("latency_vs_baseline")
    if paired is not None:
        # every interleaved ratio, decided against this gate's own bound (not the one the
        # evaluation re-measured against, should the gate have changed since)
        worst = deciding_ratio(paired["by_length"], limit)
        found = verdict(worst["ci_low"], worst["ci_high"], limit)
        check = _check("latency_ratio", "win", worst["ratio"], limit, interval=(worst["ci_low"], worst["ci_high"]),
                       applies_to="ci_low" if found == "fail" else "ci_high")
        check.update({"verdict": found, "at": worst["at"], "rounds": worst["runs"],
                      "timing": "interleaved with the baseline in one process"})
        return check
    # Runtimes without interleaved timing: median ratios of the two latency stages, no interval.
    ratios = [(variant["latency"][length][key] / baseline["latency"][length][key], f"{key}@{length}")
              for length in sorted(baseline["latency"], key=int)
              for key in ("ttft_ms_p50", "decode_ms_per_token_p50") if baseline["latency"][length].get(key)]
    ratio, where = max(ratios)
    check = _check("latency_ratio", "win", ratio, limit)
    check.update({"verdict": "pass" if check["pass"] else "fail", "at": where,
                  "timing": "separate stages (no interval)"})
    return check


def check_variant(baseline: dict, variant: dict, gate: GateConfig) -> list[dict[str, Any]]:
    """Every check of `gate` applied to one variant's metrics (with their `outcomes`)."""
    checks = []
    if "perplexity" in baseline:
        increase = (variant["perplexity"] / baseline["perplexity"] - 1) * 100
        checks += [
            _check("perplexity_increase_pct", "quality", increase, gate.max_perplexity_increase_pct),
            _check("kld_mean", "quality", variant["kld_mean"], gate.max_kld_mean),
            _check("kld_p99", "quality", variant["kld_p99"], gate.max_kld_p99),
            _check("top1_agreement", "quality", variant["top1_agreement"], gate.min_top1_agreement,
                   higher_is_better=True),
        ]
    checks += _family_checks(baseline, variant, gate)
    degenerate = _degenerate_check(baseline, variant, gate)
    if degenerate is not None:
        checks.append(degenerate)
    context = str(gate.memory_context)
    if gate.max_memory_ratio is not None:
        ratio = variant["memory"]["by_context"][context]["peak_mb"] / baseline["memory"]["by_context"][context]["peak_mb"]
        checks.append(_check(f"memory_ratio@{gate.memory_context}", "win", ratio, gate.max_memory_ratio))
    latency = _latency_win(baseline, variant, gate)
    if latency is not None:
        checks.append(latency)
    if gate.max_latency_p99_ratio is not None:
        checks.append(_check("latency_p99_ratio", "limit", latency_ratio(baseline["latency"], variant["latency"]),
                             gate.max_latency_p99_ratio))
    if gate.max_peak_memory_mb is not None:
        peak = variant["memory"]["by_context"][context]["peak_mb"]
        checks.append(_check(f"peak_memory_mb@{gate.memory_context}", "limit", peak, gate.max_peak_memory_mb))
    return checks


def latency_ratio(baseline: dict, variant: dict) -> float:
    """The worst variant/baseline ratio of p99 time to first token and p99 decode time."""
    ratios = [
        variant[length][key] / baseline[length][key]
        for length in baseline
        for key in ("ttft_ms_p99", "decode_ms_per_token_p99")
        if baseline[length][key] > 0
    ]
    return max(ratios)


def _target_check(baseline: dict, variant: dict, record: dict, target: Optional[str]) -> dict[str, Any]:
    """Validated on its target: the variant and the baseline were both measured on the
    runtime the variant ships for, and on the deploy target (`llama.cpp-cuda`) decided for."""
    shipped_for = target_of(record.get("method", ""), record.get("target"))
    runtime = TARGET_RUNTIME.get(shipped_for, shipped_for)
    if target is None:
        measured_on, baseline_on, limit = variant.get("deploy_runtime"), baseline.get("deploy_runtime"), runtime
    else:
        measured_on, baseline_on, limit = variant.get("target"), baseline.get("target"), target
    ok = measured_on == limit and baseline_on == limit and variant.get("deploy_runtime") == runtime
    return {"budget": "validated_on_target", "kind": "target", "measured": measured_on,
            "baseline_measured_on": baseline_on, "limit": limit, "direction": "==",
            "applies_to": "value", "pass": bool(ok)}


def select(baseline: dict, variants: dict[str, dict], records: dict[str, dict], gate: GateConfig,
           target: Optional[str] = None) -> dict:
    """The gate decision on one deploy target (with `chosen` None when nothing may be
    released there).

    `baseline` and `variants` map to metrics with each one's per-item `outcomes` added, all
    measured on `target`; `records` maps name -> quantize record (method, size, bits).
    """
    order = sorted(variants, key=lambda name: (records[name]["size_bytes"], records[name]["bits_per_weight"], name))
    decision: dict[str, Any] = {"chosen": None, "target": target, "rule": RULE, "fallback": gate.fallback, "fell_back": False,
                                "order_most_compressed_first": order, "variants": {}}
    for name in order:
        record = records[name]
        checks = [_target_check(baseline, variants[name], record, target),
                  *check_variant(baseline, variants[name], gate)]
        baseline_precision = record["bits_per_weight"] >= BASELINE_PRECISION_BITS
        failed = [check for check in checks if not check["pass"]]
        decision["variants"][name] = {
            "target": target_of(record.get("method", ""), record.get("target")),
            "pass": not failed,
            "size_bytes": record["size_bytes"],
            "bits_per_weight": record["bits_per_weight"],
            "baseline_precision": baseline_precision,
            "wins": {check["budget"].split("@")[0]: check["pass"] for check in checks if check["kind"] == "win"},
            "checks": checks,
            **_validation(record),
        }
    quantized = [name for name in order if not decision["variants"][name]["baseline_precision"]]
    passing = [name for name in quantized if decision["variants"][name]["pass"]]
    if passing:
        decision["chosen"] = passing[0]
    elif gate.fallback == "baseline":
        keepable = [name for name in order if decision["variants"][name]["baseline_precision"]
                    and all(c["pass"] for c in decision["variants"][name]["checks"] if c["kind"] in ("quality", "target"))]
        if keepable:
            decision["chosen"], decision["fell_back"] = keepable[0], True
    for name in order:
        decision["variants"][name]["reason"] = _reason(name, decision)
    return decision


def _validation(record: dict) -> dict:
    """A planned mix's check against llama.cpp's presets (quantbuild.plan_validation), as
    the decision carries it: what shipped, the best preset no larger, and one line."""
    validation = record.get("validation")
    if not validation:
        return {}
    from quantbuild.plan_validation import describe

    return {"validation": {"shipped": validation["shipped"], "best_alternative": validation.get("best_alternative"),
                           "kld_mean": {name: entry["kld_mean"] for name, entry in validation["measured"].items()},
                           "text_sha256": validation["text"]["sha256"], "line": describe(validation)}}


def _reason(name: str, decision: dict) -> str:
    """The binding reason for this variant's outcome, in one line."""
    entry, chosen = decision["variants"][name], decision["chosen"]
    failed = [check for check in entry["checks"] if not check["pass"]]
    if name == chosen and decision["fell_back"]:
        return "released at baseline precision: no quantized variant passed every check and showed a win"
    if name == chosen:
        return "released: the smallest variant that passes every check"
    if entry["baseline_precision"] and not failed:
        return "not needed: a quantized variant passed" if chosen else "baseline precision"
    if entry["baseline_precision"] and chosen is not None:
        return "not needed: a quantized variant passed"
    if failed:
        binding = next(check for kind in ("target", "quality", "win", "limit") for check in failed
                       if check["kind"] == kind)
        what = {"target": "not validated on its target", "quality": "quality", "win": "no operational win",
                "limit": "over a limit"}[binding["kind"]]
        extra = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        if binding["kind"] == "target":
            return f"{what}: measured on {binding['measured']}, ships for {binding['limit']}"
        if binding.get("verdict") == "undecided":
            return f"{describe(binding)}{extra}"
        return f"{what}: {describe(binding)}{extra}"
    return f"passes, but {chosen} is smaller"


def violations(decision: dict) -> list[str]:
    """One line per violated check of the best candidate (fewest violations, then largest)."""
    def failures(name: str) -> list[dict]:
        return [check for check in decision["variants"][name]["checks"] if not check["pass"]]

    best = min(reversed(decision["order_most_compressed_first"]), key=lambda name: len(failures(name)))
    return [f"{best}: {describe(check)}" for check in failures(best)]


def select_targets(measured: dict[str, tuple[dict, dict[str, dict]]], records: dict[str, dict],
                   gate: GateConfig) -> dict:
    """One decision per deploy target (`measured`: target -> (baseline, variants) measured
    there, in the run's order). The first target is the primary: its decision is the top
    level (`chosen`, `variants`, ...), and `targets` holds every target's, each deciding on
    its own measurements only."""
    decisions = {target: select(baseline, variants, records, gate, target)
                 for target, (baseline, variants) in measured.items()}
    primary = next(iter(decisions))
    return {**decisions[primary], "targets": decisions}


def released(decision: dict) -> dict[str, Optional[str]]:
    """Deploy target -> the variant released for it (a decision.json of before targets: its
    one decision, under its runtime)."""
    if "targets" in decision:
        return {target: entry["chosen"] for target, entry in decision["targets"].items()}
    return {decision.get("target") or "default": decision["chosen"]}


def require_release(decision: dict) -> str:
    """The primary target's release; fails, one line per violated check, when any target
    of the run has nothing it may release."""
    for target, entry in (decision.get("targets") or {None: decision}).items():
        if entry["chosen"] is None:
            lines = violations(entry)
            where = f" on {target}" if target else ""
            raise GateError(f"release gate: no variant passes every check{where}, and no baseline-precision "
                            f"fallback (gate.fallback={entry.get('fallback', 'none')})\n" + "\n".join(lines))
    return decision["chosen"]
