"""The release gate: budgets relative to the baseline measured in the same run.

Every variant gets every budget checked (measured value, limit, pass/fail); the gate walks
the variants from the most compressed to the least and picks the first that passes all.
If none passes, `GateError` lists each violation of the best candidate.
"""

from __future__ import annotations

from typing import Any

from quantbuild.config import GateConfig
from quantbuild.errors import GateError


def _check(budget: str, measured: float, limit: float, higher_is_better: bool = False) -> dict[str, Any]:
    passed = measured >= limit if higher_is_better else measured <= limit
    return {"budget": budget, "measured": round(measured, 6), "limit": limit,
            "direction": ">=" if higher_is_better else "<=", "pass": bool(passed)}


def check_variant(baseline: dict, variant: dict, gate: GateConfig) -> list[dict[str, Any]]:
    """Every budget of `gate` applied to one variant's metrics."""
    checks = []
    if "perplexity" in baseline:
        increase = (variant["perplexity"] / baseline["perplexity"] - 1) * 100
        checks += [
            _check("perplexity_increase_pct", increase, gate.max_perplexity_increase_pct),
            _check("kld_mean", variant["kld_mean"], gate.max_kld_mean),
            _check("kld_p99", variant["kld_p99"], gate.max_kld_p99),
            _check("top1_agreement", variant["top1_agreement"], gate.min_top1_agreement, higher_is_better=True),
        ]
    for family, limit in sorted(gate.max_family_drop.items()):
        drop = baseline["families"][family]["score"] - variant["families"][family]["score"]
        checks.append(_check(f"{family}_drop", drop, limit))
    if gate.max_latency_p99_ratio is not None:
        checks.append(_check("latency_p99_ratio", latency_ratio(baseline["latency"], variant["latency"]),
                             gate.max_latency_p99_ratio))
    if gate.max_latency_paired_ratio is not None and "latency_vs_baseline" in variant:
        checks.append(_check("latency_paired_ratio", variant["latency_vs_baseline"]["worst_ratio_p50"],
                             gate.max_latency_paired_ratio))
    if gate.max_peak_memory_mb is not None:
        peak = variant["memory"]["by_context"][str(gate.memory_context)]["peak_mb"]
        checks.append(_check(f"peak_memory_mb@{gate.memory_context}", peak, gate.max_peak_memory_mb))
    if gate.max_memory_ratio is not None:
        context = str(gate.memory_context)
        ratio = variant["memory"]["by_context"][context]["peak_mb"] / baseline["memory"]["by_context"][context]["peak_mb"]
        checks.append(_check(f"memory_ratio@{gate.memory_context}", ratio, gate.max_memory_ratio))
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


def select(baseline: dict, variants: dict[str, dict], records: dict[str, dict], gate: GateConfig) -> dict:
    """The gate decision; raises GateError (after building the decision) when none passes.

    `variants` maps name -> metrics, `records` name -> quantize record (size, bits).
    """
    order = sorted(variants, key=lambda name: (records[name]["size_bytes"], records[name]["bits_per_weight"], name))
    decision: dict[str, Any] = {"chosen": None, "order_most_compressed_first": order, "variants": {}}
    for name in order:
        checks = check_variant(baseline, variants[name], gate)
        passed = all(check["pass"] for check in checks)
        decision["variants"][name] = {
            "pass": passed,
            "size_bytes": records[name]["size_bytes"],
            "bits_per_weight": records[name]["bits_per_weight"],
            "checks": checks,
        }
        if passed and decision["chosen"] is None:
            decision["chosen"] = name
    return decision


def violations(decision: dict) -> list[str]:
    """One line per violated budget of the best candidate (fewest violations, then largest)."""
    def failures(name: str) -> list[dict]:
        return [check for check in decision["variants"][name]["checks"] if not check["pass"]]

    best = min(reversed(decision["order_most_compressed_first"]), key=lambda name: len(failures(name)))
    return [
        f"{best}: {check['budget']} = {check['measured']} violates {check['direction']} {check['limit']}"
        for check in failures(best)
    ]


def require_release(decision: dict) -> str:
    if decision["chosen"] is None:
        lines = violations(decision)
        raise GateError("release gate: no variant passes every budget\n" + "\n".join(lines))
    return decision["chosen"]
