"""Batched greedy generation in llama.cpp against the sequential loop, same items, same run.

    python bench/batched.py [--types F16 Q8_0 Q4_K_M] [--batch 32] [--repeats 1] [--model FOLDER]
                            [--device cpu|cuda] [--items N] [--random random-1b|random-8b]

For every generative eval family (all 300 items of data/eval) and every GGUF type of the
model: seconds for the family's greedy completions one prompt at a time (batch 1) and with
`--batch` prompts decoded together (one KV sequence per prompt, one llama_decode per step),
interleaved, medians; whether every output is the same; and the time of prefilling the
family's prompts alone, which no batching of the decode steps can remove on a CPU.
`--device cuda` offloads every layer to the GPU (llama.cpp built with CUDA); `--items N`
takes each family's first N items; `--random NAME` times a random-initialised Llama of that
shape (bench/quantize.py's RANDOM_MODELS and an 8B-class one, the bundled tokenizer), made
on the GPU where there is one, in a child process: llama.cpp's CUDA build and a CUDA torch
crash in one process (src/quantbuild/runtimes/llama_cpp.py), so this one never imports torch
(the F16 conversion runs in a child too) and loads llama.cpp's libraries before any other.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, save, table

FAMILIES = ("structured", "retrieval", "long_context", "reasoning")


def _files(model: Path, types: list[str], work: Path) -> dict[str, Path]:
    from quantbuild.runtimes.llama_build import run_tool

    base = work / "F16.gguf"
    started = time.perf_counter()
    # the converter runs torch: in a child process, as the random model is written
    subprocess.run([sys.executable, __file__, "--convert", str(model), str(base)], check=True)
    print(f"convert to F16 GGUF: {time.perf_counter() - started:.1f} s", flush=True)
    files = {"F16": base}
    for name in types:
        if name != "F16":
            files[name] = work / f"{name}.gguf"
            started = time.perf_counter()
            run_tool("llama-quantize", [str(base), str(files[name]), name, "0"], f"quantize {name}")
            print(f"llama-quantize {name}: {time.perf_counter() - started:.1f} s", flush=True)
    return {name: files[name] for name in types}


RANDOM_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)


def _random(name: str, work: Path) -> Path:
    """A seeded random-initialised Llama of the named shape, fp16, with the bundled tokenizer,
    written by a child process (torch stays out of this one)."""
    subprocess.run([sys.executable, __file__, "--write-random", name, str(work)], check=True)
    return work / name


def _write_random(name: str, work: Path) -> None:
    import shutil

    import torch
    from quantize import BASELINE, RANDOM_MODELS
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = RANDOM_8B if name == "random-8b" else RANDOM_MODELS[name]
    folder = work / name
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, max_position_embeddings=2048, torch_dtype="float16", **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.float16)
    model.save_pretrained(str(folder))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BASELINE / file, folder / file)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)


def _timed(runtime, size: int, prompts: list[str], budget: int) -> tuple[float, list[str]]:
    """The family's greedy completions with `size` prompts decoded together, on the loaded
    model (`complete` opens a context of `size` sequences for the call: the model is loaded
    once per type, not once per mode: an 8B F16 file is 14 GB)."""
    runtime.parallel = size
    started = time.perf_counter()
    outputs = runtime.complete(prompts, budget)
    return time.perf_counter() - started, outputs


def _prefill(runtime, prompts: list[str]) -> float:
    runtime.parallel = 1
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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--items", type=int, default=0, help="each family's first N items (0: all)")
    parser.add_argument("--random", choices=("random-100m", "random-1b", "random-8b"))
    parser.add_argument("--write-random", nargs=2, metavar=("NAME", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_random:
        _write_random(args.write_random[0], Path(args.write_random[1]))
        return
    if args.convert:
        from quantbuild.runtimes.gguf_file import convert

        convert(Path(args.convert[0]), Path(args.convert[1]), "f16")
        return
    from quantbuild.runtimes.llama_bindings import bindings

    bindings()  # before numpy and gguf-py (the evaluate stage's order: stages/evaluate.py)

    from quantbuild.evaluation.suites import MAX_NEW_TOKENS
    from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec, open_runtime
    from quantbuild.tasks.items import load_items

    items = {family: load_items(ROOT / "data" / "eval" / f"{family}.jsonl") for family in FAMILIES}
    if args.items:
        items = {family: family_items[:args.items] for family, family_items in items.items()}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        model = _random(args.random, Path(folder)) if args.random else args.model
        for name, path in _files(model, args.types, Path(folder)).items():
            spec = LoadSpec(LLAMA_CPP, path, threads=0, batch_size=args.batch, device=args.device)
            totals = {"sequential": 0.0, "batched": 0.0}
            with open_runtime(spec) as runtime:
                runtime.reserve(1300)
                for family in FAMILIES:
                    prompts = [item.prompt for item in items[family]]
                    times: dict[str, list[float]] = {"sequential": [], "batched": []}
                    outputs = {}
                    for _ in range(args.repeats):
                        for mode, size in (("sequential", 1), ("batched", args.batch)):
                            seconds, outputs[mode] = _timed(runtime, size, prompts, MAX_NEW_TOKENS[family])
                            times[mode].append(seconds)
                    prefill = _prefill(runtime, prompts)
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
    print(f"llama.cpp on {args.device}, {args.random or args.model.name}, batch {args.batch}, medians of {args.repeats}")
    print(table(["type", "family", "items", "sequential (s)", "batched (s)", "speed-up", "prefill alone (s)",
                 "outputs differing"], rows))
    save("batched", results)


if __name__ == "__main__":
    main()
