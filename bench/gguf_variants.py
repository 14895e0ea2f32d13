"""llama.cpp / GGUF benchmarks (numbers for the closing note and bench/README.md).

    python bench/gguf_variants.py speed      [--repeats 5]
    python bench/gguf_variants.py quality    [--tokens 60000] [--model FOLDER]
    python bench/gguf_variants.py imatrix    [--tokens 60000]
    python bench/gguf_variants.py throughput [--items 16]
    python bench/gguf_variants.py noise      [--repeats 8]
    python bench/gguf_variants.py agreement  (after make demo)
    python bench/gguf_variants.py measures   --targets 3.5 4.5 [--model FOLDER] [--tokens 40000] [--oracle]
    python bench/gguf_variants.py validated  --targets 3.0 3.5 4.0 4.5 5.0 --tokens 16384 [--model FOLDER] [--measure kl]
    python bench/gguf_variants.py verdicts   --tokens 40000 [--model FOLDER]

speed: quantbuild's gguf quantize (`build_variant`: checks, plan, llama-quantize, the
lineage rewrite, hashing, the record) against `llama-quantize` called directly on the same
base GGUF and imatrix, interleaved, medians.
quality: llama.cpp's own `llama-perplexity --kl-divergence` against the F16 baseline's
logits on held-out text (generated with seeds disjoint from calibration and eval): stock
llama.cpp presets with and without quantbuild's importance matrix, and quantbuild's auto-mix
at several bits-per-weight targets; bpw is the whole file's bits per parameter.
imatrix: the same KLD for Q4_K_M / IQ4_XS with no imatrix and with imatrices from growing
slices of the calibration mix (how big it must be before it helps).
throughput: the evaluation suites on the same baseline in llama.cpp (its F16 GGUF) and on
the torch path (transformers, float32), same items, same process.
noise: the gate's latency check of the baseline against itself, over repeated suites: the
margin a "no slower" latency budget has to allow on this machine.
measures: the sensitivity stage's two measures on one model: the time each takes, the rank
correlation of their per-layer tables, and llama.cpp's own KLD (held-out text) of the
auto-mixes each plans at 3.5 and 4.5 bits per weight (the demo's mix types).
validated: the auto-mix ladder as the pipeline builds it (nested plans, each validated on
three held-out texts against the stock presets no larger and the smaller plans of its
chain): what each target ships, and on three test texts that chose nothing, every stock
preset from 3 to 5 bits per weight against the best shipped variant no larger.
verdicts: whether the importance matrix helps each mix type, as the sensitivity table's
weight-space estimate says (what a plan's validation now reads) and as llama.cpp's own KLD of
each type's `--pure` files with and without the matrix measures on held-out text.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, save, table
BASELINE = ROOT / "data" / "baseline" / "workflow-llama-8m"
SOURCES = {"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15, "domain_text": 0.2}


def _calibration(samples: int = 48, imatrix_samples: int = 600):
    from quantbuild.config import CalibrationConfig, SensitivityConfig

    return CalibrationConfig(sources=SOURCES, samples=samples, seq_len=512, imatrix_samples=imatrix_samples,
                             sensitivity=SensitivityConfig(samples=4, family_tokens=1536))


def random_model(folder: Path, hidden: int = 768, intermediate: int = 2048, layers: int = 12) -> Path:
    """A random-initialised Llama (~91M parameters at the defaults) with the bundled tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(BASELINE)).save_pretrained(str(folder))
    return folder


def _prepare(work: Path, imatrix_samples: int = 600, baseline: Path = BASELINE, planned: dict | None = None,
             sensitivity=None):
    """Base GGUF + imatrix + calibration, as the pipeline makes them, and the sensitivity
    stage's tables for the `planned` variants (in work/sensitivity)."""
    from quantbuild.calibration import compose_calibration, load_calibration
    from quantbuild.gguf_base import build_base, build_imatrix
    from quantbuild.quantizers import Inputs
    from quantbuild.sensitivity import write_sensitivity

    calibration = _calibration(imatrix_samples=imatrix_samples)
    if sensitivity is not None:
        from dataclasses import replace

        calibration = replace(calibration, sensitivity=sensitivity)
    build_base(baseline, "f16", needed=True, out=work / "base")
    build_imatrix(work / "base", baseline, calibration, ROOT / "data" / "calibration", needed=True, repack=False,
                  out=work / "imatrix")
    compose_calibration(calibration, ROOT / "data" / "calibration", baseline, work / "calibration")
    inputs = Inputs(baseline, load_calibration(work / "calibration"), gguf_base=work / "base",
                    imatrix=work / "imatrix", lineage={})
    if planned:
        write_sensitivity(baseline, inputs.calibration, planned, calibration.sensitivity, work / "base",
                          work / "sensitivity", imatrix=work / "imatrix")
    return inputs


def _with_table(inputs, work: Path, key: str):
    from dataclasses import replace

    from quantbuild.sensitivity import load_sensitivity

    return replace(inputs, sensitivity=load_sensitivity(work / "sensitivity", key))




def speed(args: argparse.Namespace) -> None:
    rows, results = [], {}
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            for name, ours, direct in _speed_runs(model, Path(folder), args.repeats):
                results[f"{model} {name}"] = {"quantbuild_s": ours, "direct_s": direct}
                rows.append([model, name, f"{statistics.median(ours):.3f}", f"{statistics.median(direct):.3f}",
                             f"{statistics.median(ours) / statistics.median(direct):.2f}x"])
    print(table(["model", "type", "quantbuild build_variant (s)", "llama-quantize direct (s)", "ratio"], rows))
    save("gguf_speed", results)


def _speed_runs(model: str, work: Path, repeats: int) -> list[tuple[str, list[float], list[float]]]:
    """Interleaved timings of quantbuild's build_variant and llama-quantize on the same files."""
    from quantbuild.config import GgufConfig
    from quantbuild.quantization import build_variant
    from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE
    from quantbuild.runtimes.llama_build import run_tool

    baseline = BASELINE if model == "baseline" else random_model(work / "random")
    inputs = _prepare(work, imatrix_samples=600 if model == "baseline" else 48, baseline=baseline)
    runs = []
    for name, variant, extra in [("Q8_0", GgufConfig(type="Q8_0"), []),
                                 ("Q4_K_M imatrix", GgufConfig(type="Q4_K_M", imatrix=True),
                                  ["--imatrix", str(work / "imatrix" / IMATRIX_FILE)])]:
        ours, direct = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            build_variant("bench", variant, inputs, work / "variant")
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            run_tool("llama-quantize", [*extra, str(work / "base" / BASE_FILE), str(work / "direct.gguf"),
                                        variant.type, "2"], "direct")
            direct.append(time.perf_counter() - started)
        runs.append((name, ours, direct))
    return runs


def heldout_text(tokens: int) -> str:
    """Prose and workflow text from the task generators with seeds disjoint from calibration
    (seed 0 draws) and eval: about `tokens` tokens."""
    from transformers import AutoTokenizer

    from quantbuild.tasks.calibration_sources import generate

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    texts, count, seed = [], 0, 1000
    while count < tokens:
        for source in ("domain_text", "workflow_prompts", "tool_calls", "long_context"):
            for record in generate(source, 16, seed):
                texts.append(record["text"])
                count += len(tokenizer(record["text"], verbose=False)["input_ids"])
        seed += 1
    return "\n\n".join(texts)


def _kld(model: Path, base_logits: Path, text: Path) -> dict:
    from quantbuild.runtimes.llama_build import run_tool

    # llama.cpp logs through an asynchronous writer, and its closing statistics were missing
    # from the captured output now and then: the (deterministic) run is repeated until they show.
    for _ in range(4):
        output = run_tool("llama-perplexity", ["-m", str(model), "-f", str(text), "--kl-divergence-base",
                                               str(base_logits), "--kl-divergence", "-c", "512", "-b", "512", "-t", "2",
                                               "--no-repack"], "kld")
        mean = re.search(r"Mean\s+KLD:\s+([-\d.]+)", output)
        top = re.search(r"Same top p:\s+([\d.]+)", output)
        if mean and top:
            return {"kld_mean": float(mean.group(1)), "same_top_pct": float(top.group(1))}
    raise RuntimeError(f"llama-perplexity printed no KLD statistics for {model}:\n{output[-2000:]}")


def _file_bpw(path: Path) -> float:
    from quantbuild.runtimes.gguf_file import layout

    tensors = layout(path).tensors
    return sum(tensor.nbytes for tensor in tensors) * 8 / sum(tensor.elements for tensor in tensors)


def _base_logits(work: Path, tokens: int) -> tuple[Path, Path]:
    from quantbuild.gguf_artifacts import BASE_FILE
    from quantbuild.runtimes.llama_build import run_tool

    text = work / "heldout.txt"
    text.write_text(heldout_text(tokens), encoding="utf-8")
    logits = work / "base.kld"
    run_tool("llama-perplexity", ["-m", str(work / "base" / BASE_FILE), "-f", str(text), "--kl-divergence-base",
                                  str(logits), "-c", "512", "-b", "512", "-t", "2", "--no-repack"], "base logits")
    return text, logits


STOCK = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "Q8_0")


def quality(args: argparse.Namespace) -> None:
    """Stock llama.cpp presets (with and without quantbuild's importance matrix) against
    quantbuild's planned auto-mixes at several targets, by llama.cpp's own KLD tool on the
    same held-out tokens; then the Pareto comparison from 3 to 5 bits per weight."""
    from quantbuild.config import GgufConfig
    from quantbuild.quantization import build_variant
    from quantbuild.gguf_artifacts import MODEL_FILE

    stock, planned = {}, {}
    for preset in STOCK:
        stock[preset] = GgufConfig(type=preset)
        stock[f"{preset} + imatrix"] = GgufConfig(type=preset, imatrix=True)
    mixes = {"K/IQ4_XS": ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"],
             "K/IQ4_XS/Q8_0": ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K", "Q8_0"]}
    for target in args.targets:
        for label, types in mixes.items():
            planned[f"plan_{target}_{len(types)}"] = (f"planned {target} {label}",
                                                      GgufConfig(type="Q4_K_S", target_bpw=target, mix_types=types))
            planned[f"plan_{target}_{len(types)}_imat"] = (f"planned {target} {label} + imatrix",
                                                           GgufConfig(type="Q4_K_S", imatrix=True, target_bpw=target,
                                                                      mix_types=types))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        started = time.perf_counter()
        inputs = _prepare(work, baseline=args.model, planned={key: variant for key, (_, variant) in planned.items()})
        print(f"sensitivity of {len(planned)} planned variants: {time.perf_counter() - started:.0f} s", flush=True)
        text, logits = _base_logits(work, args.tokens)
        results = {}
        runs = [(name, variant, inputs) for name, variant in stock.items()]
        runs += [(label, variant, _with_table(inputs, work, key)) for key, (label, variant) in planned.items()]
        for name, variant, variant_inputs in runs:
            record = build_variant("bench", variant, variant_inputs, work / "variant")
            path = work / "variant" / "model" / MODEL_FILE
            results[name] = {"file_bpw": round(_file_bpw(path), 4), "decoder_bpw": record["bits_per_weight"],
                             "planned": name.startswith("planned"), **_kld(path, logits, text)}
    rows = [[name, f"{m['file_bpw']:.3f}", f"{m['decoder_bpw']:.3f}", f"{m['kld_mean']:.6f}",
             f"{m['same_top_pct']:.2f}"] for name, m in sorted(results.items(), key=lambda item: item[1]["file_bpw"])]
    print(f"held-out tokens: ~{args.tokens} (llama-perplexity --kl-divergence, 512-token chunks)")
    print(table(["variant", "file bpw", "decoder bpw", "mean KLD vs F16", "same top-1 %"], rows))
    print(pareto_table(results, 3.0, 5.0))
    save("gguf_quality" if args.model == BASELINE else f"gguf_quality_{args.model.name}", results)


def pareto_table(results: dict, low: float, high: float) -> str:
    """Per stock preset between `low` and `high` file bpw: the best planned variant no larger
    than it, and whether that variant has the lower KLD (planned dominates)."""
    planned = {name: m for name, m in results.items() if m["planned"]}
    rows, wins = [], 0
    stock = sorted(((name, m) for name, m in results.items() if not m["planned"] and low <= m["file_bpw"] <= high),
                   key=lambda item: item[1]["file_bpw"])
    for name, measured in stock:
        fits = [(m["kld_mean"], other) for other, m in planned.items() if m["file_bpw"] <= measured["file_bpw"]]
        if not fits:
            rows.append([name, f"{measured['file_bpw']:.3f}", f"{measured['kld_mean']:.6f}", "-", "-", "no"])
            continue
        kld, best = min(fits)
        better = kld < measured["kld_mean"]
        wins += better
        rows.append([name, f"{measured['file_bpw']:.3f}", f"{measured['kld_mean']:.6f}", best,
                     f"{planned[best]['file_bpw']:.3f} / {kld:.6f}", "yes" if better else "no"])
    header = ["stock preset", "file bpw", "KLD", "best planned at <= its bpw", "its bpw / KLD", "planned better"]
    return (f"\nPareto, {low}-{high} bits per weight: a planned variant no larger and with lower KLD than "
            f"{wins} of {len(stock)} stock presets\n" + table(header, rows))


def imatrix(args: argparse.Namespace) -> None:
    from quantbuild.config import GgufConfig
    from quantbuild.quantization import build_variant
    from quantbuild.gguf_artifacts import MODEL_FILE

    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        inputs = _prepare(work, imatrix_samples=48)
        text, logits = _base_logits(work, args.tokens)
        for samples in (0, 48, 150, 300, 600):
            if samples:
                inputs = _prepare(work, imatrix_samples=samples)
            tokens = json.loads((work / "imatrix" / "imatrix_record.json").read_text())["imatrix"]["tokens_used"]
            for preset in ("Q4_K_M", "IQ4_XS", "Q3_K_S"):
                build_variant("bench", GgufConfig(type=preset, imatrix=bool(samples)), inputs, work / "variant")
                measured = _kld(work / "variant" / "model" / MODEL_FILE, logits, text)
                results[f"{preset}@{samples}"] = {"imatrix_tokens": tokens if samples else 0, **measured}
                rows.append([preset, samples, tokens if samples else 0, f"{measured['kld_mean']:.6f}"])
    print(table(["type", "imatrix samples", "imatrix tokens", "mean KLD vs F16"], rows))
    save("gguf_imatrix", results)


def throughput(args: argparse.Namespace) -> None:
    """The suites on llama.cpp against the torch path, for the baseline and for a 4-bit
    variant of each runtime (GGUF Q4_K_M; GPTQ 4-bit g128, scored dequantized and timed on
    GPTQModel's kernels, the path the GGUF ladder replaces on CPUs)."""
    from dataclasses import replace

    from quantbuild.config import EvalConfig, GgufConfig, GptqConfig, LatencyConfig, MemoryConfig
    from quantbuild.evaluation.runner import evaluate, gguf_spec, torch_spec
    from quantbuild.gguf_artifacts import BASE_FILE, MODEL_FILE
    from quantbuild.quantization import build_variant

    config = EvalConfig(limit=args.items, batch_size=16, latency=LatencyConfig(prompt_lengths=[64], repeats=3),
                        memory=MemoryConfig(context_lengths=[256]))
    data = ROOT / "data" / "eval"
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        inputs = _prepare(work, imatrix_samples=48)
        build_variant("q4", GgufConfig(type="Q4_K_M"), replace(inputs, lineage={}), work / "q4")
        build_variant("gptq", GptqConfig(bits=4, group_size=128), inputs, work / "gptq")
        runs = {
            "baseline, llama.cpp (F16 GGUF)": lambda out: evaluate(
                gguf_spec(work / "base" / BASE_FILE, "f16", config, False), config, data, out, None),
            "baseline, torch (transformers float32)": lambda out: evaluate(
                torch_spec(BASELINE, config), config, data, out, None,
                deployed=torch_spec(BASELINE, config, config.latency.runtime)),
            "4-bit, llama.cpp (Q4_K_M)": lambda out: evaluate(
                gguf_spec(work / "q4" / "model" / MODEL_FILE, "f16", config, False), config, data, out, None),
            "4-bit, torch (GPTQ, GPTQModel kernels for latency)": lambda out: evaluate(
                torch_spec(work / "gptq" / "model", config), config, data, out, None,
                deployed=torch_spec(work / "gptq" / "model", config, config.latency.runtime)),
        }
        for name, run in runs.items():
            repeats = 1 if "GPTQ" in name else args.repeats
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                run(work / "eval")
                seconds.append(time.perf_counter() - started)
            results[name] = {"seconds": seconds, "items": args.items * 5}
            rows.append([name, repeats, f"{statistics.median(seconds):.2f}",
                         f"{args.items * 5 / statistics.median(seconds):.1f}"])
    print(f"{args.items * 5} items ({args.items} per family, 5 families) + latency (64-token prompts) + memory suites")
    print(table(["model, runtime", "runs", "seconds (median)", "items/s"], rows))
    save("gguf_throughput", results)


def noise(args: argparse.Namespace) -> None:
    """The gate's latency checks run on the baseline against itself: the p99 ratio of two
    independent suites (max_latency_p99_ratio) and the interleaved ratio of medians
    (max_latency_paired_ratio), each over `repeats` trials with params.yaml's eval.latency."""
    from quantbuild.validation import load_config
    from quantbuild.evaluation.latency import measure_latency, paired_latency
    from quantbuild.gate import latency_ratio
    from quantbuild.gguf_base import build_base
    from quantbuild.gguf_artifacts import BASE_FILE
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    config = load_config(ROOT / "params.yaml").eval
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build_base(BASELINE, "f16", needed=True, out=work / "base")
        with LlamaCppModel(work / "base" / BASE_FILE, n_ctx=1024, threads=2) as first, \
                LlamaCppModel(work / "base" / BASE_FILE, n_ctx=1024, threads=2) as second:
            separate = [latency_ratio(measure_latency(first, config), measure_latency(second, config)) for _ in range(args.repeats)]
            paired = [paired_latency(second, first, config)["worst"]["ratio"] for _ in range(args.repeats)]
    for name, ratios in (("p99, separate suites (max_latency_p99_ratio)", separate),
                         ("median, interleaved (max_latency_paired_ratio)", paired)):
        results[name] = ratios
        rows.append([name, f"{max(ratios):.3f}", f"{statistics.median(ratios):.3f}", f"{min(ratios):.3f}"])
    print(f"baseline F16 GGUF against itself, {args.repeats} trials, {config.latency.repeats} timed runs per prompt "
          f"length {config.latency.prompt_lengths}; worst ratio over lengths and TTFT/decode")
    print(table(["check", "worst", "median", "best"], rows))
    save("gguf_latency_noise", results)




def agreement(args: argparse.Namespace) -> None:
    """quantbuild's language-modelling KLD (the evaluate stage's measurements.json) against
    llama.cpp's own `llama-perplexity --kl-divergence` on the same GGUF files and text: the
    eval texts joined by newlines, 512-token chunks."""
    from quantbuild.validation import load_config
    from quantbuild.hashing import read_json
    from quantbuild.runtimes.llama_build import run_tool
    from quantbuild.tasks.items import load_items

    config = load_config(ROOT / "params.yaml")
    paths = config.paths
    texts = [item.prompt for item in load_items(ROOT / paths.eval_data / "language_modelling.jsonl")]
    texts = texts[: config.eval.limit] if config.eval.limit else texts
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        text, logits = work / "lm.txt", work / "base.kld"
        text.write_text("\n".join(texts), encoding="utf-8")
        run_tool("llama-perplexity", ["-m", str(ROOT / paths.gguf_base / "base.gguf"), "-f", str(text),
                                      "--kl-divergence-base", str(logits), "-c", str(config.eval.kl_context), "-b",
                                      str(config.eval.kl_context), "-t", "2", "--no-repack"], "base logits")
        for name in sorted(config.quant.variants):
            ours = read_json(ROOT / paths.eval / name / "measurements.json")
            if ours.get("kld_mean") is None or not ours["kld_mean"] > 0:
                continue
            theirs = _kld(ROOT / paths.quantized / name / "model" / "model.gguf", logits, text)
            results[name] = {"quantbuild": ours["kld_mean"], "llama_perplexity": theirs["kld_mean"],
                             "quantbuild_items": ours.get("items_kld_mean")}
            rows.append([name, f"{ours['kld_mean']:.6f}", f"{theirs['kld_mean']:.6f}",
                         f"{ours['kld_mean'] / theirs['kld_mean']:.3f}", f"{ours.get('items_kld_mean', 0):.6f}"])
    print(f"{len(texts)} eval texts, {config.eval.kl_context}-token chunks, second halves scored")
    print(table(["variant", "quantbuild KLD", "llama-perplexity KLD", "ratio", "quantbuild per-item KLD"], rows))
    save("gguf_kld_agreement", results)


def _spearman(first: list[float], second: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for index in order[start:end + 1]:
                out[index] = (start + end) / 2
            start = end + 1
        return out

    a, b = ranks(first), ranks(second)
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b))
    return cov / ((sum((x - mean_a) ** 2 for x in a) * sum((y - mean_b) ** 2 for y in b)) ** 0.5)


def measures(args: argparse.Namespace) -> None:
    """The KL and weight-error sensitivity measures on one model: time, rank agreement and
    the KLD of the plans each makes."""
    from dataclasses import replace

    from quantbuild.config import GgufConfig
    from quantbuild.gguf_artifacts import MODEL_FILE
    from quantbuild.quantization import build_variant
    from quantbuild.sensitivity import KL, WEIGHT_ERROR, load_sensitivity, write_sensitivity

    mix = ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"]
    # the planner's own plans, each measure's: not validated against the presets (which may
    # ship a preset or another plan instead)
    targets = {f"mix_{str(t).replace('.', 'p')}": GgufConfig(type="Q4_K_S", target_bpw=t, mix_types=mix,
                                                             validation_tokens=0)
               for t in args.targets}
    results: dict = {"model": args.model.name, "measures": {}, "plans": {}}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        inputs = _prepare(work, baseline=args.model)
        calibration = _calibration().sensitivity
        tables = {}
        for measure in (KL, WEIGHT_ERROR):
            config = replace(calibration, measure=measure)
            started = time.perf_counter()
            write_sensitivity(args.model, inputs.calibration, targets, config, work / "base", work / measure)
            seconds = time.perf_counter() - started
            tables[measure] = {key: load_sensitivity(work / measure, key) for key in targets}
            results["measures"][measure] = {"seconds": round(seconds, 1)}
            print(f"{measure}: {seconds:.1f} s", flush=True)
        first = next(iter(targets))
        kl_layers, we_layers = tables[KL][first]["layers"], tables[WEIGHT_ERROR][first]["layers"]
        candidates = tables[KL][first]["candidates"]
        pairs = [(kl_layers[layer]["kld"][c]["calibration"], we_layers[layer]["kld"][c]["calibration"])
                 for layer in kl_layers for c in candidates]
        results["spearman_all"] = _spearman(*map(list, zip(*pairs)))
        results["spearman_by_candidate"] = {
            c: _spearman([kl_layers[layer]["kld"][c]["calibration"] for layer in kl_layers],
                         [we_layers[layer]["kld"][c]["calibration"] for layer in kl_layers]) for c in candidates}
        # what the planner compares: the divergence removed per extra bit, one type up
        gains = {"kl": [], "we": []}
        for layer in kl_layers:
            for low, high in zip(candidates, candidates[1:]):
                gains["kl"].append(kl_layers[layer]["kld"][low]["calibration"] - kl_layers[layer]["kld"][high]["calibration"])
                gains["we"].append(we_layers[layer]["kld"][low]["calibration"] - we_layers[layer]["kld"][high]["calibration"])
        results["spearman_gains"] = _spearman(gains["kl"], gains["we"])
        measures = [KL, WEIGHT_ERROR]
        if args.oracle:  # the weight-space table scaled per type and probe set to the measured one's sums
            measures.append(ORACLE)
            tables[ORACLE] = {key: _scaled(tables[WEIGHT_ERROR][key], tables[KL][key], work / ORACLE)
                              for key in targets}
        text, logits = _base_logits(work, args.tokens)
        for key, variant in targets.items():
            for measure in measures:
                record = build_variant("bench", variant, replace(inputs, sensitivity=tables[measure][key]),
                                       work / "variant")
                path = work / "variant" / "model" / MODEL_FILE
                results["plans"][f"{key} {measure}"] = {"decoder_bpw": record["bits_per_weight"],
                                                        "file_bpw": round(_file_bpw(path), 4),
                                                        **_kld(path, logits, text)}
    print(f"{args.model.name}: Spearman rank correlation of the calibration tables, KL vs weight error: "
          f"all layers x types {results['spearman_all']:.3f}; per type "
          + ", ".join(f"{c} {v:.3f}" for c, v in results["spearman_by_candidate"].items())
          + f"; gain per step up {results['spearman_gains']:.3f}")
    rows, logs = [], []
    for key in targets:
        kl, we = results["plans"][f"{key} {KL}"], results["plans"][f"{key} {WEIGHT_ERROR}"]
        logs.append(math.log(we["kld_mean"] / kl["kld_mean"]))
        rows.append([targets[key].target_bpw, f"{kl['decoder_bpw']:.3f} / {we['decoder_bpw']:.3f}",
                     f"{kl['kld_mean']:.6f}", f"{we['kld_mean']:.6f}", f"{we['kld_mean'] / kl['kld_mean']:.3f}"])
    results["geomean_kld_ratio"] = math.exp(sum(logs) / len(logs))
    print(table(["target bpw", "decoder bpw (kl / weight_error)", "KLD, kl plan", "KLD, weight_error plan",
                 "ratio"], rows))
    print(f"geometric mean of the KLD ratio (weight_error / kl): {results['geomean_kld_ratio']:.3f}")
    if args.oracle:
        rows = [[targets[key].target_bpw, f"{results['plans'][f'{key} {KL}']['kld_mean']:.6f}",
                 f"{results['plans'][f'{key} {ORACLE}']['kld_mean']:.6f}",
                 f"{results['plans'][f'{key} {ORACLE}']['kld_mean'] / results['plans'][f'{key} {KL}']['kld_mean']:.3f}"]
                for key in targets]
        print("the weight-space table scaled per type and probe set to the measured table's sums (an oracle:")
        print("the most a per-type calibration of the estimate could give)")
        print(table(["target bpw", "KLD, kl plan", "KLD, scaled weight_error plan", "ratio"], rows))
    save(f"sensitivity_measures_{args.model.name}", results)


ORACLE = "weight_error_scaled"


def _scaled(estimate: dict, measured: dict, folder: Path) -> dict:
    """`estimate` (a weight-space table) with each candidate's values on each probe set scaled
    so that they sum, over the layers, to `measured`'s (the kl table's) on that set."""
    import copy

    from quantbuild.sensitivity import load_sensitivity

    scaled = copy.deepcopy({key: value for key, value in estimate.items() if key != "sha256"})
    for candidate in estimate["candidates"]:
        for probe in next(iter(estimate["layers"].values()))["kld"][candidate]:
            total = sum(layer["kld"][candidate][probe] for layer in estimate["layers"].values())
            factor = sum(layer["kld"][candidate][probe] for layer in measured["layers"].values()) / total if total else 1.0
            for layer in scaled["layers"].values():
                layer["kld"][candidate][probe] *= factor
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mix.json").write_text(json.dumps(scaled))
    return load_sensitivity(folder, "mix")


def verdicts(args: argparse.Namespace) -> None:
    """Whether the importance matrix helps each mix type: the sensitivity table's weight-space
    estimate (every decoder layer at the type, with and without the matrix: the `--pure` file's
    analogue) against the two `--pure` files measured, on the plan validation's own three
    texts (rendered through the chat template on an instruct model: the measurement the
    validation takes per type) and by llama.cpp's own
    `llama-perplexity --kl-divergence` on raw held-out text."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from quantbuild.config import GgufConfig
    from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE
    from quantbuild.plan_validation import MODULE, PURE_FILE_TYPES, TEXTS_REFERENCE, validation_texts
    from quantbuild.prompts import tokenizer_template
    from quantbuild.runtimes.llama_build import run_tool
    from quantbuild.runtimes.llama_worker import LlamaWorker
    from quantbuild.sensitivity import WEIGHT_ERROR, load_sensitivity

    mix = ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"]
    variant = GgufConfig(type="Q4_K_S", target_bpw=3.5, mix_types=mix, validation_tokens=16384)
    # the same mix with the matrix (another target: the two plans nest): its table holds every type with it
    planned = {"mix": variant, "mix_imatrix": replace(variant, imatrix=True, target_bpw=3.75)}
    rows, results = [], {"model": args.model.name, "types": {}}
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    template = tokenizer_template(tokenizer)
    drawn = validation_texts(variant.validation_tokens, lambda value: len(tokenizer(value, verbose=False)["input_ids"]),
                             template=template)
    settings = {"threads": 2, "repack": False, "device": "cpu", **({"special": True} if template else {})}
    with tempfile.TemporaryDirectory() as folder, LlamaWorker(MODULE, settings) as worker:
        work = Path(folder)
        sensitivity = replace(_calibration().sensitivity, measure=WEIGHT_ERROR)
        _prepare(work, baseline=args.model, planned=planned, sensitivity=sensitivity)
        tables = {name: load_sensitivity(work / "sensitivity", name)["layers"] for name in planned}
        text, logits = _base_logits(work, args.tokens)
        base = work / "base" / BASE_FILE
        worker.ask("reference", name=TEXTS_REFERENCE, path=str(base), drawn=drawn)
        for kind in mix:
            # every decoder layer at the type, each layer's estimate the mean over the probe sets
            estimate = {side: sum(sum(values.values()) / len(values) for values in
                                  (layer["kld"][kind + suffix] for layer in tables[name].values()))
                        for side, name, suffix in (("without", "mix", ""), ("with", "mix_imatrix", "+imatrix"))}
            texts, perplexity = {}, {}
            for matrix in (False, True):
                path = work / f"pure-{kind}-{matrix}.gguf"
                run_tool("llama-quantize", ["--pure", *(["--imatrix", str(work / "imatrix" / IMATRIX_FILE)] if matrix
                                                        else []), str(base), str(path), PURE_FILE_TYPES[kind], "2"],
                         f"pure {kind}")
                side = "with" if matrix else "without"
                scored = worker.ask("divergence", name=TEXTS_REFERENCE, path=str(path), drawn=drawn)
                texts[side] = sum(entry["kld_mean"] for entry in scored.values()) / len(scored)
                perplexity[side] = _kld(path, logits, text)["kld_mean"]
                path.unlink()
            ratio = {"estimate": estimate["with"] / estimate["without"], "texts": texts["with"] / texts["without"],
                     "llama_perplexity": perplexity["with"] / perplexity["without"]}
            results["types"][kind] = {"estimate": estimate, "texts": texts, "llama_perplexity": perplexity,
                                      "ratio": ratio}
            rows.append([kind, f"{ratio['estimate']:.3f}", f"{ratio['texts']:.3f} ({texts['without']:.5f})",
                         f"{ratio['llama_perplexity']:.3f} ({perplexity['without']:.5f})"])
            print(rows[-1], flush=True)
    print(f"{args.model.name}: KL with the importance matrix / without, per type (every decoder layer at it; "
          f"in brackets the KLD without)")
    print(table(["type", "weight-space estimate", "validation texts" + (", rendered" if template else ""),
                 "llama-perplexity, raw held-out text"], rows))
    save(f"imatrix_verdicts_{args.model.name}", results)


def _stock(base: Path, imatrix: Path, preset: str, matrix: bool, path: Path) -> Path:
    """`base` quantized to the stock `preset` by llama-quantize (2 threads), with the importance
    matrix in the folder `imatrix` where `matrix`."""
    from quantbuild.gguf_artifacts import IMATRIX_FILE
    from quantbuild.runtimes.llama_build import run_tool

    run_tool("llama-quantize", [*(["--imatrix", str(imatrix / IMATRIX_FILE)] if matrix else []),
                                str(base), str(path), preset, "2"], f"{preset}+imatrix" if matrix else preset)
    return path


def _preset_targets(model: Path, base_dir: Path, imatrix: Path, work: Path, low: float = 3.0,
                    high: float = 5.0) -> dict[str, float]:
    """`mix_<preset>` -> the decoder target at which the auto-mix's file (type Q4_K_S, whose
    choices for the tensors outside the decoder it keeps) stores as many tensor bytes as
    each stock preset from `low` to `high` bits per weight stores on this model; and
    `mix_<preset>_imat` where the preset quantized with the importance matrix stores another
    size (IQ4_XS+imatrix is smaller than IQ4_XS on the 33M model)."""
    from quantbuild.gguf_artifacts import BASE_FILE
    from quantbuild.plan_validation import STOCK_PRESETS
    from quantbuild.quantizers import model_layers
    from quantbuild.quantizers.gguf import gguf_names
    from quantbuild.runtimes.gguf_file import layout

    work.mkdir(parents=True, exist_ok=True)
    base = base_dir / BASE_FILE
    decoder = set(gguf_names(model, model_layers(model)).values())
    tensors = layout(base).tensors
    elements = sum(tensor.elements for tensor in tensors)
    decoder_elements = sum(tensor.elements for tensor in tensors if tensor.name in decoder)

    def stored(preset: str, matrix: bool = False) -> tuple[int, int]:
        path = _stock(base, imatrix, preset, matrix, work / f"{preset}.gguf")
        sizes = [(tensor.name in decoder, tensor.nbytes) for tensor in layout(path).tensors]
        path.unlink()
        return sum(size for _, size in sizes), sum(size for inside, size in sizes if inside)
    total, inside = stored("Q4_K_S")
    outside = total - inside
    targets: dict[str, float] = {}
    for preset in STOCK_PRESETS:
        sizes: set[int] = set()
        for matrix in (False, True):
            size = stored(preset, matrix)[0]
            if low <= size * 8 / elements <= high and size not in sizes:
                sizes.add(size)
                targets[f"mix_{preset}" + ("_imat" if matrix else "")] = (size - outside) * 8 / decoder_elements
    return targets


def validated(args: argparse.Namespace) -> None:
    """The auto-mix ladder as the pipeline builds it (issue #28): nested plans (each
    starts from the plan below it), each validated on three held-out texts (seed 5001:
    eval-family, calibration-like, prose) against the stock presets no larger and the smaller
    plans of its chain. Then, on three *test* texts of the same kinds at seed 6001 that chose
    nothing: every stock preset from 3 to 5 bits per weight (with and without the importance
    matrix) against the best shipped variant of the ladder no larger, per text."""
    from transformers import AutoTokenizer

    from quantbuild.config import GgufConfig, SensitivityConfig
    from quantbuild.gguf_artifacts import BASE_FILE, MODEL_FILE
    from quantbuild.plan_validation import PLAN, STOCK_PRESETS, TEXTS, kl_divergence, reference, validation_texts
    from quantbuild.prompts import tokenizer_template
    from quantbuild.quantization import build_variant
    from quantbuild.runtimes.gguf_file import layout
    from quantbuild.sensitivity import write_sensitivity

    mix = ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"]  # the demo's (conf/quant/gguf_mix_3p5.yaml)
    ladder, presets, results = [], {}, {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        measure = SensitivityConfig(samples=4, family_tokens=1536, measure=args.measure,
                                    check_stretches=args.check_stretches)
        inputs = _prepare(work, baseline=args.model, sensitivity=measure)
        targets = _preset_targets(args.model, work / "base", work / "imatrix", work / "sizes") if args.at_presets \
            else {f"mix_{target}": target for target in args.targets}
        if args.only:
            targets = {key: target for key, target in targets.items()
                       if key.removeprefix("mix_").removesuffix("_imat") in args.only}
        planned = {key: GgufConfig(type="Q4_K_S", target_bpw=target, mix_types=mix, validation_tokens=args.tokens)
                   for key, target in targets.items()}
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        # an instruct model's test texts rendered through its chat template, as validation's are
        template = tokenizer_template(tokenizer)
        special = template is not None
        test = validation_texts(args.tokens, lambda v: len(tokenizer(v, verbose=False)["input_ids"]), seed=6001,
                                template=template)
        started = time.perf_counter()
        write_sensitivity(args.model, inputs.calibration, planned, measure, work / "base", work / "sensitivity",
                          imatrix=work / "imatrix")
        print(f"sensitivity ({args.measure}) of {len(planned)} planned variants: {time.perf_counter() - started:.0f} s",
              flush=True)
        base = work / "base" / BASE_FILE
        stored = reference(base, test, 2, False, special=special)
        elements = sum(tensor.elements for tensor in layout(base).tensors)

        def scored(path: Path) -> dict:
            size = sum(tensor.nbytes for tensor in layout(path).tensors)
            return {"bits_per_weight": round(size * 8 / elements, 4), "bytes": size,
                    "test": {kind: entry["kld_mean"] for kind, entry in kl_divergence(path, stored, test, 2, False,
                                                                                       special=special).items()}}
        for key, variant in sorted(planned.items(), key=lambda item: item[1].target_bpw):
            started = time.perf_counter()
            record = build_variant(key, variant, _with_table(inputs, work, key), work / key)
            validation = record["validation"]
            results[key] = {"target_bpw": variant.target_bpw, "validation": validation,
                            "check": record.get("plan_check"),
                            "seconds": round(time.perf_counter() - started, 1),
                            **scored(work / key / "model" / MODEL_FILE)}
            ladder.append(key)
            print(f"{key}: {validation['shipped']} ({results[key]['seconds']:.0f} s)", flush=True)
        for preset in args.only or STOCK_PRESETS:
            for matrix in (False, True):
                name = f"{preset}+imatrix" if matrix else preset
                path = _stock(base, work / "imatrix", preset, matrix, work / f"{name}.gguf")
                presets[name] = scored(path)
                path.unlink()
    rows = []
    for key in ladder:
        entry = results[key]
        measured = entry["validation"]["measured"]
        shipped = entry["validation"]["shipped"]
        own = measured[PLAN].get("planner_tokens", {}).get("kld_mean")
        rows.append([f"{key} {entry['target_bpw']:.3f}", f"{measured[PLAN]['bits_per_weight']:.3f}",
                     f"{own:.6f}" if own is not None else "-", f"{measured[PLAN]['kld_mean']:.6f}",
                     f"{measured[PLAN]['worst_ratio']:.2f}", shipped, f"{measured[shipped]['bits_per_weight']:.3f}",
                     f"{measured[shipped]['worst_ratio']:.2f}", *[f"{entry['test'][kind]:.6f}" for kind in TEXTS],
                     f"{entry['check']['kept']}/{entry['check']['judged']}" if entry.get("check") else "-",
                     f"{entry['seconds']:.0f}"])
    print(f"model {args.model.name}; validation: {args.tokens} tokens, seed 5001; test: seed 6001 "
          f"({', '.join(f'{kind} {counted}' for kind, (_, counted) in test.items())} tokens); KL divergence to the "
          f"F16 GGUF in llama.cpp (quantbuild's measure); worst ratio: the largest, over the three validation texts, "
          f"of KLD / the best stock preset within the plan's budget")
    print(table(["variant, decoder target bpw", "plan bpw", "plan KLD, planner's own tokens", "plan KLD, validation texts",
                 "plan worst ratio", "shipped", "shipped bpw", "shipped worst ratio",
                 *[f"test KLD {kind}" for kind in TEXTS], "stretches kept/judged", "build + validation s"], rows))
    rows, ratios = [], []
    for name, preset in sorted(presets.items(), key=lambda item: item[1]["bits_per_weight"]):
        if not 3.0 <= preset["bits_per_weight"] <= 5.0:
            continue
        row = [name, f"{preset['bits_per_weight']:.3f}"]
        for kind in TEXTS:
            smaller = [key for key in ladder if results[key]["bytes"] <= preset["bytes"]]
            if not smaller:
                row += [f"{preset['test'][kind]:.6f}", "-", "-"]
                continue
            best = min(smaller, key=lambda key: results[key]["test"][kind])
            ratio = results[best]["test"][kind] / preset["test"][kind]
            ratios.append(ratio)
            row += [f"{preset['test'][kind]:.6f}", f"{best} {results[best]['test'][kind]:.6f}", f"{ratio:.3f}"]
        rows.append(row)
    print(table(["stock preset", "bpw", *[f"{column} {kind}" for kind in TEXTS
                                          for column in ("preset KLD", "best shipped no larger", "ratio")]], rows))
    if ratios:
        print(f"ratios: {len(ratios)}; geometric mean {math.exp(statistics.fmean(map(math.log, ratios))):.3f}; "
              f"max {max(ratios):.3f}; <= 0.85: {sum(r <= 0.85 for r in ratios)}; > 1.0: {sum(r > 1 for r in ratios)}")
    save(("gguf_validated" if args.model == BASELINE else f"gguf_validated_{args.model.name}") +
         ("_presets" if args.at_presets else "") + ("_only_" + "_".join(args.only) if args.only else "") + (f"_checked{args.check_stretches}" if args.check_stretches else ""),
         {"ladder": results, "presets": presets})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "quality", "imatrix", "throughput", "noise", "agreement",
                                               "measures", "validated", "verdicts"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=60000)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--targets", type=float, nargs="+", default=[3.0, 3.5, 4.0, 4.5, 5.0])
    parser.add_argument("--model", type=Path, default=BASELINE, help="quality: the model folder (default: the bundled one)")
    parser.add_argument("--models", nargs="+", default=["baseline", "random-100m"], choices=("baseline", "random-100m"))
    parser.add_argument("--measure", default="kl", choices=("kl", "weight_error"), help="validated: the sensitivity measure")
    parser.add_argument("--oracle", action="store_true",
                        help="measures: plans from the weight-space table scaled per type to the measured one too")
    parser.add_argument("--at-presets", action="store_true",
                        help="validated: a target at each stock preset's size on this model (3-5 bpw; the +imatrix "
                             "size too, where it differs), not --targets")
    parser.add_argument("--check-stretches", type=int, default=0,
                        help="validated: stretches of each plan checked whole while planning (0: none)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PRESET",
                        help="validated --at-presets: only the targets at these presets' sizes, tested against "
                             "these presets (with and without the matrix) only")
    args = parser.parse_args()
    {"speed": speed, "quality": quality, "imatrix": imatrix, "throughput": throughput, "noise": noise,
     "agreement": agreement, "measures": measures, "validated": validated, "verdicts": verdicts}[args.what](args)


if __name__ == "__main__":
    main()
