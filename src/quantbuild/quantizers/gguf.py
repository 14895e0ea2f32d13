"""GGUF through llama.cpp's own quantizer (`llama-quantize`, built from the pinned sdist).

The gguf_base stage has converted the baseline to a 16/32-bit GGUF and computed the
importance matrix from the project's calibration mix; this method quantizes that file to a
llama.cpp file type (K and IQ types), optionally with the importance matrix, with
`token_embd`/`output` types and per-tensor overrides, or with an automatic per-tensor mix
under a bits-per-weight target chosen by the planner the GPTQ `mixed` method uses (one
planner, two formats). The result carries quantbuild's lineage in its own metadata.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from quantbuild.errors import ConfigError, QuantbuildError
from quantbuild.gguf_artifacts import MODEL_FILE, RECORD, imatrix_record, require_base, require_imatrix
from quantbuild.hashing import disk_full, free_bytes, require_space
from quantbuild.plan_validation import BY_ROLE, BY_TYPE, PlanBuild
from quantbuild.quantizers.base import Inputs, Method, matching_layers, measurements
from quantbuild.quantizers.planner import Candidate, Level, PlanCheck, plan_levels

# Stored bits per weight of each llama.cpp tensor type (block bytes * 8 / block size);
# a test keeps this in step with gguf-py's GGML_QUANT_SIZES.
TENSOR_TYPE_BITS = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5, "Q5_1": 6.0,
    "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_XS": 4.25, "IQ4_NL": 4.5, "Q3_K": 3.4375, "IQ3_S": 3.4375,
    "IQ3_XXS": 3.0625, "Q2_K": 2.625, "IQ2_S": 2.5625, "IQ2_XS": 2.3125, "IQ2_XXS": 2.0625,
}
# llama.cpp file types (`llama-quantize ... TYPE`); the last group refuses to run without an
# importance matrix.
FILE_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1",
              "IQ4_XS", "IQ4_NL", "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_S", "IQ3_XS", "IQ3_XXS", "Q2_K",
              "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS")
NEEDS_IMATRIX = ("Q2_K_S", "IQ2_S", "IQ2_XS", "IQ2_XXS")
KV_CACHE_TYPES = ("f16", "q8_0", "q4_0")


def _check_type(key: str, value: Optional[str], allowed_types: tuple[str, ...] | dict) -> None:
    if value is not None and value not in allowed_types:
        raise ConfigError(f"params.yaml: {key}={value!r} is not a llama.cpp type quantbuild allows "
                          f"(allowed: {', '.join(allowed_types)})")


def _check(key: str, variant: Any) -> None:
    _check_type(f"{key}.type", variant.type, FILE_TYPES)
    _check_type(f"{key}.token_embd_type", variant.token_embd_type, TENSOR_TYPE_BITS)
    _check_type(f"{key}.output_type", variant.output_type, TENSOR_TYPE_BITS)
    for index, override in enumerate(variant.overrides):
        _check_type(f"{key}.overrides[{index}].type", override.type, TENSOR_TYPE_BITS)
    for index, name in enumerate(variant.mix_types):
        _check_type(f"{key}.mix_types[{index}]", name, TENSOR_TYPE_BITS)
    if variant.type in NEEDS_IMATRIX and not variant.imatrix:
        raise ConfigError(f"params.yaml: {key}.imatrix=False is not allowed for type {variant.type} "
                          f"(llama.cpp needs an importance matrix for it: set imatrix: true)")
    if variant.kv_cache_type not in KV_CACHE_TYPES:
        raise ConfigError(f"params.yaml: {key}.kv_cache_type={variant.kv_cache_type!r} is not allowed "
                          f"(allowed: {' | '.join(KV_CACHE_TYPES)})")
    if variant.target_bpw:
        costs = [TENSOR_TYPE_BITS[name] for name in variant.mix_types]
        if len(costs) < 2 or costs != sorted(costs) or len(set(costs)) != len(costs):
            raise ConfigError(f"params.yaml: {key}.mix_types={list(variant.mix_types)} is not allowed (allowed: two "
                              f"or more llama.cpp tensor types, cheapest first, of different sizes)")
        if not 1 < variant.target_bpw <= 16:
            raise ConfigError(f"params.yaml: {key}.target_bpw={variant.target_bpw} is not allowed "
                              f"(allowed: 0 = off, or 1 < value <= 16)")
    if variant.validation_tokens != 0 and variant.validation_tokens < 2 * 512:
        raise ConfigError(f"params.yaml: {key}.validation_tokens={variant.validation_tokens} is not allowed "
                          f"(allowed: 0 = off, or >= 1024: two 512-token chunks)")


def gguf_names(baseline: Path, layers: dict) -> dict[str, str]:
    """HF layer name -> GGUF tensor name (`model.layers.3.mlp.down_proj` -> `blk.3.ffn_down.weight`),
    through gguf-py's tensor map for the converter's architecture."""
    import json

    from quantbuild.runtimes.gguf_file import check_architecture
    from quantbuild.runtimes.llama_build import vendored_converter

    architecture = check_architecture(baseline)
    vendored_converter()
    import gguf
    from conversion import get_model_class

    blocks = json.loads((baseline / "config.json").read_text()).get("num_hidden_layers", 0)
    mapping = gguf.get_tensor_name_map(get_model_class(architecture).model_arch, blocks)
    names = {}
    for layer in layers:
        mapped = mapping.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ConfigError(f"gguf: layer {layer} has no GGUF tensor name in llama.cpp's map for {architecture}")
        names[layer] = mapped
    return names


def _plan(key: str, variant: Any, layers: dict, sensitivity: Optional[dict], baseline: Path,
          check: Optional[PlanCheck] = None) -> dict:
    """Per decoder layer: its GGUF tensor name and an explicit type (None: the file type's
    own choice, which llama.cpp varies by tensor for the _S/_M/_L mixes); `check`: the
    sensitivity stage's measurement of whole plans (quantizers.planner.plan_levels)."""
    names = gguf_names(baseline, layers)
    plan = {name: {"gguf_name": names[name], "type": None, "reason": "variant"} for name in layers}
    by_gguf = {gguf_name: layer for layer, gguf_name in names.items()}
    for index, override in enumerate(variant.overrides):
        for gguf_name in matching_layers(f"{key}.overrides[{index}]", override.pattern, by_gguf):
            layer = by_gguf[gguf_name]
            if plan[layer]["reason"] == "variant":
                plan[layer].update(type=override.type, reason=f"override {override.pattern}")
    if variant.target_bpw:
        _auto_mix(key, variant, layers, plan, sensitivity, check)
    return plan


def _auto_mix(key: str, variant: Any, layers: dict, plan: dict, sensitivity: Optional[dict],
              check: Optional[PlanCheck] = None) -> None:
    """Every layer not overridden gets a type from `mix_types`, chosen greedily by measured
    KL divergence removed per extra stored bit, within `target_bpw` over the decoder."""
    keys = {name: Candidate("gguf", name, imatrix=bool(variant.imatrix)).key for name in variant.mix_types}
    mix = [Level(name, TENSOR_TYPE_BITS[name], keys[name]) for name in variant.mix_types]
    levels = {name: mix if plan[name]["reason"] == "variant" else [Level(plan[name]["type"],
                                                                         TENSOR_TYPE_BITS[plan[name]["type"]])]
              for name in layers}
    start, chosen, reasons = plan_levels(
        f"{key}.target_bpw={variant.target_bpw}", layers, levels, variant.target_bpw, sensitivity,
        lambda floor: (f"params.yaml: {key}.target_bpw={variant.target_bpw} is below the smallest plan, "
                       f"{floor:.4f} bits per weight (allowed: >= {floor:.4f}, or cheaper mix_types)"), check)
    for name in layers:
        level = levels[name][chosen[name]]
        plan[name]["planned_bits_per_weight"] = level.bits_per_weight
        if plan[name]["reason"] == "variant":
            plan[name].update(type=level.precision, reason=reasons.get(name, "auto-mix (start)" if start[name]
                                                                        else "auto-mix (cheapest)"))


def nest_plans(variants: dict[str, Any], tables: dict[str, dict], baseline: Path, layers: dict,
               check: Optional[Callable[[], PlanCheck]] = None) -> None:
    """Make the ladder's auto-mixes nest: among planned gguf variants that differ only in
    their target (same types, matrix, overrides, file type), each starts from the plan of
    the one with the next smaller target (its table's `start`, and `extends` naming it), so
    a larger budget never gives a layer a narrower type than a smaller one does. The table
    also lists every smaller plan of the chain (`chain`: name, target, types), which the
    plan's validation measures beside it: a larger variant never ships a file that diverges
    more than a smaller one on the validation text (quantbuild.plan_validation). `check`
    makes each plan's judge of whole plans, whose record the table keeps (`check`)."""
    groups: dict[tuple, list[str]] = {}
    for name, variant in variants.items():
        if variant.method == "gguf" and variant.target_bpw and tables.get(name, {}).get("planned"):
            key = (tuple(variant.mix_types), bool(variant.imatrix), variant.type, variant.token_embd_type,
                   variant.output_type, tuple((override.pattern, override.type) for override in variant.overrides))
            groups.setdefault(key, []).append(name)
    for names in groups.values():
        chain: list[dict] = []
        for name in sorted(names, key=lambda item: (variants[item].target_bpw, item)):
            if chain:
                tables[name].update(extends=chain[-1]["name"], start=chain[-1]["types"], chain=list(chain))
            judge = check() if check else None
            plan = _plan(f"quant.variants.{name}", variants[name], layers, tables[name], baseline, judge)
            if judge:
                tables[name]["check"] = judge.record
            chain.append({"name": name, "target_bpw": variants[name].target_bpw,
                          "types": {layer: entry["type"] for layer, entry in sorted(plan.items())}})


def tensor_type_file(plan: dict, path: Path) -> bool:
    """llama-quantize's `--tensor-type-file`: one anchored pattern per explicitly typed tensor."""
    lines = [f"^{re.escape(entry['gguf_name'])}$={entry['type'].lower()}"
             for _, entry in sorted(plan.items()) if entry["type"]]
    path.write_text("\n".join(lines) + "\n")
    return bool(lines)


def _quantize(variant: Any, inputs: Inputs, plan: dict, out: Path) -> dict:
    from quantbuild.runtimes.gguf_file import write_with_lineage
    from quantbuild.runtimes.llama_build import cores, run_tool

    started = time.perf_counter()
    base = require_base(inputs.gguf_base)
    args = ["--imatrix", str(require_imatrix(inputs.imatrix))] if variant.imatrix else []
    if variant.token_embd_type:
        args += ["--token-embedding-type", variant.token_embd_type.lower()]
    if variant.output_type:
        args += ["--output-tensor-type", variant.output_type.lower()]
    types_file = out.parent / "tensor_types.txt"
    if tensor_type_file(plan, types_file):
        args += ["--tensor-type-file", str(types_file)]
    quantized = out.parent / "quantized.gguf"
    # the quantized file (about the type's bits over the F16 base's 16, a quarter more for the
    # tensors a mix keeps wider), then its copy with the lineage beside it
    bits = TENSOR_TYPE_BITS.get(re.sub(r"_[SML]$", "", variant.type), 16.0)
    needed = 2 * base.stat().st_size * bits / 16 * 1.25
    require_space(out, int(needed))
    try:
        output = run_tool("llama-quantize", [*args, str(base), str(quantized), variant.type, str(cores())],
                          f"gguf {variant.type}")
    except QuantbuildError:
        if free_bytes(out) < needed:  # the tool's own line does not say the disk filled
            raise disk_full(out, int(needed)) from None
        raise
    from quantbuild.hashing import read_json

    record = read_json(inputs.gguf_base / RECORD)
    lineage = {**(inputs.lineage or {}), "plan": {entry["gguf_name"]: entry["type"] for entry in plan.values()},
               "imatrix": imatrix_record(inputs.imatrix) if variant.imatrix else None,
               "base_gguf": {key: record.get(key) for key in ("base_type", "base_sha256", "tensors_sha256",
                                                              "pre_tokenizer")}}
    validation, shipped = None, quantized
    work = None
    try:
        # a repair round re-plans for failing families (its table's `objective`): the preset
        # that beats it on general text is not what it was asked for, so it is not swapped
        if variant.target_bpw and variant.validation_tokens and not (inputs.sensitivity or {}).get("objective"):
            smaller = {f"plan {link['name']}": _chain_args(link, plan, args, out.parent)
                       for link in (inputs.sensitivity or {}).get("chain", [])}
            build = PlanBuild(_without(args, "--imatrix"), variant.type, _tensors_by_type(plan), bool(variant.imatrix))
            validation, replacement, work = _validate(variant, inputs, quantized, base, smaller, build,
                                                      _budget_bytes(variant, plan, quantized))
            if replacement is not None:  # a file within the budget beat the plan: it ships instead
                shipped = replacement
                winner = validation["shipped"]
                if winner == BY_TYPE:  # this plan, the importance matrix on the types it helps only
                    helped = sorted(kind for kind, verdict in validation["imatrix_by_type"].items() if verdict["use"])
                    lineage.update(imatrix=imatrix_record(inputs.imatrix) if helped else None, imatrix_types=helped)
                elif winner.startswith("plan "):  # a smaller plan of the chain, built as this one is
                    link = next(link for link in inputs.sensitivity["chain"] if f"plan {link['name']}" == winner)
                    lineage["plan"] = {plan[layer]["gguf_name"]: kind for layer, kind in link["types"].items()}
                elif winner.endswith(BY_ROLE):  # a stock preset, the matrix on some tensor roles only
                    lineage.update(plan={}, imatrix=imatrix_record(inputs.imatrix),
                                   imatrix_roles=validation["imatrix_by_role"]["roles"])
                else:  # a stock preset
                    lineage.update(plan={}, imatrix=imatrix_record(inputs.imatrix) if "+imatrix" in winner else None)
            lineage["validation"] = {"shipped": validation["shipped"], "text_sha256": validation["text"]["sha256"],
                                     "kld_mean": {name: entry["kld_mean"]
                                                  for name, entry in validation["measured"].items()}}
        write_with_lineage(shipped, out / MODEL_FILE, lineage)
    finally:
        if work is not None:
            work.cleanup()
        for chained in out.parent.glob("tensor_types.*.txt"):
            chained.unlink()
    quantized.unlink()
    types_file.unlink()
    return {**measurements(started), "llama_quantize_log_lines": len(output.splitlines()),
            **({"validation": validation} if validation else {})}


def _chain_args(link: dict, plan: dict, args: list[str], folder: Path) -> list[str]:
    """llama-quantize's arguments for a smaller plan of the chain (`link`: its name and
    types): this variant's own, with that plan's tensor types in a file beside this one's."""
    kept = _without(args, "--tensor-type-file")
    path = folder / f"tensor_types.{link['name']}.txt"
    if tensor_type_file({layer: {**plan[layer], "type": kind} for layer, kind in link["types"].items()}, path):
        kept += ["--tensor-type-file", str(path)]
    return kept


def _without(args: list[str], option: str) -> list[str]:
    """llama-quantize's arguments less `option` and its value."""
    return [arg for index, arg in enumerate(args) if arg != option and (index == 0 or args[index - 1] != option)]


def _tensors_by_type(plan: dict) -> dict[str, list[str]]:
    """Each tensor type of the plan -> the GGUF tensors it gives that type."""
    grouped: dict[str, list[str]] = {}
    for _, entry in sorted(plan.items()):
        if entry["type"]:
            grouped.setdefault(entry["type"], []).append(entry["gguf_name"])
    return grouped


def _budget_bytes(variant: Any, plan: dict, quantized: Path) -> int:
    """The tensor bytes the variant's target allows: the plan's file with its decoder layers
    at `target_bpw` (the planner stores at most that; the rest of the file is the same)."""
    from quantbuild.plan_validation import tensor_bytes
    from quantbuild.runtimes.gguf_file import layout

    tensors = {tensor.name: tensor for tensor in layout(quantized).tensors}
    decoder = [tensors[entry["gguf_name"]] for entry in plan.values()]
    unspent = variant.target_bpw * sum(tensor.elements for tensor in decoder) - 8 * sum(t.nbytes for t in decoder)
    return tensor_bytes(quantized) + max(0, int(-(-unspent // 8)))


def _validate(variant: Any, inputs: Inputs, quantized: Path, base: Path, smaller: dict[str, list[str]],
              build: PlanBuild, budget: int) -> tuple[dict, Optional[Path], Any]:
    """The plan against llama.cpp's stock presets within its budget (`budget` tensor bytes),
    the smaller plans of its chain (`smaller`: label -> llama-quantize arguments) and itself
    with the importance matrix on the tensor types it helps only (`build`), on held-out text
    (quantbuild.plan_validation), with the importance matrix where the imatrix stage made one."""
    from quantbuild.fingerprint import cpu_info
    from quantbuild.plan_validation import validate_plan
    from quantbuild.runtimes.llama_build import free_cores, repack_allowed
    from quantbuild.runtimes.llama_cpp import fastest_device

    from quantbuild.probes import planner_probes

    matrix = require_imatrix(inputs.imatrix) if imatrix_record(inputs.imatrix) else None
    own = planner_probes(inputs.baseline, inputs.calibration, inputs.sensitivity or {})
    # the cores free now, as the evaluation takes them (the divergences do not depend on the
    # count: each output of llama.cpp's CPU matmul is one thread's sum, and each quantized block
    # one thread's work; llama.cpp's threads wait for each other at every barrier, so a thread
    # for a core another job holds slows every step); on the GPU where llama.cpp has one (an 8B
    # model's 17 candidates take hours on a CPU)
    return validate_plan(quantized, base, matrix, inputs.baseline, variant.validation_tokens,
                         free_cores()["threads"], repack_allowed(cpu_info()["isa"]),
                         smaller={label: (args, build.file_type) for label, args in smaller.items()}, build=build,
                         own=own, budget_bytes=budget, device=fastest_device())


def effective_bits(model_dir: Path, plan: dict, layers: dict) -> dict[str, Any]:
    """Bits per weight of the decoder's linear layers as stored (their llama.cpp types), the
    whole file's bits per parameter, and each layer's type and reason."""
    from quantbuild.runtimes.gguf_file import layout

    tensors = {tensor.name: tensor for tensor in layout(model_dir / MODEL_FILE).tensors}
    report, stored, total = {}, 0.0, 0
    for name, entry in sorted(plan.items()):
        tensor = tensors[entry["gguf_name"]]
        weights = layers[name][0] * layers[name][1]
        bits = tensor.nbytes * 8 / weights
        stored += tensor.nbytes * 8
        total += weights
        report[name] = {"gguf_name": entry["gguf_name"], "type": tensor.type_name,
                        "reason": entry["reason"] if entry["type"] else f"file type ({entry['reason']})",
                        "bits_per_weight": round(bits, 4)}
    params = sum(tensor.elements for tensor in tensors.values())
    file_bits = sum(tensor.nbytes for tensor in tensors.values()) * 8 / max(1, params)
    return {"bits_per_weight": round(stored / max(1, total), 4), "nominal_bits": round(stored / max(1, total), 4),
            "file_bits_per_weight": round(file_bits, 4), "quantized_weights": total, "layers": report}


METHOD = Method(name="gguf", bits=(), group_sizes=(), needs_calibration=False, quantize=_quantize,
                library="llama.cpp", check=_check, plan=_plan, effective_bits=effective_bits)
