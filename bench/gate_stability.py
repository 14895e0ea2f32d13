"""The release gate's stability under load (numbers for the closing note and bench/README.md).

    python bench/gate_stability.py decisions [--runs 5]
    python bench/gate_stability.py widths    [--trials 3]

Needs the default pipeline's artifacts (`make demo`): the baseline's F16 GGUF, every
variant's GGUF, and each one's eval outcomes and memory (deterministic in llama.cpp, so
they are reused; what varies from run to run is latency).

decisions: `--runs` times, while another process keeps a core busy, time every variant's
latency as the evaluate stage does and apply both rules: the gate as it was (a p99 ratio of
separately timed suites under 10x, a median interleaved ratio under 1.1, family drops as
point estimates on 64 items) and the gate now (paired intervals, interleaved latency with a
95% interval against 1.0 + 0.05). The chosen variant per run, per rule.
widths: the width of the interleaved latency ratio's 95% interval against the number of
rounds, for the smallest variant against the baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from benchlib import ROOT, save, table




def _artifacts() -> tuple:
    from quantbuild.validation import load_config
    from quantbuild.hashing import read_json

    config = load_config(ROOT / "params.yaml")
    paths = config.paths
    names = sorted(config.quant.variants)
    base = ROOT / paths.gguf_base / "base.gguf"
    models = {name: ROOT / paths.quantized / name / "model" / "model.gguf" for name in names}
    measured = {name: {**read_json(ROOT / paths.eval / name / "measurements.json"),
                       "outcomes": read_json(ROOT / paths.eval / name / "outcomes.json")}
                for name in ["baseline", *names]}
    records = {name: read_json(ROOT / paths.quantized / name / "quantize_record.json") for name in names}
    missing = [str(path) for path in [base, *models.values()] if not path.is_file()]
    if missing:
        sys.exit(f"run `make demo` first: {missing[0]} not found")
    return config, base, models, measured, records


def _old_rule(baseline: dict, variants: dict, records: dict, gate) -> str | None:
    """The gate before this change: point-estimate family drops on the first 64 items, the
    p99 ratio of separate suites under 10x, the interleaved median ratio under 1.1."""
    from quantbuild.gate import latency_ratio

    order = sorted(variants, key=lambda name: (records[name]["size_bytes"], name))
    for name in order:
        variant = variants[name]
        if records[name]["bits_per_weight"] >= 16:
            continue
        ok = all(variant[key] <= limit for key, limit in (("kld_mean", gate.max_kld_mean), ("kld_p99", gate.max_kld_p99)))
        for family, limit in {**gate.max_family_drop, "structured": 0.02}.items():
            ids = sorted(baseline["outcomes"][family])[:64]
            drop = sum(baseline["outcomes"][family][i] - variant["outcomes"][family][i] for i in ids) / len(ids)
            ok = ok and drop <= limit
        ok = ok and latency_ratio(baseline["latency"], variant["latency"]) <= 10.0
        ok = ok and max(variant["latency_vs_baseline"]["by_length"][length][side]["ratio"]
                        for length in variant["latency_vs_baseline"]["by_length"] for side in ("ttft", "decode")) <= 1.1
        peak = lambda m: m["memory"]["by_context"][str(gate.memory_context)]["peak_mb"]  # noqa: E731
        ok = ok and peak(variant) / peak(baseline) <= 0.95
        if ok:
            return name
    return None


def decisions(args: argparse.Namespace) -> None:
    from quantbuild.evaluation.latency import measure_latency, paired_latency
    from quantbuild.gate import select
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    config, base, models, measured, records = _artifacts()
    workers = config.eval.threads or os.cpu_count() or 1
    rows, results = [], []
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for run in range(args.runs):
            timed = {}
            with LlamaCppModel(base, n_ctx=1024, threads=workers) as reference:
                baseline = {**measured["baseline"], "latency": measure_latency(reference, config.eval)}
                for name, path in models.items():
                    kv = config.quant.variants[name].kv_cache_type
                    with LlamaCppModel(path, n_ctx=1024, kv_type=kv, threads=workers) as model:
                        timed[name] = {**measured[name], "latency": measure_latency(model, config.eval),
                                       "latency_vs_baseline": paired_latency(model, reference, config.eval)}
            now = select(baseline, timed, records, config.gate)
            before = _old_rule(baseline, timed, records, config.gate)
            latency = {name: timed[name]["latency_vs_baseline"]["worst"] for name in timed}
            results.append({"before": before, "after": now["chosen"], "latency": latency})
            rows.append([run + 1, before, now["chosen"],
                         ", ".join(f"{name.removeprefix('gguf_')} {value['ratio']:.2f} [{value['ci_low']:.2f}, "
                                   f"{value['ci_high']:.2f}]" for name, value in sorted(latency.items()))])
            print(rows[-1], flush=True)
    finally:
        load.kill()
    print(f"\n{args.runs} runs beside a CPU-bound process, {config.eval.latency.repeats} interleaved rounds each")
    print(table(["run", "chosen (gate before)", "chosen (gate now)", "worst latency ratio [95% interval] per variant"],
                 rows))
    save("gate_stability", results)


def widths(args: argparse.Namespace) -> None:
    from quantbuild.evaluation.latency import paired_latency

    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    config, base, models, measured, records = _artifacts()
    smallest = min((name for name in records if records[name]["bits_per_weight"] < 16),
                   key=lambda name: records[name]["size_bytes"])
    rows, results = [], {}
    workers = config.eval.threads or os.cpu_count() or 1
    with LlamaCppModel(base, n_ctx=1024, threads=workers) as reference, \
            LlamaCppModel(models[smallest], n_ctx=1024, threads=workers) as model:
        for repeats in (3, 5, 9, 15, 21):
            eval_config = replace(config.eval, latency=replace(config.eval.latency, repeats=repeats))
            trials = [paired_latency(model, reference, eval_config)["worst"] for _ in range(args.trials)]
            spans = [trial["ci_high"] - trial["ci_low"] for trial in trials]
            results[repeats] = trials
            rows.append([repeats, f"{statistics.median(spans):.3f}", f"{max(spans):.3f}",
                         f"{min(t['ratio'] for t in trials):.3f}-{max(t['ratio'] for t in trials):.3f}"])
    print(f"{smallest} vs the baseline F16 GGUF, {args.trials} trials per round count")
    print(table(["rounds", "interval width (median)", "interval width (max)", "ratio range"], rows))
    save("gate_latency_widths", results)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("decisions", "widths"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    {"decisions": decisions, "widths": widths}[args.what](args)


if __name__ == "__main__":
    main()
