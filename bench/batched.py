"""Batched greedy generation in llama.cpp against the sequential loop, same items, same run.

    python bench/batched.py [--types F16 Q8_0 Q4_K_M] [--batch 32] [--repeats 1] [--model FOLDER]

For every generative eval family (all 300 items of data/eval) and every GGUF type of the
model: seconds for the family's greedy completions one prompt at a time (batch 1) and with
`--batch` prompts decoded together (one KV sequence per prompt, one llama_decode per step),
interleaved, medians; whether every output is the same; and the time of prefilling the
family's prompts alone, which no batching of the decode steps can remove on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from benchlib import ROOT, save, table

FAMILIES = ("structured", "retrieval", "long_context", "reasoning")


def _files(model: Path, types: list[str], work: Path) -> dict[str, Path]:
    from quantbuild.runtimes.gguf_file import convert
    from quantbuild.runtimes.llama_build import run_tool

    base = work / "F16.gguf"
    convert(model, base, "f16")
    files = {"F16": base}
    for name in types:
        if name != "F16":
            files[name] = work / f"{name}.gguf"
            run_tool("llama-quantize", [str(base), str(files[name]), name, "2"], f"quantize {name}")
    return {name: files[name] for name in types}


def _timed(spec, prompts: list[str], budget: int) -> tuple[float, list[str]]:
    from quantbuild.runtimes.protocol import open_runtime

    with open_runtime(spec) as runtime:
        runtime.reserve(1300)
        started = time.perf_counter()
        outputs = runtime.complete(prompts, budget)
        return time.perf_counter() - started, outputs


def _prefill(spec, prompts: list[str]) -> float:
    from quantbuild.runtimes.protocol import open_runtime

    with open_runtime(replace(spec, batch_size=1)) as runtime:
        runtime.reserve(1300)
        tokens = [runtime.tokenize(prompt) for prompt in prompts]
        started = time.perf_counter()
        for sequence in tokens:
            runtime.generate(sequence, 0)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_K_M"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "baseline" / "workflow-llama-8m")
    args = parser.parse_args()

    from quantbuild.evaluation.suites import MAX_NEW_TOKENS
    from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec
    from quantbuild.tasks.items import load_items

    items = {family: load_items(ROOT / "data" / "eval" / f"{family}.jsonl") for family in FAMILIES}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in _files(args.model, args.types, Path(folder)).items():
            spec = LoadSpec(LLAMA_CPP, path, threads=0, batch_size=args.batch)
            totals = {"sequential": 0.0, "batched": 0.0}
            for family in FAMILIES:
                prompts = [item.prompt for item in items[family]]
                times: dict[str, list[float]] = {"sequential": [], "batched": []}
                outputs = {}
                for _ in range(args.repeats):
                    for mode, size in (("sequential", 1), ("batched", args.batch)):
                        seconds, outputs[mode] = _timed(replace(spec, batch_size=size), prompts, MAX_NEW_TOKENS[family])
                        times[mode].append(seconds)
                prefill = _prefill(spec, prompts)
                differing = sum(a != b for a, b in zip(outputs["sequential"], outputs["batched"]))
                sequential, batched = statistics.median(times["sequential"]), statistics.median(times["batched"])
                totals["sequential"] += sequential
                totals["batched"] += batched
                results[f"{name} {family}"] = {"sequential_s": sequential, "batched_s": batched, "prefill_s": prefill,
                                               "items": len(prompts), "differing_outputs": differing}
                rows.append([name, family, len(prompts), f"{sequential:.2f}", f"{batched:.2f}",
                             f"{sequential / batched:.2f}x", f"{prefill:.2f}", differing])
                print(rows[-1], flush=True)
            rows.append([name, "all four", sum(len(v) for v in items.values()), f"{totals['sequential']:.2f}",
                         f"{totals['batched']:.2f}", f"{totals['sequential'] / totals['batched']:.2f}x", "", ""])
    print(f"llama.cpp, {args.model.name}, batch {args.batch}, medians of {args.repeats}")
    print(table(["type", "family", "items", "sequential (s)", "batched (s)", "speed-up", "prefill alone (s)",
                 "outputs differing"], rows))
    save("batched", results)


if __name__ == "__main__":
    main()
