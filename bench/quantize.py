"""Quantization benchmarks (numbers for the closing note and bench/README.md).

    python bench/quantize.py speed   [--models baseline,random-100m] [--repeats 3]
    python bench/quantize.py quality [--limit 64]
    python bench/quantize.py gpu     [--model random-1b]          (on a CUDA machine)

speed: for each method, wall time and peak memory of quantbuild's quantize stage
(`build_variant`: checks, plan, the method, hashing, the record) against calling the
library directly on identical inputs (GPTQModel load/quantize/save; transformers +
bitsandbytes load/save), each run in a fresh process, in the same run of this script;
and the effective bits per weight against the nominal bits.
quality: builds variants on the bundled baseline and evaluates them with the pipeline's
evaluator against the baseline's stored reference: GPTQ vs RTN at the same bits and
group, and auto-mixed vs uniform at about the same effective bits per weight.
gpu: speed for GPTQ and bitsandbytes on a ~1B-parameter random-initialised Llama.
Prints medians; these machines are noisy, so compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT / "src"))
BASELINE = ROOT / "data" / "baseline" / "workflow-llama-8m"

# name -> (variant fields, what to call directly)
METHODS = {
    "rtn_4bit_g128": dict(method="rtn", bits=4, group_size=128),
    "gptq_4bit_g128": dict(method="gptq", bits=4, group_size=128),
    "awq_4bit_g128": dict(method="awq", bits=4, group_size=128, sym=False),
    "bnb_nf4": dict(method="bnb", bits=4, group_size=64, quant_type="nf4", double_quant=True),
    "bnb_int8": dict(method="bnb", bits=8, group_size=-1),
    "mixed_edges_8bit": dict(method="mixed", bits=4, group_size=128,
                             overrides=[{"pattern": r"model\.layers\.0\.mlp\.down_proj", "bits": 8, "group_size": 128}]),
}
RANDOM_MODELS = {
    # ~91M parameters: 12 layers, hidden 768, MLP 2048.
    "random-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                        num_key_value_heads=12),
    # ~1.1B parameters: 16 layers, hidden 2048, MLP 8192.
    "random-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                      num_key_value_heads=16),
}


def variant_config(fields: dict):
    """The variant as its method's typed config (`METHOD_CONFIGS`)."""
    from quantbuild.config import METHOD_CONFIGS, OverrideConfig

    fields = dict(fields)
    if "overrides" in fields:
        fields["overrides"] = [OverrideConfig(**override) for override in fields["overrides"]]
    return METHOD_CONFIGS[fields["method"]](**fields)


def model_folder(name: str) -> Path:
    """The bundled baseline, or a random-initialised Llama (fp16, seeded) built once."""
    if name == "baseline":
        return BASELINE
    folder = OUT / name
    if not (folder / "model.safetensors").is_file() and not any(folder.glob("*.safetensors")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, max_position_embeddings=2048, **RANDOM_MODELS[name])
        model = LlamaForCausalLM(config).to(torch.float16)
        model.save_pretrained(str(folder))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(BASELINE / file, folder / file)
    return folder


def calibration(samples: int, seq_len: int) -> list[list[int]]:
    """The pipeline's calibration tokens; composed from data/ where no pipeline ran here."""
    from quantbuild.calibration import compose_calibration, load_calibration
    from quantbuild.config import CalibrationConfig, SensitivityConfig

    folder = ROOT / "artifacts" / "calibration"
    if not (folder / "tokens.safetensors").is_file():
        folder = OUT / "calibration"
        if not (folder / "tokens.safetensors").is_file():
            sources = {"workflow_prompts": 0.4, "tool_calls": 0.25, "long_context": 0.15, "domain_text": 0.2}
            config = CalibrationConfig(sources=sources, samples=max(samples, 48), seq_len=max(seq_len, 512),
                                       sensitivity=SensitivityConfig(samples=0))
            compose_calibration(config, ROOT / "data" / "calibration", BASELINE, folder)
    tokens = load_calibration(folder)
    return [ids[:seq_len] for ids in tokens[:samples]]


def direct(name: str, model: Path, tokens: list[list[int]], out: Path, plan: dict) -> None:
    """The library alone, with the settings quantbuild passes it."""
    import torch

    fields = METHODS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if fields["method"] == "bnb":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        config = (BitsAndBytesConfig(load_in_8bit=True) if fields["bits"] == 8 else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fields["quant_type"],
                                     bnb_4bit_use_double_quant=fields["double_quant"],
                                     bnb_4bit_compute_dtype=torch.float32))
        AutoModelForCausalLM.from_pretrained(str(model), quantization_config=config, device_map=device).save_pretrained(str(out))
        AutoTokenizer.from_pretrained(str(model)).save_pretrained(str(out))
        return
    from gptqmodel import AWQConfig, GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import RTNConfig
    from gptqmodel.utils.backend import BACKEND
    from transformers import AutoTokenizer

    backend = BACKEND.AUTO
    common = dict(bits=fields["bits"], group_size=fields["group_size"], sym=fields.get("sym", True), offload_to_disk=False)
    if fields["method"] == "rtn":
        config, tokens = RTNConfig(**common), None
    elif fields["method"] == "awq":
        config = AWQConfig(**common)
        backend = BACKEND.AUTO if device == "cuda" else BACKEND.AWQ_TORCH
    else:
        # The per-layer plan is quantbuild's (it decides the precision); the library gets it as `dynamic`.
        from quantbuild.quantizers.mixed import dynamic_overrides

        dynamic = dynamic_overrides(variant_config(fields), plan)
        config = QuantizeConfig(**common, desc_act=False, damp_percent=0.05, dynamic=dynamic or None)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    loaded = GPTQModel.load(str(model), config, device=device)
    dataset = None if tokens is None else [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in tokens]
    loaded.quantize(dataset, batch_size=1, tokenizer=tokenizer, backend=backend)
    loaded.save(str(out))


def one(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import resource

    import torch

    from quantbuild.quantization import build_variant
    from quantbuild.quantizers import Inputs, model_layers, plan_layers

    model = model_folder(args.model)
    tokens = calibration(args.samples, args.seq_len)
    variant = variant_config(METHODS[args.method])
    out = Path(tempfile.mkdtemp(prefix="qb-bench-"))
    # Import the libraries before the clock starts, in both modes: imports are not quantization.
    from quantbuild.runtimes.gptqmodel_loader import ensure_cpu_workers

    ensure_cpu_workers()
    import transformers  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: F401

    if METHODS[args.method]["method"] == "bnb":
        import bitsandbytes  # noqa: F401
    else:
        import gptqmodel  # noqa: F401

    try:
        started = time.perf_counter()
        if args.mode == "quantbuild":
            record = build_variant(args.method, variant, Inputs(model, tokens), out / "variant")
            extra = {"bits_per_weight": record["bits_per_weight"], "nominal_bits": record["nominal_bits"]}
        else:
            plan = plan_layers("bench", variant, model_layers(model), None, model)
            (out / "direct").mkdir()
            direct(args.method, model, tokens, out / "direct", plan)
            extra = {}
        result = {"wall_seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}
        if torch.cuda.is_available():
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print("RESULT " + json.dumps(result))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(model: str, method: str, mode: str, samples: int, seq_len: int) -> dict:
    command = [sys.executable, __file__, "one", "--model", model, "--method", method, "--mode", mode,
               "--samples", str(samples), "--seq-len", str(seq_len)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{model} {method} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def speed(models: list[str], methods: list[str], repeats: int, samples: int, seq_len: int, warmup: int = 1) -> None:
    print(f"| model | method | quantbuild s (median of {repeats}) | library s | ratio | peak RSS MB qb / lib "
          f"| peak GPU MB qb / lib | bits/weight (nominal) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        model_folder(model)
        for method in methods:
            runs = {mode: [] for mode in ("quantbuild", "direct")}
            for _ in range(warmup):  # kernel compilation and file caches, paid once, not measured
                for mode in runs:
                    measure(model, method, mode, samples, seq_len)
            for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
                for mode in runs:
                    runs[mode].append(measure(model, method, mode, samples, seq_len))
            qb = statistics.median(r["wall_seconds"] for r in runs["quantbuild"])
            lib = statistics.median(r["wall_seconds"] for r in runs["direct"])
            rss = [statistics.median(r["peak_rss_mb"] for r in runs[mode]) for mode in runs]
            gpu = [statistics.median(r.get("peak_gpu_mb", 0) for r in runs[mode]) for mode in runs]
            record = runs["quantbuild"][0]
            print(f"<!-- {model} {method} runs: " + json.dumps({mode: [round(r['wall_seconds'], 2) for r in values]
                                                              for mode, values in runs.items()}) + " -->", flush=True)
            print(f"| {model} | {method} | {qb:.2f} | {lib:.2f} | {qb / lib:.3f} | {rss[0]:.0f} / {rss[1]:.0f} "
                  f"| {gpu[0]:.0f} / {gpu[1]:.0f} | {record['bits_per_weight']:.3f} ({record['nominal_bits']:.2f}) |",
                  flush=True)


QUALITY = {
    "rtn_4bit_g128": dict(method="rtn", bits=4, group_size=128),
    "gptq_4bit_g128": dict(method="gptq", bits=4, group_size=128),
    "rtn_3bit_g64": dict(method="rtn", bits=3, group_size=64),
    "gptq_3bit_g64": dict(method="gptq", bits=3, group_size=64),
    "gptq_3bit_g32": dict(method="gptq", bits=3, group_size=32),
    "awq_4bit_g128": dict(method="awq", bits=4, group_size=128, sym=False),
    "bnb_nf4": dict(method="bnb", bits=4, group_size=64, quant_type="nf4", double_quant=True),
    "bnb_fp4": dict(method="bnb", bits=4, group_size=64, quant_type="fp4"),
    # Same effective bits per weight as gptq_3bit_g32 (set from its measured size below).
    "mixed_auto_4bit": dict(method="mixed", bits=3, group_size=64, target_bits=0.0, promote_bits=4, promote_group_size=64),
    "mixed_auto_8bit": dict(method="mixed", bits=3, group_size=64, target_bits=0.0, promote_bits=8, promote_group_size=128),
}


def quality(limit: int) -> None:
    from quantbuild.calibration import load_calibration
    from quantbuild.validation import load_config
    from quantbuild.evaluation.runner import evaluate, torch_spec
    from quantbuild.quantization import MODEL_DIR, build_variant
    from quantbuild.quantizers import Inputs
    from quantbuild.sensitivity import load_sensitivity

    config = load_config(ROOT / "params.yaml")
    eval_config = config.eval
    eval_config.limit = limit
    eval_config.latency.repeats, eval_config.latency.warmup = 1, 0
    eval_config.latency.prompt_lengths = [16]
    eval_config.memory.context_lengths = [64]
    artifacts = ROOT / "artifacts"
    inputs = Inputs(artifacts / "baseline", load_calibration(artifacts / "calibration"),
                    load_sensitivity(artifacts / "calibration"))
    work = OUT / "quality"
    reference = work / "baseline"
    def evaluate_torch(folder: Path, out: Path, stored: Path | None) -> dict:
        return evaluate(torch_spec(folder, eval_config), eval_config, ROOT / "data" / "eval", out, stored,
                        deployed=torch_spec(folder, eval_config, eval_config.latency.runtime))

    baseline_metrics = evaluate_torch(artifacts / "baseline", reference, None)
    rows = [("baseline", 16.0, baseline_metrics)]
    target = None
    for name, fields in QUALITY.items():
        if fields.get("target_bits") == 0.0:
            fields = {**fields, "target_bits": target}
        record = build_variant(name, variant_config(fields), inputs, work / "q" / name)
        if name == "gptq_3bit_g32":
            target = record["bits_per_weight"]
        metrics = evaluate_torch(work / "q" / name / MODEL_DIR, work / name, reference / "reference.safetensors")
        rows.append((name, record["bits_per_weight"], metrics))
        print(f"built and evaluated {name}", file=sys.stderr, flush=True)
    families = sorted(baseline_metrics["families"])
    families = [family for family in families if family != "language_modelling"]
    print(f"| variant | bits/weight | perplexity | KLD mean | top-1 agree | {' | '.join(families)} |")
    print("|---|---|---|---|---|" + "---|" * len(families))
    for name, bits, metrics in rows:
        scores = " | ".join(f"{metrics['families'][family]['score']:.3f}" for family in families)
        print(f"| {name} | {bits:.3f} | {metrics['perplexity']:.4f} | {metrics['kld_mean']:.5f} "
              f"| {metrics['top1_agreement']:.4f} | {scores} |")
    (work / "summary.json").write_text(json.dumps({name: metrics for name, _, metrics in rows}, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_one = sub.add_parser("one")
    run_one.add_argument("--model", required=True)
    run_one.add_argument("--method", required=True, choices=sorted(METHODS))
    run_one.add_argument("--mode", required=True, choices=["quantbuild", "direct"])
    run_one.add_argument("--samples", type=int, default=32)
    run_one.add_argument("--seq-len", type=int, default=256)
    run_speed = sub.add_parser("speed")
    run_speed.add_argument("--models", default="baseline,random-100m")
    run_speed.add_argument("--methods", default=",".join(METHODS))
    run_speed.add_argument("--repeats", type=int, default=3)
    run_speed.add_argument("--warmup", type=int, default=1)
    run_speed.add_argument("--samples", type=int, default=32)
    run_speed.add_argument("--seq-len", type=int, default=256)
    run_quality = sub.add_parser("quality")
    run_quality.add_argument("--limit", type=int, default=64)
    run_gpu = sub.add_parser("gpu")
    run_gpu.add_argument("--model", default="random-1b")
    run_gpu.add_argument("--methods", default="gptq_4bit_g128,bnb_nf4,bnb_int8")
    run_gpu.add_argument("--repeats", type=int, default=2)
    run_gpu.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.command == "one":
        one(args)
    elif args.command == "speed":
        speed(args.models.split(","), args.methods.split(","), args.repeats, args.samples, args.seq_len, args.warmup)
    elif args.command == "quality":
        quality(args.limit)
    else:
        speed([args.model], args.methods.split(","), args.repeats, 48, 512, args.warmup)


if __name__ == "__main__":
    main()
