"""Batched greedy generation in llama.cpp against the sequential loop, same items, same run.

    python bench/batched.py [--types F16 Q8_0 Q4_K_M] [--batch 32] [--repeats 1] [--model FOLDER]
                            [--device cpu|cuda] [--items N] [--random random-1b|random-8b]

For every generative eval family (all 300 items of data/eval) and every GGUF type of the
model: seconds for the family's greedy completions one prompt at a time (batch 1) and with
`--batch` prompts decoded together (one KV sequence per prompt, one llama_decode per step),
first with every prompt prefilled whole, then as the evaluation runs them, a prompt taking
the prefix it shares with its neighbour from that one's KV cells; interleaved, medians;
the share of prompt tokens taken so; whether every output is the sequential one; and the
time of prefilling the family's prompts alone. Prompts are rendered as the evaluation
renders them: through the model's chat template where its GGUF carries one.
`--device cuda` offloads every layer to the GPU (llama.cpp built with CUDA); `--items N`
takes each family's first N items; `--random NAME` times a random-initialised Llama of that
shape (bench/quantize.py's RANDOM_MODELS and an 8B-class one, with the tokenizer of the
model `--tokenizer` names: by default the 8M's, raw prompts; the 33M chat model's gives it
that chat template, and the prompts an instruct model is given), made
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
MODES = ("sequential", "unshared", "batched")


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


def _random(name: str, work: Path, tokenizer: Path) -> Path:
    """A seeded random-initialised Llama of the named shape, fp16, with the tokenizer (and
    the chat template, where it has one) of the model in `tokenizer`, written by a child
    process (torch stays out of this one)."""
    subprocess.run([sys.executable, __file__, "--write-random", name, str(work), str(tokenizer)], check=True)
    return work / name


def _write_random(name: str, work: Path, tokenizer: Path) -> None:
    import json
    import shutil

    import torch
    from quantize import RANDOM_MODELS
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = RANDOM_8B if name == "random-8b" else RANDOM_MODELS[name]
    folder = work / name
    torch.manual_seed(0)
    vocabulary = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(vocab_size=vocabulary, max_position_embeddings=2048, torch_dtype="float16", **shape)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM._from_config(config, torch_dtype=torch.float16)
    model.save_pretrained(str(folder))
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer / file).is_file():
            shutil.copy(tokenizer / file, folder / file)
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters", flush=True)


def _timed(runtime, size: int, prompts: list[str], budget: int, special: bool,
           shared: bool = True) -> tuple[float, list[str]]:
    """The family's greedy completions with `size` prompts decoded together, on the loaded
    model (`complete` opens a context of `size` sequences for the call: the model is loaded
    once per type, not once per mode: an 8B F16 file is 14 GB); `shared` False: every
    prompt prefilled whole, no prefix taken from its neighbour."""
    from quantbuild.runtimes import llama_cpp

    runtime.parallel = size
    least = llama_cpp.SHARED_PREFIX
    llama_cpp.SHARED_PREFIX = least if shared else 1 << 30
    try:
        started = time.perf_counter()
        outputs = runtime.complete(prompts, budget, special)
        return time.perf_counter() - started, outputs
    finally:
        llama_cpp.SHARED_PREFIX = least


def _prefill(runtime, prompts: list[str], special: bool) -> float:
    runtime.parallel = 1
    tokens = [runtime.tokenize(prompt, special) for prompt in prompts]
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
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "baseline" / "workflow-llama-8m",
                        help="--random: the model whose tokenizer and chat template the random model gets")
    parser.add_argument("--write-random", nargs=3, metavar=("NAME", "FOLDER", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--convert", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_random:
        _write_random(args.write_random[0], Path(args.write_random[1]), Path(args.write_random[2]))
        return
    if args.convert:
        from quantbuild.runtimes.gguf_file import convert

        convert(Path(args.convert[0]), Path(args.convert[1]), "f16")
        return
    from quantbuild.runtimes.llama_bindings import bindings

    bindings()  # before numpy and gguf-py (the evaluate stage's order: stages/evaluate.py)

    from quantbuild import prompts as formats
    from quantbuild.evaluation.suites import MAX_NEW_TOKENS
    from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec, open_runtime
    from quantbuild.tasks.items import load_items

    items = {family: load_items(ROOT / "data" / "eval" / f"{family}.jsonl") for family in FAMILIES}
    if args.items:
        items = {family: family_items[:args.items] for family, family_items in items.items()}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        model = _random(args.random, Path(folder), args.tokenizer) if args.random else args.model
        for name, path in _files(model, args.types, Path(folder)).items():
            spec = LoadSpec(LLAMA_CPP, path, threads=0, batch_size=args.batch, device=args.device)
            # as the evaluation prompts the artifact: through its chat template, where it has one
            prompt_format = formats.for_artifact(spec)
            totals = dict.fromkeys(MODES, 0.0)
            with open_runtime(spec) as runtime:
                runtime.reserve(1300)
                for family in FAMILIES:
                    prompts = [prompt_format.render(item) for item in items[family]]
                    times: dict[str, list[float]] = {mode: [] for mode in MODES}
                    outputs = {}
                    for _ in range(args.repeats):
                        for mode, size, shared in (("sequential", 1, False), ("unshared", args.batch, False),
                                                   ("batched", args.batch, True)):
                            before = dict(runtime.prompt_tokens)
                            seconds, outputs[mode] = _timed(runtime, size, prompts, MAX_NEW_TOKENS[family],
                                                            prompt_format.chat, shared)
                            times[mode].append(seconds)
                            if shared:  # the prompt tokens the evaluation's way prefilled and took
                                counted = {key: runtime.prompt_tokens[key] - before[key] for key in before}
                    prefill = _prefill(runtime, prompts, prompt_format.chat)
                    differing = {mode: sum(a != b for a, b in zip(outputs["sequential"], outputs[mode]))
                                 for mode in ("unshared", "batched")}
                    medians = {mode: statistics.median(times[mode]) for mode in MODES}
                    for mode in MODES:
                        totals[mode] += medians[mode]
                    share = counted["shared"] / (counted["shared"] + counted["prefilled"])
                    results[f"{name} {family}"] = {**{f"{mode}_s": medians[mode] for mode in MODES},
                                                   "prefill_s": prefill, "items": len(prompts),
                                                   "prompt_tokens": counted, "differing_outputs": differing}
                    rows.append([name, family, len(prompts), *(f"{medians[mode]:.2f}" for mode in MODES),
                                 f"{medians['sequential'] / medians['batched']:.2f}x", f"{prefill:.2f}",
                                 f"{share:.0%}", f"{differing['unshared']} / {differing['batched']}"])
                    print(rows[-1], flush=True)
            rows.append([name, "all four", sum(len(v) for v in items.values()),
                         *(f"{totals[mode]:.2f}" for mode in MODES),
                         f"{totals['sequential'] / totals['batched']:.2f}x", "", "", ""])
    print(f"llama.cpp on {args.device}, {args.random or args.model.name}, batch {args.batch}, medians of {args.repeats}")
    print(table(["type", "family", "items", "sequential (s)", "batched, prefixes unshared (s)", "batched (s)",
                 "speed-up", "prefill alone (s)", "prompt tokens shared", "outputs differing (unshared / batched)"],
                rows))
    save("batched", results)


if __name__ == "__main__":
    main()
