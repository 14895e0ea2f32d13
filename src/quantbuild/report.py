"""The release summary printed at the end of `make demo` (and by `quantbuild summary`)."""

from __future__ import annotations

from pathlib import Path

from quantbuild.config import Config
from quantbuild.errors import DataError
from quantbuild.hashing import read_json
from quantbuild.release.manifest import MANIFEST


def _cell(check: dict | None) -> str:
    """A check as a table cell: value, [interval], and a mark when it failed."""
    if check is None:
        return "-"
    value = check["measured"]
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if "interval" in check:
        text += f" [{check['interval'][0]:.3f}, {check['interval'][1]:.3f}]"
    return text if check["pass"] else f"{text} x"


def decision_table(decision: dict, width: int = 150) -> str:
    """Every variant of a decision in one table: target, size, quality, wins, verdict, reason."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, show_edge=False)
    for column in ("variant", "target", "MB", "bits/w", "quality", "memory", "latency", "reason"):
        table.add_column(column, overflow="fold")
    for name in decision["order_most_compressed_first"]:
        entry = decision["variants"][name]
        checks = entry["checks"]
        quality = [check for check in checks if check["kind"] in ("quality", "target")]
        failed_quality = [check["budget"] for check in quality if not check["pass"]]
        by_kind = {check["budget"].split("@")[0]: check for check in checks}
        mark = "*" if name == decision["chosen"] else " "
        table.add_row(f"{mark}{name}", entry.get("target", "-"), f"{entry['size_bytes'] / 1e6:.2f}",
                      f"{entry['bits_per_weight']:.3f}", "ok" if not failed_quality else "x " + ", ".join(failed_quality),
                      _cell(by_kind.get("memory_ratio")), _cell(by_kind.get("latency_ratio")),
                      entry.get("reason", "pass" if entry["pass"] else "fail"))
    buffer = StringIO()
    Console(file=buffer, width=width, no_color=True).print(table)
    return buffer.getvalue().rstrip("\n")


def release_summary(config: Config) -> str:
    from quantbuild.gate import released

    decision_path = Path(config.paths.release) / "decision.json"
    if not decision_path.is_file():
        raise DataError(f"{decision_path}: no release decision yet (run `dvc repro`)")
    decision = read_json(decision_path)
    lines = ["release summary", "===============",
             f"rule: {decision.get('rule', 'the smallest variant that passes every budget')}",
             "memory and latency: ratios to the baseline on the same target (latency: median of interleaved "
             "runs [interval, 95% over all its re-measures]); x = failed"]
    decisions = decision.get("targets") or {decision.get("target") or "": decision}
    for target, entry in decisions.items():
        if target:
            lines.append(f"on {target}:")
        lines.append(decision_table(entry))
    if len(decisions) > 1:
        lines += side_by_side(decisions)
    lines += validation_lines(decisions)
    lines += repair_lines(decision.get("repair"))
    for target, chosen in released(decision).items():
        entry = decisions.get(target, decision)
        if chosen is None:
            lines.append(f"no variant may be released{' for ' + target if target in decisions else ''}: "
                         f"nothing was packaged")
            continue
        lines += _chosen_lines(config, chosen, target if decision.get("targets") else None, entry)
    return "\n".join(lines)


def side_by_side(decisions: dict[str, dict]) -> list[str]:
    """Each variant's verdict on each deploy target, one column per target."""
    targets = list(decisions)
    names = next(iter(decisions.values()))["order_most_compressed_first"]
    width = max(len(name) for name in names) + 2
    lines = ["decisions side by side (* released; x failed: the binding check)",
             " " * width + "".join(f"{target:<34}" for target in targets)]
    for name in names:
        cells = []
        for target in targets:
            entry = decisions[target]["variants"][name]
            failed = [check for check in entry["checks"] if not check["pass"]]
            if name == decisions[target]["chosen"]:
                cell = "* released"
            elif failed:
                cell = "x " + ", ".join(check["budget"].split("@")[0] for check in failed[:2])
            else:
                cell = "passes"
            cells.append(f"{cell[:33]:<34}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return lines


def _chosen_lines(config: Config, chosen: str, target: str | None, entry: dict) -> list[str]:
    """What was released for one target: its scores against the baseline there, its bundle."""
    bundle = Path(config.paths.package) / f"{config.model.name}-{chosen}"
    manifest = read_json(bundle / MANIFEST)
    record = manifest.get("targets", {}).get(target) or manifest
    baseline, measured = record["evaluation"]["baseline"], record["evaluation"]["variant"]
    checks = record["gate"]["checks"]
    fell_back = " - kept at baseline precision: no quantized variant showed a win" if entry.get("fell_back") else ""
    where = target or manifest.get("deploy_runtime", "torch")
    lines = [f"chosen for {where}: {chosen} ({manifest['variant']['method']}, {manifest['variant']['bits_per_weight']} "
             f"bits/weight){fell_back}"]
    lines.append(f"  perplexity {baseline.get('perplexity', 0):.4f} -> {measured.get('perplexity', 0):.4f}; "
                 f"KLD mean {measured.get('kld_mean', 0):.5f}, p99 {measured.get('kld_p99', 0):.5f}; "
                 f"top-1 agreement {measured.get('top1_agreement', 1):.4f} (llama-perplexity's definition: "
                 f"{measured.get('chunks', 0)} chunks, second halves)"
                 + (f"; per item: KLD {measured['items_kld_mean']:.5f}" if "items_kld_mean" in measured else ""))
    drops = {check["budget"][: -len("_drop")]: check for check in checks if check["budget"].endswith("_drop")}
    for family in sorted(measured["families"]):
        b, v = baseline["families"][family], measured["families"][family]
        if family == "degenerate":
            lines.append(degenerate_line(b, v, checks))
            continue
        lines.append(family_line(family, b, v, drops.get(family)))
    size = sum(file["size"] for file in manifest["files"].values())
    check = f"quantbuild verify {bundle}" + (f" --target {target}" if target else "")
    lines.append(f"package: {bundle} ({size / 1e6:.2f} MB); check it with `{check}`")
    return lines


def family_line(family: str, baseline: dict, variant: dict, check: dict | None) -> str:
    """One family's scores, baseline -> variant, with the gate's paired check where it ran;
    for a family the variant stopped answering at a look, both scores on the items it answered."""
    rule, scores, n = "", (baseline["score"], variant["score"]), f"n={variant['n']}"
    if check is not None:
        limit = "must not degrade" if check.get("rule") == "must_not_degrade" else f"budget {check['limit']:g}"
        rule = f"; drop {check['measured']:+.3f} [{check['interval'][0]:+.3f}, {check['interval'][1]:+.3f}], {limit}"
        if "of" in check:
            scores, n = check["scores_on_these_items"], f"n={check['n']} of {check['of']}, decided at z {check['z']:g}"
    return f"  {family:<14} {scores[0]:.3f} -> {scores[1]:.3f}  ({n}{rule})"


def degenerate_line(baseline: dict, variant: dict, checks: list[dict]) -> str:
    """Degenerate outputs of the baseline and the variant (items, and by kind), with the
    gate's paired check where it ran."""
    kinds = ", ".join(f"{kind.replace('_', ' ')} {variant.get(kind, 0)}" for kind in ("loop", "no_stop", "script"))
    check = next((check for check in checks if check["budget"] == "degenerate_increase"), None)
    rule = "" if check is None else (f"; increase {check['measured']:+.3f} [{check['interval'][0]:+.3f}, "
                                     f"{check['interval'][1]:+.3f}], at most {check['limit']:g}")
    return (f"  {'degenerate':<14} {baseline['items']} -> {variant['items']} of {variant['n']} items "
            f"({kinds}{rule})")


def validation_lines(decisions: dict[str, dict]) -> list[str]:
    """Each planned mix against llama.cpp's stock presets no larger, on held-out text (the
    same build on every target: said once)."""
    lines: dict[str, str] = {}
    for entry in decisions.values():
        for name in entry["order_most_compressed_first"]:
            validation = entry["variants"][name].get("validation")
            if validation:
                lines.setdefault(name, f"validation {name}: {validation['line']}")
    return list(lines.values())


def repair_lines(repair: dict | None) -> list[str]:
    """The closed loop, per planned variant that needed it: the verdict, each round, advice."""
    lines = []
    for name, outcome in sorted(((repair or {}).get("variants") or {}).items()):
        if outcome["status"] == "not needed":
            continue
        lines.append(f"repair {name}: {outcome['verdict']}")
        for step in outcome.get("rounds", []):
            failed = f"; fails {'; '.join(step['failed'])}" if step["failed"] else "; passes"
            lines.append(f"  round {step['round']}: {step['variant']} {step['bits_per_weight']} bits/weight "
                         f"(target {step['target_bits_per_weight']}), {len(step['promoted'])} layers promoted for "
                         f"{', '.join(step['objective'])}{failed}")
        if outcome.get("advice"):
            lines.append(f"  {outcome['advice']}")
    return lines


def _load_side(ref: str, config: Config) -> tuple[dict, dict | None]:
    """(metrics, gate entry) of a variant name, `baseline`, or a bundle folder."""
    bundle = Path(ref)
    if (bundle / MANIFEST).is_file():
        manifest = read_json(bundle / MANIFEST)
        return manifest["evaluation"]["variant"], manifest.get("gate")
    from quantbuild.repair import locate

    path = locate(config.paths, ref, config.eval.targets[0])[1] / "measurements.json"
    if not path.is_file():
        raise DataError(f"{ref}: neither a bundle folder nor an evaluated variant ({path} not found)")
    decision_path = Path(config.paths.release) / "decision.json"
    gate = None
    if decision_path.is_file():
        gate = read_json(decision_path)["variants"].get(ref)
    return read_json(path), gate


def comparison_rows(left: dict, right: dict) -> list[tuple[str, object, object]]:
    """(metric, left value, right value) for every metric either side has."""
    rows: list[tuple[str, object, object]] = []
    for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement"):
        if key in left or key in right:
            rows.append((key, left.get(key), right.get(key)))
    for family in sorted(set(left.get("families", {})) | set(right.get("families", {}))):
        def score(side: dict) -> object:
            entry = side.get("families", {}).get(family)
            return f"{entry['score']:.3f} [{entry['ci_low']:.3f}, {entry['ci_high']:.3f}] n={entry['n']}" if entry else None
        rows.append((f"{family} score", score(left), score(right)))
    for length in sorted(set(left.get("latency", {})) | set(right.get("latency", {})), key=int):
        for key in ("ttft_ms_p99", "decode_ms_per_token_p99"):
            rows.append((f"{key} @{length}", left.get("latency", {}).get(length, {}).get(key),
                         right.get("latency", {}).get(length, {}).get(key)))
    for key in ("artifact_mb", "memory_cliff_tokens"):
        rows.append((key, left.get("memory", {}).get(key), right.get("memory", {}).get(key)))
    return rows


def compare(left_ref: str, right_ref: str, config: Config) -> str:
    """A side-by-side table of two variants' (or bundles') metrics and gate outcomes."""
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    left, left_gate = _load_side(left_ref, config)
    right, right_gate = _load_side(right_ref, config)
    table = Table(title=f"{left_ref} vs {right_ref}")
    for column in ("metric", left_ref, right_ref):
        table.add_column(column)

    def cell(value: object) -> str:
        return "-" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)

    for name, a, b in comparison_rows(left, right):
        table.add_row(name, cell(a), cell(b))

    def verdict(gate: dict | None) -> str:
        if gate is None:
            return "-"
        failed = [check["budget"] for check in gate["checks"] if not check["pass"]]
        return "pass" if gate["pass"] else "fail: " + ", ".join(failed)

    def checks(gate: dict | None) -> dict:
        return {check["budget"]: check for check in (gate or {}).get("checks", [])}

    for budget in sorted(set(checks(left_gate)) | set(checks(right_gate))):
        table.add_row(f"gate: {budget}", _cell(checks(left_gate).get(budget)), _cell(checks(right_gate).get(budget)))
    table.add_row("release gate", verdict(left_gate), verdict(right_gate))
    table.add_row("reason", (left_gate or {}).get("reason", "-"), (right_gate or {}).get("reason", "-"))
    buffer = StringIO()
    Console(file=buffer, width=140).print(table)
    return buffer.getvalue()
