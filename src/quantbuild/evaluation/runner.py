"""Evaluate the baseline or one variant on the configured families, on its deploy runtime.

Every eval file is read and validated before any model is loaded, so a bad line costs
seconds, not a model load. The model is loaded through the runtime a user deploys with
(llama.cpp for GGUF files; transformers with GPTQModel's or bitsandbytes' kernels for
checkpoints), and every suite reaches it only through the `Runtime` protocol: one body
for every runtime.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from quantbuild import behaviour, prompts
from quantbuild.config import EvalConfig
from quantbuild.errors import DataError
from quantbuild.evaluation import degenerate, distributions, kld
from quantbuild.evaluation.latency import decision_bound, measure_latency, paired_latency
from quantbuild.evaluation.sequential import Sequential, family_rules
from quantbuild.evaluation.stats import wilson_interval
from quantbuild.evaluation.suites import GOLDEN_NEW_TOKENS, MAX_NEW_TOKENS, run_generative, summarise
from quantbuild.fingerprint import cpu_info
from quantbuild.gguf_artifacts import BASE_FILE, MODEL_FILE, require_base
from quantbuild.hashing import read_json, sha256_file, staged_dir, write_json
from quantbuild.quantization import RECORD as QUANTIZE_RECORD
from quantbuild.quantization import require_recorded_bytes
from quantbuild.runtimes import ladder_runtime, target_device
from quantbuild.runtimes.gguf_file import model_digest
from quantbuild.runtimes.llama_build import free_cores, repack_allowed
from quantbuild.runtimes.protocol import LLAMA_CPP, TORCH, LoadSpec, Runtime, open_runtime
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
# The deterministic part of measurements.json (language modelling, family scores, the eval
# files, the settings they were measured with and the artifact measured): the same bytes
# whenever the same artifact is evaluated the same way, so a variant whose artifact is the
# baseline's own reuses it.
QUALITY = "quality.json"
# the family of clean (not degenerate) outputs over every generative item, and the reasons
DEGENERATE = "degenerate"
FAILURES = "failures"


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
    for family, file in sorted(config.golden.items()):
        path = Path(file)
        # each golden file is one family, named by the user, whatever families its items name
        items[family] = [replace(item, family=family) for item in load_items(path)]
        digests[family] = sha256_file(path)
    return items, digests


def evaluate(spec: LoadSpec, config: EvalConfig, data_dir: Path, out: Path, reference: Optional[Path],
             baseline: Optional[LoadSpec] = None, deployed: Optional[LoadSpec] = None,
             reuse: Optional[Path] = None, tool_call_format: Optional[str] = None,
             latency_bound: Optional[float] = None, until: Optional[Sequential] = None,
             log: Callable[[str], None] = lambda line: None) -> dict:
    """Evaluate the artifact `spec` loads, on its runtime, and write measurements.json,
    quality.json, metrics.json, families.json, latency.json, memory.json, outcomes.json and
    the behavioural probes into `out` (and reference.safetensors for the baseline).

    Quality (language modelling against the stored `reference`, the generative families)
    is measured on `spec`; latency, memory and the probes on `deployed` (the runtime as
    deployed, where it loads the artifact another way, e.g. GPTQModel's kernels after a
    dequantized quality pass), by default `spec` itself. With `baseline`, latency is also
    timed interleaved against the baseline loaded the same way, in this process; with
    `latency_bound` too (the gate's limit plus noise margin, `latency.decision_bound`), a
    ratio whose interval reaches both sides of it is timed for more rounds, up to
    `eval.latency.max_rounds`. With `until` (a variant's: the baseline's outcomes and the
    gate's family rules), each gated family is answered until its verdict is decided
    (quantbuild.evaluation.sequential); where it stops is recorded as `sequential`.

    llama.cpp left to choose its threads (`eval.threads` 0) runs every suite on the cores
    free when the evaluation starts (`llama_build.free_cores`, recorded as `cores`).

    `reuse`: the baseline's evaluation folder, for an artifact loaded exactly as the
    baseline's is. Where its quality.json was measured on a file with this artifact's
    model digest (the same weights and inference metadata), the quality (language modelling, family scores, outcomes) is the baseline's
    own, not measured again; latency, memory and the probes are measured as always.

    Prompts are formed as the artifact is deployed: through the chat template it carries
    (an instruct model; tool calls parsed in `tool_call_format`, by default the syntax the
    template writes) or raw (a base model). Every item is rendered before the model loads.
    """
    items, digests = load_eval_items(config, data_dir)
    generative = [item for family, family_items in items.items() if family != "language_modelling"
                  for item in family_items]
    prompt_format = prompts.for_artifact(spec, tool_call_format)
    prompt_format.check(generative)
    lm_texts = [item.prompt for item in items.get("language_modelling", [])]
    # a GGUF file's model digest (weights and inference metadata, not quantbuild's lineage):
    # recorded by the baseline, compared by a variant that may reuse its quality
    recorded = spec.runtime == LLAMA_CPP and (reference is None or reuse is not None)
    model_sha256 = model_digest(spec.artifact) if recorded else None
    reused = _reused_quality(reuse, model_sha256, digests, config) if reuse is not None else None
    stored = distributions.load_reference(reference) if reference is not None and reused is None else None
    cores = free_cores()
    spec, baseline, deployed = (_on_free_cores(one, cores["threads"]) for one in (spec, baseline, deployed))
    with staged_dir(out) as staging:
        runtime = open_runtime(spec)
        try:
            quality_runtime = runtime.describe()["runtime"]
            pieces = kld.chunks(runtime.tokenize("\n".join(lm_texts)) if lm_texts else [], config.kl_context,
                                runtime.bos_token())
            longest = _longest(runtime, config, lm_texts, pieces, generative, prompt_format)
            runtime.reserve(longest)
            if reused is None:
                log(f"quality: {len(pieces)} language-modelling chunks, {len(generative)} generative items")
                tensors, quality, outcomes, records = _measure_quality(runtime, config, stored, lm_texts, pieces,
                                                                       generative, prompt_format, until)
                quality = {"eval_files_sha256": digests, "measured_with": _quality_settings(config),
                           "prompts": prompt_format.describe(),
                           **({"model_sha256": model_sha256} if model_sha256 else {}), **quality}
            else:
                tensors, records = None, None
                quality, outcomes = reused
            if deployed is not None and deployed != spec:
                runtime.close()
                runtime = open_runtime(deployed)
                runtime.reserve(longest)
            log(f"latency at prompt lengths {', '.join(map(str, config.latency.prompt_lengths))}, then memory")
            latency = measure_latency(runtime, config)
            memory = runtime.memory(config.memory.context_lengths, config.memory.budget_mb)
            # the deploy target measured: the runtime as deployed, on its device
            head = {**runtime.describe(), "runtime": quality_runtime,
                    "target": f"{(deployed or spec).runtime}-{(deployed or spec).device}"}
            head["cores"] = cores
            if reused is not None:
                head["quality_reused_from"] = {"evaluation": str(reuse), "model_sha256": model_sha256}
            if baseline is not None:
                timed_on = deployed or spec
                log("latency interleaved with the baseline, until its interval decides")
                with open_runtime(baseline) as reference_runtime:
                    reference_runtime.reserve(longest)
                    head["latency_vs_baseline"] = {
                        **paired_latency(runtime, reference_runtime, config, latency_bound),
                        # llama.cpp's threads (torch keeps its own), and the machine's load beside them
                        "threads": timed_on.threads if timed_on.runtime == LLAMA_CPP else None,
                        "load_1min": cores["load_1min"]}
            metrics = _write(staging, config, head, quality, outcomes, tensors, records, latency, memory)
            # The behavioural fingerprint the bundle will carry: the probes as this runtime answers them.
            log("behavioural probes")
            behaviour.record(runtime, staging, prompt_format)
        finally:
            runtime.close()
        return metrics


def _on_free_cores(spec: Optional[LoadSpec], threads: int) -> Optional[LoadSpec]:
    """`spec` at `threads` threads where it is a llama.cpp load left to choose them (0).
    llama.cpp's numbers are the same at any thread count (tests/test_latency.py); its
    threads wait for each other at every barrier, so one more than the free cores stalls
    every step on a core another job holds."""
    if spec is None or spec.runtime != LLAMA_CPP or spec.threads:
        return spec
    return replace(spec, threads=threads)


def _measure_quality(runtime: Runtime, config: EvalConfig, stored: Optional[dict], lm_texts: list[str],
                     pieces: list[list[int]], generative: list[Item], prompt_format: prompts.PromptFormat,
                     until: Optional[Sequential] = None) -> tuple[Optional[dict], dict, dict, list[dict]]:
    """(reference tensors for the baseline, quality metrics, outcomes, generative records
    of the items answered)."""
    tensors, quality = None, {}
    if pieces:
        tensors, lm = kld.measure(
            runtime.logprobs, pieces, stored, config.kl_top_k, runtime.n_vocab <= config.kl_full_vocab,
            lambda: distributions.reference_from(runtime.text_positions(lm_texts), config.kl_top_k),
            lambda stored_items: distributions.compare_from(runtime.text_positions(lm_texts), stored_items))
        quality.update({key: round(value, 6) if isinstance(value, float) else value for key, value in lm.items()})
    answered = [(item, record) for item, record in zip(generative, run_generative(runtime, generative, prompt_format,
                                                                                  until)) if record is not None]
    items, records = [item for item, _ in answered], [record for _, record in answered]
    quality["families"] = _families(items, records)
    outcomes = _outcomes(items, records)
    if until is not None:
        quality["sequential"] = _stops(until, generative, outcomes)
    return tensors, quality, outcomes, records


def _stops(until: Sequential, generative: list[Item], outcomes: dict[str, dict]) -> dict[str, Any]:
    """The looks, their z, and each family that stopped before its last item: how many
    items it answered of how many, and the verdict that stopped it."""
    totals: dict[str, int] = {}
    for item in generative:
        totals[item.family] = totals.get(item.family, 0) + 1
    stopped = {family: {"items": len(outcomes.get(family, {})), "of": total,
                        "verdict": until.decide(family, outcomes[family])}
               for family, total in sorted(totals.items()) if len(outcomes.get(family, {})) < total}
    return {"looks": list(until.looks), "z": until.z, "stopped": stopped}


def _outcomes(generative: list[Item], records: list[dict]) -> dict[str, dict]:
    """Per family, per item: 1 when answered correctly; the `degenerate` family: 1 when the
    output is clean; `failures`: per wrong or degenerate item, why (no text)."""
    outcomes: dict[str, dict] = {}
    failures: dict[str, list[str]] = {}
    for item, record in zip(generative, records):
        outcomes.setdefault(item.family, {})[item.id] = record["correct"]
        outcomes.setdefault(DEGENERATE, {})[item.id] = 0.0 if record.get("degenerate") else 1.0
        why = ([record["failure"]] if "failure" in record else []) + record.get("degenerate", [])
        if why:
            failures[item.id] = why
    ordered = {family: dict(sorted(values.items())) for family, values in sorted(outcomes.items())}
    if generative:
        ordered[FAILURES] = dict(sorted(failures.items()))
    return ordered


def _reused_quality(folder: Path, model_sha256: Optional[str], digests: dict[str, str],
                    config: EvalConfig) -> Optional[tuple[dict, dict]]:
    """(quality, outcomes) of the evaluation in `folder` where it measured this artifact on
    these eval files, else None (measured afresh). Generations to store are always measured."""
    path = folder / QUALITY
    if config.store_generations or not path.is_file() or not (folder / OUTCOMES).is_file():
        return None
    quality = json.loads(path.read_text(encoding="utf-8"))
    if (quality.get("model_sha256") != model_sha256 or quality.get("eval_files_sha256") != digests
            or quality.get("measured_with") != _quality_settings(config)):
        return None
    return quality, json.loads((folder / OUTCOMES).read_text(encoding="utf-8"))


def _longest(runtime: Runtime, config: EvalConfig, lm_texts: list[str], pieces: list[list[int]],
             generative: list[Item], prompt_format: prompts.PromptFormat) -> int:
    """The longest sequence the suites run: an item or chunk of language modelling, a
    prompt with its generation budget, a latency prompt with its new tokens."""
    lengths = [len(runtime.tokenize(text)) for text in lm_texts] + [len(piece) for piece in pieces]
    lengths += [len(runtime.tokenize(prompt_format.render(item), prompt_format.chat)) + MAX_NEW_TOKENS.get(item.family, GOLDEN_NEW_TOKENS)
                for item in generative]
    lengths += [length + config.latency.new_tokens for length in config.latency.prompt_lengths]
    return max(lengths)


def _quality_settings(config: EvalConfig) -> dict[str, Any]:
    """The eval settings quality depends on (not timing, memory or the batch size)."""
    return {"limit": config.limit, "kl_context": config.kl_context, "kl_top_k": config.kl_top_k,
            "kl_full_vocab": config.kl_full_vocab}


def _families(generative: list[Item], records: list[dict]) -> dict:
    """Per family: the score with its 95% interval, the other outcome means, and for the
    long-context family the recall by (context length, depth)."""
    families = {}
    for family, summary in summarise(generative, records).items():
        low, high = wilson_interval(summary["correct"] * summary["n"], int(summary["n"]))
        extra = {key: round(value, 6) for key, value in summary.items() if key not in ("n", "correct")}
        families[family] = {"score": round(summary["correct"], 6), "n": int(summary["n"]),
                            "ci_low": round(low, 6), "ci_high": round(high, 6), **extra}
    _long_context_cells(generative, records, families)
    if generative:
        flagged = [record.get("degenerate", []) for record in records]
        low, high = wilson_interval(sum(not kinds for kinds in flagged), len(flagged))
        families[DEGENERATE] = {"score": round(sum(not kinds for kinds in flagged) / len(flagged), 6),
                                "n": len(flagged), "ci_low": round(low, 6), "ci_high": round(high, 6),
                                "items": sum(bool(kinds) for kinds in flagged),
                                **{kind: sum(kind in kinds for kinds in flagged) for kind in degenerate.KINDS}}
    return families


def _write(staging: Path, config: EvalConfig, head: dict, quality: dict, outcomes: dict, tensors: dict | None,
           records: Optional[list[dict]], latency: dict, memory: dict) -> dict:
    """Write every output into the staging folder (renamed into place by the caller)."""
    metrics: dict[str, Any] = {**head, **quality, "latency": latency, "memory": memory}
    if tensors is not None:
        distributions.save_reference(tensors, staging / REFERENCE)
    write_json(staging / QUALITY, quality)
    write_json(staging / OUTCOMES, outcomes)
    write_json(staging / MEASUREMENTS, metrics)
    write_json(staging / METRICS, headline(metrics))
    write_json(staging / FAMILIES, [{"family": family, "score": values["score"]}
                                    for family, values in sorted(metrics["families"].items())])
    write_json(staging / LATENCY, [{"prompt_tokens": int(length), **values}
                                   for length, values in metrics["latency"].items()])
    write_json(staging / MEMORY, [{"context_tokens": int(length), **values}
                                  for length, values in metrics["memory"]["by_context"].items()])
    if config.store_generations and records is not None:
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


def _long_context_cells(items: list[Item], records: list[dict], families: dict) -> None:
    """Recall by (context length, depth) for the long-context family."""
    cells: dict[str, list[float]] = {}
    for item, record in zip(items, records):
        if item.family == "long_context" and "tokens" in item.meta:
            cells.setdefault(f"{item.meta['tokens']}@{item.meta.get('depth')}", []).append(record["correct"])
    if cells:
        families["long_context"]["by_length_depth"] = {
            key: round(sum(values) / len(values), 6) for key, values in sorted(cells.items())
        }


def gguf_spec(path: Path, kv_type: str, config: EvalConfig, repack: bool, device: str = "cpu") -> LoadSpec:
    """A GGUF file in llama.cpp on `device` as the ladder evaluates it (`eval.batch_size`
    prompts decoded together; on a GPU every layer offloaded)."""
    return LoadSpec(LLAMA_CPP, path, kv_type=kv_type, repack=repack, threads=config.threads,
                    batch_size=config.batch_size, device=device)


def torch_spec(folder: Path, config: EvalConfig, load_runtime: Optional[str] = None, device: str = "cpu") -> LoadSpec:
    """A checkpoint folder on the torch runtime on `device` (`eval.gpu_kernels` on CUDA),
    quality measured on `eval.runtime` unless `load_runtime` names another."""
    return LoadSpec(TORCH, folder, load_runtime=load_runtime or config.runtime, device=device,
                    kernels=dict(config.gpu_kernels), batch_size=config.batch_size)


def target_dir(config: Any, target: str) -> Path:
    """Where a deploy target's evaluations live: `<paths.eval>/<target>/`, a folder per
    variant and `baseline/`."""
    return Path(config.paths.eval) / target


def evaluate_on_ladder(config: Any, model_dir: Optional[Path], kv_cache_type: str, out: Path, target: str,
                       log: Callable[[str], None] = lambda line: None) -> dict:
    """Evaluate the baseline (`model_dir` None) or a built variant's `model/` folder on
    deploy target `target` (the ladder's runtime on its device: llama.cpp for GGUF ladders,
    whose baseline is its GGUF), against the baseline's stored reference on that target."""
    paths = config.paths
    device = target_device(target)
    # latency is timed until its interval decides against the gate's bound (or the rounds run out)
    bound = decision_bound(config.gate.max_latency_paired_ratio, config.gate.latency_noise_margin)
    baseline_dir = target_dir(config, target) / "baseline"
    reference = None if model_dir is None else baseline_dir / REFERENCE
    until = None if model_dir is None else answered_until(config, baseline_dir)
    if model_dir is not None:  # what is read is what its quantize record says was built
        require_recorded_bytes(model_dir, read_json(model_dir.parent / QUANTIZE_RECORD))
    if ladder_runtime(config) == LLAMA_CPP:
        require_base(Path(paths.gguf_base))
        repack = repack_allowed(cpu_info()["isa"])
        base = gguf_spec(Path(paths.gguf_base) / BASE_FILE, "f16", config.eval, repack, device)
        spec = (base if model_dir is None
                else gguf_spec(model_dir / MODEL_FILE, kv_cache_type, config.eval, repack, device))
        # a variant loaded as the baseline is (its file's bytes are checked against the
        # baseline's quality.json) has the baseline's quality
        same_load = model_dir is not None and replace(spec, artifact=base.artifact) == base
        return evaluate(spec, config.eval, Path(paths.eval_data), out, reference,
                        baseline=None if model_dir is None else base,
                        reuse=baseline_dir if same_load else None, tool_call_format=config.model.tool_call_format,
                        latency_bound=bound, until=until, log=log)
    spec = torch_spec(model_dir or Path(paths.baseline), config.eval, device=device)
    deployed = torch_spec(spec.artifact, config.eval, config.eval.latency.runtime, device)
    return evaluate(spec, config.eval, Path(paths.eval_data), out, reference,
                    baseline=None if model_dir is None else replace(deployed, artifact=Path(paths.baseline)),
                    deployed=deployed, tool_call_format=config.model.tool_call_format, latency_bound=bound,
                    until=until, log=log)


def answered_until(config: Any, baseline_dir: Path) -> Optional[Sequential]:
    """How a variant's gated families are answered step by step against the baseline's
    outcomes in `baseline_dir` (None: every item, where `eval.sequential.looks` is empty or
    the baseline's outcomes are not there)."""
    looks = tuple(config.eval.sequential.looks)
    path = baseline_dir / OUTCOMES
    if not looks or not path.is_file():
        return None
    return Sequential(read_json(path), family_rules(config.gate), looks, float(config.eval.sequential.z),
                      frozenset(config.eval.families))
