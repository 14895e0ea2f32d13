"""Evaluate the baseline or one variant on the configured families, on its deploy runtime.

Every eval file is read and validated before any model is loaded, so a bad line costs
seconds, not a model load. The model is loaded through the runtime a user deploys with:
llama.cpp for GGUF files (`evaluate_gguf`); for the torch stack (`evaluate`) transformers
for the baseline, GPTQModel's loader (transformers + its kernels) for GPTQ checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from quantbuild import behaviour
from quantbuild.config import EvalConfig
from quantbuild.errors import DataError
from quantbuild.evaluation import distributions, kld
from quantbuild.evaluation.latency import TorchTimer, measure_latency, paired_latency
from quantbuild.evaluation.memory import measure_memory
from quantbuild.evaluation.stats import wilson_interval
from quantbuild.evaluation.suites import run_generative, summarise
from quantbuild.hashing import sha256_file, staged_dir, write_json
from quantbuild.quantizers.gptqmodel_backend import kernel_names
from quantbuild.tasks.items import Item, load_items

# Everything measured (the gate, the summary and the bundle read this one).
MEASUREMENTS = "measurements.json"
# The headline numbers only, flat, for `dvc metrics show` (no digests, no per-length tables).
METRICS = "metrics.json"
FAMILIES = "families.json"
LATENCY = "latency.json"
MEMORY = "memory.json"
REFERENCE = "reference.safetensors"
GENERATIONS = "generations.jsonl"
# Per item: its id and whether it was answered correctly (no text), so the gate can pair
# the baseline's and a variant's answers item by item.
OUTCOMES = "outcomes.json"


def load_eval_items(config: EvalConfig, data_dir: Path) -> tuple[dict[str, list[Item]], dict[str, str]]:
    """Items per family (first `limit` of each file) and each file's sha256."""
    items, digests = {}, {}
    for family in config.families:
        path = data_dir / f"{family}.jsonl"
        loaded = load_items(path)
        wrong = [item.id for item in loaded if item.family != family]
        if wrong:
            raise DataError(f"{path}: item {wrong[0]} belongs to another family")
        items[family] = loaded[: config.limit] if config.limit else loaded
        digests[family] = sha256_file(path)
    if config.golden:
        path = Path(config.golden)
        # The user's own prompts are scored as one family, whatever families they name.
        items["golden"] = [replace(item, family="golden") for item in load_items(path)]
        digests["golden"] = sha256_file(path)
    return items, digests


def load_model(folder: Path, config: EvalConfig, runtime: str) -> Any:
    """`folder` through the torch runtime on `eval.device`, with `eval.gpu_kernels` on CUDA."""
    from quantbuild.quantizers.gptqmodel_backend import load_checkpoint
    from quantbuild.runtimes import torch_device

    return load_checkpoint(folder, runtime, torch_device(config.device), config.gpu_kernels)


def evaluate(model_dir: Path, config: EvalConfig, data_dir: Path, out: Path, reference: Path | None,
             baseline: Path | None = None) -> dict:
    """Torch runtime (with `baseline`, its folder, latency is also timed interleaved against
    it in this process): write measurements.json, metrics.json, families.json, latency.json,
    memory.json, outcomes.json and the behavioural probes (and reference.safetensors for the
    baseline)."""
    from transformers import AutoTokenizer

    items, digests = load_eval_items(config, data_dir)
    stored = distributions.load_reference(reference) if reference is not None else None
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_model(model_dir, config, config.runtime)
    with staged_dir(out) as staging:
        return _measure_torch(model_dir, model, tokenizer, config, items, digests, stored, staging, baseline)


def _measure_torch(model_dir: Path, model: Any, tokenizer: Any, config: EvalConfig, items: dict, digests: dict,
                   stored: dict | None, staging: Path, baseline: Path | None) -> dict:
    lm, tensors = None, None
    lm_texts = [item.prompt for item in items.get("language_modelling", [])]
    pieces = kld.chunks(tokenizer("\n".join(lm_texts))["input_ids"] if lm_texts else [],
                        config.kl_context, tokenizer.bos_token_id)
    if pieces:
        tensors, lm = kld.measure(
            _torch_logprobs(model), pieces, stored, config.kl_top_k, len(tokenizer) <= config.kl_full_vocab,
            lambda: distributions.reference(model, tokenizer, lm_texts, config.kl_top_k, config.batch_size),
            lambda reference: distributions.compare(model, tokenizer, lm_texts, reference, config.batch_size))
    generative = [item for family, family_items in items.items() if family != "language_modelling" for item in family_items]
    records = run_generative(model, tokenizer, generative, config.batch_size)
    if config.latency.runtime != config.runtime:
        model = load_model(model_dir, config, config.latency.runtime)
    latency = measure_latency(model, len(tokenizer), config.latency.prompt_lengths, config.latency.new_tokens,
                              config.latency.warmup, config.latency.repeats, seed=0)
    memory = measure_memory(model, config.memory.context_lengths, config.memory.budget_mb, model_dir, seed=0)
    device = str(next(model.parameters()).device)
    head = {"eval_files_sha256": digests, "runtime": config.runtime, "deploy_runtime": "torch",
            "torch": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                      "kernels": kernel_names(model)}}
    if baseline is not None:
        reference_model = load_model(baseline, config, config.latency.runtime)
        head["latency_vs_baseline"] = paired_latency(TorchTimer(model), TorchTimer(reference_model), config)
        del reference_model
    metrics = _write(staging, config, head, lm, tensors, generative, records, latency, memory)
    # The behavioural fingerprint the bundle will carry, on the deployed (kernel) runtime.
    behaviour.record(behaviour.torch_opener(model, tokenizer), "torch",
                     {"load_runtime": config.latency.runtime, "device": device,
                      "gpu_kernels": dict(sorted(config.gpu_kernels.items()))}, staging)
    return metrics


def _torch_logprobs(model: Any) -> Any:
    """chunk -> log-probabilities [len - 1, vocab] (float32, on the CPU) of a torch model."""
    import torch

    device = next(model.parameters()).device

    def logprobs_of(chunk: list[int]) -> Any:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([chunk], device=device)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).cpu()

    return logprobs_of


def evaluate_gguf(path: Path, kv_type: str, config: EvalConfig, data_dir: Path, out: Path,
                  reference: Path | None, repack: bool, baseline: Path | None = None) -> dict:
    """llama.cpp runtime: the same outputs as `evaluate`, every suite measured in llama.cpp;
    with `baseline` (its GGUF) latency is also timed interleaved against it."""
    from quantbuild.evaluation import llama

    items, digests = load_eval_items(config, data_dir)
    stored = distributions.load_reference(reference) if reference is not None else None
    with staged_dir(out) as staging:
        measured = llama.measure(path, kv_type, config, items, stored, repack, baseline)
        head = {"eval_files_sha256": digests, "runtime": "llama.cpp", "deploy_runtime": "llama.cpp",
                "llama_cpp": {"kv_cache_type": kv_type, "threads": measured["threads"], "repack": repack}}
        if measured["latency_vs_baseline"] is not None:
            head["latency_vs_baseline"] = measured["latency_vs_baseline"]
        metrics = _write(staging, config, head, measured["lm"], measured["reference"], measured["generative"],
                         measured["records"], measured["latency"], measured["memory"])
        # The behavioural fingerprint the bundle will carry: the probes as this runtime answers them.
        behaviour.record(behaviour.llama_opener(path, kv_type, repack), "llama.cpp",
                         {"kv_cache_type": kv_type, "repack": repack}, staging)
        return metrics


def _write(staging: Path, config: EvalConfig, head: dict, lm: dict | None, tensors: dict | None,
           generative: list[Item], records: list[dict], latency: dict, memory: dict) -> dict:
    """Write every output into the staging folder (renamed into place by the caller)."""
    metrics: dict[str, Any] = {**head, "families": {}}
    if lm is not None:
        metrics.update({key: round(value, 6) if isinstance(value, float) else value for key, value in lm.items()})
    if tensors is not None:
        distributions.save_reference(tensors, staging / REFERENCE)
    for family, summary in summarise(generative, records).items():
        low, high = wilson_interval(summary["correct"] * summary["n"], int(summary["n"]))
        extra = {key: round(value, 6) for key, value in summary.items() if key not in ("n", "correct")}
        metrics["families"][family] = {"score": round(summary["correct"], 6), "n": int(summary["n"]),
                                       "ci_low": round(low, 6), "ci_high": round(high, 6), **extra}
    _long_context_cells(generative, records, metrics)
    outcomes: dict[str, dict[str, float]] = {}
    for item, record in zip(generative, records):
        outcomes.setdefault(item.family, {})[item.id] = record["correct"]
    write_json(staging / OUTCOMES, {family: dict(sorted(values.items())) for family, values in sorted(outcomes.items())})
    metrics["latency"] = latency
    metrics["memory"] = memory
    write_json(staging / MEASUREMENTS, metrics)
    write_json(staging / METRICS, headline(metrics))
    write_json(staging / FAMILIES, [{"family": family, "score": values["score"]}
                                    for family, values in sorted(metrics["families"].items())])
    write_json(staging / LATENCY, [{"prompt_tokens": int(length), **values}
                                   for length, values in metrics["latency"].items()])
    write_json(staging / MEMORY, [{"context_tokens": int(length), **values}
                                  for length, values in metrics["memory"]["by_context"].items()])
    if config.store_generations:
        with (staging / GENERATIONS).open("w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return metrics


def headline(metrics: dict) -> dict:
    """What `dvc metrics show` tabulates: scores, KLD, model memory, speed; no digests."""
    memory = metrics["memory"]
    largest = max(memory["by_context"], key=int)
    first = min(metrics["latency"], key=int)
    values: dict[str, Any] = {key: metrics[key] for key in ("perplexity", "kld_mean", "kld_p99", "top1_agreement",
                                                             "items_kld_mean") if key in metrics}
    values["score"] = {family: entry["score"] for family, entry in sorted(metrics["families"].items())}
    values[f"memory_mb@{largest}"] = memory["by_context"][largest]["peak_mb"]
    values[f"decode_tok_s@{first}"] = metrics["latency"][first]["decode_tokens_per_s_p50"]
    if "latency_vs_baseline" in metrics:
        values["latency_ratio"] = metrics["latency_vs_baseline"]["worst"]["ratio"]
    return values


def _long_context_cells(items: list[Item], records: list[dict], metrics: dict) -> None:
    """Recall by (context length, depth) for the long-context family."""
    cells: dict[str, list[float]] = {}
    for item, record in zip(items, records):
        if item.family == "long_context" and "tokens" in item.meta:
            cells.setdefault(f"{item.meta['tokens']}@{item.meta.get('depth')}", []).append(record["correct"])
    if cells:
        metrics["families"]["long_context"]["by_length_depth"] = {
            key: round(sum(values) / len(values), 6) for key, values in sorted(cells.items())
        }


def evaluate_on_ladder(config: Any, model_dir: Optional[Path], kv_cache_type: str, out: Path) -> dict:
    """Evaluate the baseline (`model_dir` None) or a built variant's `model/` folder on the
    runtime the ladder deploys on (llama.cpp for GGUF ladders, whose baseline is its GGUF),
    against the baseline's stored reference."""
    from quantbuild.config import ladder_runtime
    from quantbuild.fingerprint import cpu_info
    from quantbuild.quantizers.gguf import BASE_FILE, MODEL_FILE
    from quantbuild.runtimes import LLAMA_CPP
    from quantbuild.runtimes.llama_cpp import repack_allowed

    paths = config.paths
    reference = None if model_dir is None else Path(paths.eval) / "baseline" / REFERENCE
    if ladder_runtime(config) == LLAMA_CPP:
        base = Path(paths.gguf_base) / BASE_FILE
        path, kv_type = (base, "f16") if model_dir is None else (model_dir / MODEL_FILE, kv_cache_type)
        return evaluate_gguf(path, kv_type, config.eval, Path(paths.eval_data), out, reference,
                             repack_allowed(cpu_info()["isa"]), baseline=None if model_dir is None else base)
    return evaluate(model_dir or Path(paths.baseline), config.eval, Path(paths.eval_data), out, reference,
                    baseline=None if model_dir is None else Path(paths.baseline))
