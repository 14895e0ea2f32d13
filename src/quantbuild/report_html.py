"""`quantbuild report`: one self-contained HTML page of the last release decision.

Inline SVG drawn here, inline CSS, no script and no external resource: it renders offline,
from a file, in any browser, and prints (A4 or letter, one chart per row, nothing hidden).

The page stands alone: a reader who gets only the file (a screenshot of it, a PDF) sees
what was released, from which commit, where the bundle is and whether its signature
verifies; per deploy target, the headline numbers of the baseline and of every variant
(size, perplexity, KL divergence, top-1 agreement, every family's score, memory and
latency ratios), every check of the gate with its measured value, interval and limit
(failures marked in text as well as colour), and four charts:

- size vs quality: artifact size against KL divergence to the baseline, the Pareto front of
  the ladder, the chosen variant marked;
- every family's score with its 95% interval, every variant on one chart beside the baseline;
- latency: each variant's interleaved TTFT/decode ratio to the baseline with its interval,
  and the gate's limit and noise margin;
- model memory by context length, every variant, with the memory budget and the gate's
  memory limit at its context.

Every label of a variant's outcome (legend, tables, headings) comes from `outcome`, so the
page cannot call a variant "fails" in one place and "not needed" in another.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Callable

from quantbuild.config import Config
from quantbuild.errors import DataError
from quantbuild.evaluation.runner import MEASUREMENTS
from quantbuild.hashing import read_json
from quantbuild.quantization import RECORD

WIDTH, HEIGHT = 680, 360
LEFT, RIGHT, TOP, BOTTOM = 112, 220, 30, 50
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
BASELINE_COLOUR = "#000000"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        high = low + 1
    step = 10 ** math.floor(math.log10((high - low) / count))
    for factor in (1, 2, 5, 10):
        if (high - low) / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [round(first + index * step, 10) for index in range(int((high - first) / step) + 1)]


class Chart:
    """An SVG plot area with linear (or log10) axes."""

    def __init__(self, title: str, x_label: str, y_label: str, x_range: tuple[float, float],
                 y_range: tuple[float, float], log_y: bool = False):
        self.title, self.x_label, self.y_label, self.log_y = title, x_label, y_label, log_y
        self.x_range = x_range
        self.y_range = tuple(math.log10(v) for v in y_range) if log_y else y_range
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []

    def x(self, value: float) -> float:
        low, high = self.x_range
        return LEFT + (value - low) / ((high - low) or 1) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        low, high = self.y_range
        value = math.log10(max(value, 1e-12)) if self.log_y else value
        return HEIGHT - BOTTOM - (value - low) / ((high - low) or 1) * (HEIGHT - TOP - BOTTOM)

    def add(self, svg: str) -> None:
        self.parts.append(svg)

    def key(self, label: str, colour: str, shape: str = "circle") -> None:
        self.legend.append((label, colour, shape))

    def render(self, chart_id: str, y_categories: list[str] | None = None,
               y_format: Callable[[float], str] = lambda v: f"{v:g}") -> str:
        axes = [f'<text x="{WIDTH / 2 - RIGHT / 2 + LEFT / 2}" y="18" class="title">{_e(self.title)}</text>',
                f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" class="axis"/>',
                f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" class="axis"/>',
                f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 12}" class="label">{_e(self.x_label)}</text>',
                f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2}" class="label" '
                f'transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2})">{_e(self.y_label)}</text>']
        for tick in _ticks(*self.x_range):
            axes.append(f'<text x="{self.x(tick):.1f}" y="{HEIGHT - BOTTOM + 16}" class="tick">{tick:g}</text>')
        if y_categories is None:
            low, high = self.y_range
            ticks = [10 ** t for t in range(math.ceil(low), math.floor(high) + 1)] if self.log_y else _ticks(low, high)
            for tick in ticks:
                axes.append(f'<line x1="{LEFT}" y1="{self.y(tick):.1f}" x2="{WIDTH - RIGHT}" y2="{self.y(tick):.1f}" '
                            f'class="grid"/>')
                axes.append(f'<text x="{LEFT - 6}" y="{self.y(tick) + 4:.1f}" class="ytick">{_e(y_format(tick))}</text>')
        legend = []
        for index, (label, colour, shape) in enumerate(self.legend):
            top = TOP + 6 + index * 18
            mark = (f'<rect x="{WIDTH - RIGHT + 12}" y="{top - 5}" width="10" height="10" fill="{colour}"/>'
                    if shape == "square" else
                    f'<line x1="{WIDTH - RIGHT + 10}" y1="{top}" x2="{WIDTH - RIGHT + 24}" y2="{top}" stroke="{colour}" '
                    f'stroke-dasharray="4 3" stroke-width="2"/>' if shape == "line" else
                    f'<circle cx="{WIDTH - RIGHT + 17}" cy="{top}" r="5" fill="{colour}"/>')
            legend.append(f'{mark}<text x="{WIDTH - RIGHT + 30}" y="{top + 4}" class="legend">{_e(label)}</text>')
        body = "".join(axes + self.parts + legend)
        return (f'<figure><svg id="{chart_id}" viewBox="0 0 {WIDTH} {HEIGHT}" '
                f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_e(self.title)}">{body}</svg></figure>')


def _decisions(config: Config) -> dict[str, dict]:
    """Deploy target -> the gate's decision there (one entry for a decision made before targets)."""
    decision_path = Path(config.paths.release) / "decision.json"
    if not decision_path.is_file():
        raise DataError(f"{decision_path}: no release decision yet (run `dvc repro`)")
    decision = read_json(decision_path)
    return decision.get("targets") or {config.eval.targets[0]: decision}


def _load(config: Config, target: str, decision: dict) -> tuple[dict, dict, dict]:
    paths = config.paths
    names = decision["order_most_compressed_first"]
    from quantbuild.repair import locate

    folders = {name: locate(paths, name, target) for name in ["baseline", *names]}
    measured = {}
    for name, (_, evaluated) in folders.items():
        path = evaluated / MEASUREMENTS
        if not path.is_file():
            raise DataError(f"{path}: not found (run `dvc repro`)")
        measured[name] = read_json(path)
    records = {name: read_json(folders[name][0] / RECORD) for name in names}
    return decision, measured, records


def outcome(name: str, decision: dict) -> str:
    """A variant's outcome in a word or two, read from the gate's decision: released,
    passes, not needed (baseline precision, a quantized variant passed), undecided (an
    interval reaching both sides of a limit), or fails."""
    entry = decision["variants"][name]
    if name == decision["chosen"]:
        return "released at baseline precision" if decision.get("fell_back") else "released"
    reason = entry.get("reason", "")
    if reason.startswith("not needed"):
        return "not needed"
    if reason.startswith("undecided"):
        return "undecided"
    return "passes" if entry["pass"] else "fails"


def _colours(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}


def pareto_chart(decision: dict, measured: dict, records: dict, colours: dict) -> str:
    names = decision["order_most_compressed_first"]
    points = {name: (records[name]["size_bytes"] / 1e6, max(measured[name].get("kld_mean", 0.0), 1e-7)) for name in names}
    xs = [x for x, _ in points.values()]
    ys = [y for _, y in points.values()]
    chart = Chart("Size vs quality (lower left is better)", "artifact size (MB)", "KL divergence to the baseline (mean, log)",
                  (0, max(xs) * 1.1), (min(ys) / 2, max(ys) * 2), log_y=True)
    front, best = [], math.inf
    for name in sorted(names, key=lambda n: points[n]):
        if points[name][1] < best:
            front.append(name)
            best = points[name][1]
    path = " ".join(f"{chart.x(points[n][0]):.1f},{chart.y(points[n][1]):.1f}" for n in front)
    chart.add(f'<polyline points="{path}" class="front"/>')
    chart.key("Pareto front", "#999999", "line")
    for name in names:
        x, y = chart.x(points[name][0]), chart.y(points[name][1])
        entry = decision["variants"][name]
        fill = colours[name] if entry["pass"] else "white"
        chart.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{fill}" stroke="{colours[name]}" stroke-width="2" '
                  f'class="point"><title>{_e(name)}: {points[name][0]:.2f} MB, KLD {points[name][1]:.2g}, '
                  f'{_e(entry.get("reason", ""))}</title></circle>')
        if name == decision["chosen"]:
            chart.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="12" fill="none" stroke="#000" stroke-width="2" '
                      f'class="chosen"/><text x="{x + 14:.1f}" y="{y - 10:.1f}" class="note">chosen</text>')
        chart.key(f"{name} ({outcome(name, decision)})", colours[name])
    return chart.render("pareto", y_format=lambda v: f"{v:.0e}")


def family_chart(decision: dict, measured: dict, colours: dict) -> str:
    names = ["baseline", *decision["order_most_compressed_first"]]
    families = sorted(measured["baseline"]["families"])
    rows = len(families) * (len(names) + 1)
    chart = Chart("Score per family, 95% interval", "score", "", (0, 1.04), (0, rows))
    for index, family in enumerate(families):
        top = index * (len(names) + 1)
        chart.add(f'<text x="{LEFT - 6}" y="{chart.y(rows - top - (len(names) + 1) / 2) + 4:.1f}" '
                  f'class="ytick">{_e(family)}</text>')
        for offset, name in enumerate(names):
            entry = measured[name]["families"].get(family)
            if entry is None:
                continue
            y = chart.y(rows - top - offset - 1)
            colour = BASELINE_COLOUR if name == "baseline" else colours[name]
            chart.add(f'<line x1="{chart.x(entry["ci_low"]):.1f}" y1="{y:.1f}" x2="{chart.x(entry["ci_high"]):.1f}" '
                      f'y2="{y:.1f}" stroke="{colour}" stroke-width="2"/>'
                      f'<circle cx="{chart.x(entry["score"]):.1f}" cy="{y:.1f}" r="4" fill="{colour}" class="point">'
                      f'<title>{_e(name)} {_e(family)}: {entry["score"]:.3f} [{entry["ci_low"]:.3f}, '
                      f'{entry["ci_high"]:.3f}] n={entry["n"]}</title></circle>')
    chart.key("baseline", BASELINE_COLOUR)
    for name in names[1:]:
        chart.key(name, colours[name])
    return chart.render("families", y_categories=families)


def latency_chart(decision: dict, measured: dict, colours: dict, limit: float | None, margin: float) -> str:
    names = [name for name in decision["order_most_compressed_first"] if "latency_vs_baseline" in measured[name]]
    worst = {name: measured[name]["latency_vs_baseline"]["worst"] for name in names}
    high = max([w["ci_high"] for w in worst.values()] + [(limit or 1.0) + margin, 1.1])
    low = min([w["ci_low"] for w in worst.values()] + [0.8])
    chart = Chart("Latency vs the baseline, interleaved (worst of TTFT/decode)", "ratio to the baseline (lower is faster)",
                  "", (low * 0.95, high * 1.05), (0, len(names) + 1))
    for index, name in enumerate(names):
        y = chart.y(len(names) - index)
        w = worst[name]
        chart.add(f'<line x1="{chart.x(w["ci_low"]):.1f}" y1="{y:.1f}" x2="{chart.x(w["ci_high"]):.1f}" y2="{y:.1f}" '
                  f'stroke="{colours[name]}" stroke-width="3"/>'
                  f'<circle cx="{chart.x(w["ratio"]):.1f}" cy="{y:.1f}" r="5" fill="{colours[name]}" class="point">'
                  f'<title>{_e(name)}: {w["ratio"]:.3f} [{w["ci_low"]:.3f}, {w["ci_high"]:.3f}] at {_e(w.get("at"))}'
                  f'</title></circle><text x="{LEFT - 6}" y="{y + 4:.1f}" class="ytick">{_e(name)}</text>')
    if limit is not None:
        for value, label, colour in ((limit, f"limit {limit:g}", "#555"), (limit + margin, f"+ noise margin {margin:g}",
                                                                             "#d62728")):
            chart.add(f'<line x1="{chart.x(value):.1f}" y1="{TOP}" x2="{chart.x(value):.1f}" y2="{HEIGHT - BOTTOM}" '
                      f'stroke="{colour}" stroke-dasharray="4 3" class="limit"/>')
            chart.key(label, colour, "line")
    return chart.render("latency", y_categories=names)


def memory_chart(decision: dict, measured: dict, colours: dict, budget: float, gate_context: int,
                 max_ratio: float | None) -> str:
    names = ["baseline", *decision["order_most_compressed_first"]]
    series = {name: sorted((int(k), v["peak_mb"]) for k, v in measured[name]["memory"]["by_context"].items())
              for name in names}
    contexts = [c for points in series.values() for c, _ in points]
    peaks = [p for points in series.values() for _, p in points]
    chart = Chart("Model memory by context (weights + KV cache + buffers)", "context length (tokens)", "MB",
                  (0, max(contexts) * 1.05), (0, max(peaks + [budget]) * 1.1))
    for name, points in series.items():
        colour = BASELINE_COLOUR if name == "baseline" else colours[name]
        path = " ".join(f"{chart.x(c):.1f},{chart.y(p):.1f}" for c, p in points)
        chart.add(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" class="series"/>')
        for c, p in points:
            chart.add(f'<circle cx="{chart.x(c):.1f}" cy="{chart.y(p):.1f}" r="3" fill="{colour}" class="point">'
                      f'<title>{_e(name)}: {p:.2f} MB at {c}</title></circle>')
        chart.key(name, colour)
    chart.add(f'<line x1="{LEFT}" y1="{chart.y(budget):.1f}" x2="{WIDTH - RIGHT}" y2="{chart.y(budget):.1f}" '
              f'stroke="#d62728" stroke-dasharray="4 3" class="limit"/>')
    chart.key(f"budget {budget:g} MB", "#d62728", "line")
    base = dict(series["baseline"]).get(gate_context)
    if max_ratio is not None and base is not None:
        chart.add(f'<line x1="{chart.x(gate_context) - 8:.1f}" y1="{chart.y(base * max_ratio):.1f}" '
                  f'x2="{chart.x(gate_context) + 8:.1f}" y2="{chart.y(base * max_ratio):.1f}" stroke="#555" '
                  f'stroke-width="3" class="limit"/>')
        chart.key(f"gate limit @{gate_context}", "#555", "square")
    return chart.render("memory")


def _number(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else _e(value)


def _ratio(entry: dict, budget: str) -> str:
    """A win check's measured ratio (with its interval) as a cell; `-` where it did not run."""
    check = next((c for c in entry["checks"] if c["budget"].split("@")[0] == budget), None)
    if check is None:
        return "-"
    text = f"{check['measured']:.3f}"
    if "interval" in check:
        text += f" [{check['interval'][0]:.3f}, {check['interval'][1]:.3f}]"
    return text


def headline_table(decision: dict, measured: dict) -> str:
    """The baseline and every variant in one table: outcome, size, perplexity, KL divergence,
    top-1 agreement, each family's score with its interval, memory and latency ratios."""
    names = decision["order_most_compressed_first"]
    families = sorted(measured["baseline"].get("families", {}))
    head = ("<tr><th>variant</th><th>outcome</th><th>MB</th><th>bits/weight</th><th>perplexity</th>"
            "<th>KLD mean</th><th>KLD p99</th><th>top-1</th>"
            + "".join(f"<th>{_e(family)}</th>" for family in families)
            + "<th>memory ratio</th><th>latency ratio</th></tr>")

    def family_cells(metrics: dict) -> str:
        cells = []
        for family in families:
            entry = metrics.get("families", {}).get(family)
            if entry is None:
                cells.append("<td>-</td>")
            elif family == "degenerate":
                cells.append(f'<td>{entry["items"]} of {entry["n"]} items</td>')
            else:
                cells.append(f'<td>{entry["score"]:.3f} <span class="ci">[{entry["ci_low"]:.3f}, '
                             f'{entry["ci_high"]:.3f}]</span></td>')
        return "".join(cells)

    base = measured["baseline"]
    rows = [f'<tr class="baseline"><td>baseline</td><td>reference</td>'
            f'<td>{_number(base.get("memory", {}).get("artifact_mb"), 2)}</td><td>-</td>'
            f'<td>{_number(base.get("perplexity"))}</td><td>0 (reference)</td><td>0 (reference)</td>'
            f'<td>1 (reference)</td>{family_cells(base)}<td>1 (reference)</td><td>1 (reference)</td></tr>']
    for name in names:
        entry, metrics = decision["variants"][name], measured[name]
        label = outcome(name, decision)
        rows.append(f'<tr class="{"chosen" if name == decision["chosen"] else ""}"><td>{_e(name)}</td>'
                    f'<td class="{_e(label.split()[0])}">{_e(label)}</td>'
                    f'<td>{entry["size_bytes"] / 1e6:.2f}</td><td>{entry["bits_per_weight"]:.3f}</td>'
                    f'<td>{_number(metrics.get("perplexity"))}</td><td>{_number(metrics.get("kld_mean"), 5)}</td>'
                    f'<td>{_number(metrics.get("kld_p99"), 5)}</td><td>{_number(metrics.get("top1_agreement"))}</td>'
                    f'{family_cells(metrics)}<td>{_ratio(entry, "memory_ratio")}</td>'
                    f'<td>{_ratio(entry, "latency_ratio")}</td></tr>')
    return f'<table class="headline"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _limit(check: dict) -> str:
    limit = check["limit"]
    text = f"{limit:g}" if isinstance(limit, (int, float)) else str(limit)
    side = {"ci_high": " (interval's upper end)", "ci_low": " (interval's lower end)"}.get(check.get("applies_to"), "")
    return f"{check['direction']} {text}{side}"


def check_cell(check: dict | None, row_limit: str) -> str:
    """One check in full: a mark that reads without colour, the measured value, its
    interval, and its limit where it differs from the row's."""
    if check is None:
        return '<td class="none">-</td>'
    value = check["measured"]
    text = f"{value:.4g}" if isinstance(value, float) else _e(value)
    if "interval" in check:
        text += f' <span class="ci">[{check["interval"][0]:.4g}, {check["interval"][1]:.4g}]</span>'
    undecided = check.get("verdict") == "undecided"
    mark = "? undecided" if undecided else ("&#10003;" if check["pass"] else "&#10007; fails")
    css = "undecided" if undecided else ("pass" if check["pass"] else "fail")
    own = _limit(check)
    limit = "" if own == row_limit else f'<br><span class="limit">{_e(own)}</span>'
    return f'<td class="{css}"><b>{mark}</b> {text}{limit}</td>'


def _outcome_and_reason(name: str, decision: dict) -> str:
    """The outcome in bold, then the gate's reason (which often starts with it: said once)."""
    label, reason = outcome(name, decision), decision["variants"][name].get("reason", "")
    rest = reason[len(label):].lstrip(": ") if reason.startswith(label) else reason
    return f"<b>{_e(label)}</b>" + (f": {_e(rest)}" if rest else "")


def checks_table(decision: dict) -> str:
    """Every check of every variant, one row per budget and one column per variant:
    nothing folded away, each cell marked in text as well as colour."""
    names = decision["order_most_compressed_first"]
    budgets: dict[str, dict] = {}
    for name in names:
        for check in decision["variants"][name]["checks"]:
            budgets.setdefault(check["budget"], check)
    rows = []
    for budget, first in budgets.items():
        row_limit = _limit(first)
        cells = []
        for name in names:
            found = [check for check in decision["variants"][name]["checks"] if check["budget"] == budget]
            cells.append(check_cell(found[0] if found else None, row_limit))
        rows.append(f'<tr><th>{_e(budget)}<br><span class="limit">{_e(row_limit)}</span></th>{"".join(cells)}</tr>')
    rows.append('<tr><th>outcome</th>' + "".join(f'<td>{_outcome_and_reason(name, decision)}</td>'
                                                 for name in names) + "</tr>")
    head = "<tr><th>check (limit)</th>" + "".join(f"<th>{_e(name)}</th>" for name in names) + "</tr>"
    return f'<table class="checks"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def provenance(config: Config, decision: dict) -> str:
    """Where what was released lies and what vouches for it: per released bundle its path,
    size, the commit it was built from, and its signature checked now with the project's
    public key (`package.public_key`)."""
    from quantbuild.gate import released
    from quantbuild.release.manifest import read_manifest
    from quantbuild.release.packaging import git_state
    from quantbuild.release.signing import check_signature

    chosen = {name for name in released(decision).values() if name}
    rows = []
    for name in sorted(chosen):
        bundle = Path(config.paths.package) / f"{config.model.name}-{name}"
        try:
            manifest = read_manifest(bundle)
        except Exception as err:  # a report of a broken bundle says so rather than failing
            rows.append(f"<tr><td>{_e(bundle)}</td><td colspan=3 class=\"fail\">&#10007; {_e(err)}</td></tr>")
            continue
        size = sum(entry["size"] for entry in manifest["files"].values())
        git = manifest.get("git") or {}
        commit = f'{git.get("commit") or "not a git repository"}{" (uncommitted changes)" if git.get("dirty") else ""}'
        if "signing" not in manifest:
            signature = '<span class="undecided">unsigned</span> (set package.signing_key to sign)'
        else:
            key = Path(config.package.public_key) if config.package.public_key else None
            problems = check_signature(bundle, manifest["signing"], key, named=False)
            signature = (f'<span class="pass">&#10003; signed, verifies</span> with {_e(key)}' if not problems
                         else f'<span class="fail">&#10007; {_e(problems[0])}</span>')
        rows.append(f"<tr><td>{_e(bundle)}/</td><td>{size / 1e6:.2f} MB</td><td>{_e(commit)}</td>"
                    f"<td>{signature}</td></tr>")
    if not rows:
        state = git_state(Path("."))
        rows.append(f'<tr><td colspan=2>nothing was packaged</td><td>{_e(state["commit"] or "-")}'
                    f'{" (uncommitted changes)" if state["dirty"] else ""}</td><td>-</td></tr>')
    return ('<table class="provenance"><thead><tr><th>bundle</th><th>size</th><th>built from commit</th>'
            f'<th>signature</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1420px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
.rule { color: #444; max-width: 900px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } figure { margin: 0; border: 1px solid #ddd; }
.title { font-size: 14px; font-weight: bold; text-anchor: middle; } .label { font-size: 12px; text-anchor: middle; }
.tick { font-size: 11px; text-anchor: middle; } .ytick { font-size: 11px; text-anchor: end; }
.legend { font-size: 11px; } .note { font-size: 11px; } .axis { stroke: #333; } .grid { stroke: #eee; }
.front { fill: none; stroke: #999; stroke-dasharray: 4 3; stroke-width: 1.5; }
table { border-collapse: collapse; margin-top: 12px; font-size: 12px; }
td, th { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } tr.chosen td { background: #eef6ee; font-weight: bold; }
tr.baseline td { background: #f7f7f7; font-style: italic; }
.fail { color: #b00; } td.fail { background: #fde8e8; } .pass { color: #176017; }
.undecided { color: #8a5a00; } td.undecided { background: #fff4dc; } td.released { color: #176017; }
.ci, .limit { color: #555; font-size: 11px; font-weight: normal; } .reason { max-width: 280px; }
ul.repair { font-size: 12px; }
@media print {
  body { margin: 0; max-width: none; font-size: 11px; }
  .charts { display: block; } figure { break-inside: avoid; margin-bottom: 8px; }
  svg { max-width: 100%; height: auto; } table { break-inside: auto; font-size: 9px; }
  tr, td { break-inside: avoid; } h2 { break-before: page; } h2:first-of-type { break-before: auto; }
  td.fail, td.undecided, tr.chosen td, th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def validation_list(decision: dict) -> str:
    """Each planned mix against the stock presets no larger, on held-out text."""
    lines = [f"<li><b>{_e(name)}</b>: {_e(decision['variants'][name]['validation']['line'])}</li>"
             for name in decision["order_most_compressed_first"] if decision["variants"][name].get("validation")]
    return (f'<h3>Planned mixes against llama.cpp\'s stock presets (held-out text)</h3><ul class="repair">'
            f'{"".join(lines)}</ul>') if lines else ""


def repair_list(decision: dict) -> str:
    """The repair stage's verdicts and rounds (the summary's lines), where it ran."""
    from quantbuild.report import repair_lines

    lines = repair_lines(decision.get("repair"))
    return f'<h3>Repair</h3><ul class="repair">{"".join(f"<li>{_e(line)}</li>" for line in lines)}</ul>' if lines else ""


def render(config: Config) -> str:
    decisions = _decisions(config)
    gate = config.gate
    sections, released = [], []
    for number, (target, decision) in enumerate(decisions.items()):
        decision, measured, records = _load(config, target, decision)
        colours = _colours(decision["order_most_compressed_first"])
        chosen = decision["chosen"] or "nothing"
        label = outcome(decision["chosen"], decision) if decision["chosen"] else "released"
        released.append(f"{chosen} on {target}")
        charts = [pareto_chart(decision, measured, records, colours), family_chart(decision, measured, colours),
                  latency_chart(decision, measured, colours, gate.max_latency_paired_ratio, gate.latency_noise_margin),
                  memory_chart(decision, measured, colours, config.eval.memory.budget_mb, gate.memory_context,
                               gate.max_memory_ratio)]
        if number:  # one id per chart on the page: the first target's keep theirs (`pareto`, ...)
            charts = [chart.replace('<svg id="', f'<svg id="{target}-', 1) for chart in charts]
        sections.append(f'<h2>{_e(target)}: {_e(label)} {_e(chosen)}</h2>'
                        f'<h3>Headline numbers (baseline and every variant, measured on {_e(target)})</h3>'
                        f'{headline_table(decision, measured)}'
                        f'<h3>Every check of the gate (&#10003; passes, &#10007; fails, ? undecided)</h3>'
                        f'{checks_table(decision)}{validation_list(decision)}'
                        f'<h3>Charts</h3><div class="charts">{"".join(charts)}</div>')
    first = next(iter(decisions.values()))
    whole = read_json(Path(config.paths.release) / "decision.json")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>quantbuild release report: '
            f'{_e(config.model.name)}</title><style>{STYLE}</style></head><body>'
            f'<h1>{_e(config.model.name)}: released {_e("; ".join(released))}</h1>'
            f'<p class="rule">Rule: {_e(first.get("rule", ""))}. Every variant measured on each deploy target '
            f'against the baseline measured there in the same run; the gate decides per target.</p>'
            f'{provenance(config, whole)}{"".join(sections)}{repair_list(whole)}</body></html>\n')


def write_report(config: Config, out: Path) -> Path:
    page = render(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(out)
    return out
