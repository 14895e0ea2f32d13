"""GGUF through llama.cpp: conversion with the bundled tokenizer, token-ID equality with HF,
the gguf method (file types, imatrix, auto-mix) building the same bytes twice and the same
tensors as llama-quantize called directly, lineage inside the file, the runtime adapter,
and one line for every bad input."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import BASELINE, REPO
from quantbuild.calibration import compose_calibration, load_calibration
from quantbuild.config import CalibrationConfig, GgufConfig, GgufOverrideConfig, SensitivityConfig
from quantbuild.errors import ConfigError, IntegrityError, QuantbuildError
from quantbuild.gguf_base import RECORD as BASE_RECORD
from quantbuild.gguf_base import build_base, build_imatrix
from quantbuild.hashing import read_json, sha256_file
from quantbuild.quantization import MODEL_DIR, RECORD, build_variant
from quantbuild.quantizers import Inputs, model_layers
from quantbuild.gguf_artifacts import BASE_FILE, IMATRIX_FILE, IMATRIX_RECORD, MODEL_FILE, imatrix_record
from quantbuild.quantizers.gguf import TENSOR_TYPE_BITS, gguf_names
from quantbuild.runtimes.gguf_file import PREFIX, metadata, tensor_digest, tensor_types
from quantbuild.runtimes.llama_build import repack_allowed, run_tool
from quantbuild.runtimes.llama_cpp import LlamaCppModel, memory_at
from quantbuild.tasks.items import load_items
from quantbuild.release.verify import verify_gguf
from quantbuild.probes import FAMILIES
from quantbuild.sensitivity import Candidate, gguf_weights, load_sensitivity, write_sensitivity

pytestmark = pytest.mark.slow

CALIBRATION = CalibrationConfig(sources={"workflow_prompts": 0.5, "tool_calls": 0.3, "domain_text": 0.2}, samples=6,
                                seq_len=96, sensitivity=SensitivityConfig(samples=2, family_tokens=256,
                                                                          measure="weight_error"),
                                imatrix_samples=40, imatrix_chunk=128)
DATA = REPO / "data" / "calibration"


def imatrix_of(base: Path) -> Path:
    """Where `_build_base` puts the importance matrix of the base in `base` (the imatrix
    stage's folder beside the gguf_base stage's)."""
    return base.with_name(f"{base.name}-imatrix")


def _build_base(out: Path, model: Path = BASELINE) -> None:
    build_base(model, "f16", needed=True, out=out)
    build_imatrix(out, model, CALIBRATION, DATA, needed=True, repack=False, out=imatrix_of(out))



def evaluate_gguf(path: Path, kv_type: str, config, data: Path, out: Path, reference, baseline=None,
                  latency_bound=None) -> dict:
    """The evaluate stage's evaluation of one GGUF file (no weight repacking, as on this CPU)."""
    from quantbuild.evaluation.runner import evaluate, gguf_spec

    return evaluate(gguf_spec(path, kv_type, config, False), config, data, out, reference,
                    baseline=None if baseline is None else gguf_spec(baseline, "f16", config, False),
                    latency_bound=latency_bound)

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "base"
    _build_base(out)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, base) -> Inputs:
    out = tmp_path_factory.mktemp("calibration")
    compose_calibration(CALIBRATION, DATA, BASELINE, out)
    return Inputs(BASELINE, load_calibration(out), gguf_base=base, imatrix=imatrix_of(base),
                  lineage={"baseline": {"name": "workflow-llama-8m"}, "build_fingerprint_sha256": "f" * 64})


@pytest.fixture(scope="module")
def sensitivity(tmp_path_factory, inputs, base) -> Path:
    """The sensitivity stage's tables for VARIANTS (mix_3p8: four llama.cpp types with the
    imatrix), by the weight-space measure (the measured KL: its own test below)."""
    out = tmp_path_factory.mktemp("sensitivity") / "sensitivity"
    write_sensitivity(BASELINE, inputs.calibration, VARIANTS, CALIBRATION.sensitivity, base, out, imatrix=imatrix_of(base))
    return out


def _inputs(inputs: Inputs, sensitivity: Path, name: str) -> Inputs:
    return replace(inputs, sensitivity=load_sensitivity(sensitivity, name))


VARIANTS = {
    "q8_0": GgufConfig(type="Q8_0"),
    "q4_k_m_imat": GgufConfig(type="Q4_K_M", imatrix=True),
    "iq4_xs_imat": GgufConfig(type="IQ4_XS", imatrix=True),
    # (the planner's own tests read its plan: not swapped for a preset by validation)
    "mix_3p8": GgufConfig(type="Q4_K_S", imatrix=True, target_bpw=3.8, validation_tokens=0),
    "q4_k_s_overrides": GgufConfig(type="Q4_K_S", token_embd_type="Q8_0",
                                   overrides=[GgufOverrideConfig(pattern=r"blk\.0\..*", type="Q6_K")]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, inputs, sensitivity) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    for name, variant in VARIANTS.items():
        build_variant(name, variant, _inputs(inputs, sensitivity, name), root / name)
    return {name: root / name for name in VARIANTS}


def test_bundled_tokenizer_converts_with_the_starcoder_pre_tokenizer(base):
    record = read_json(base / BASE_RECORD)
    assert record["pre_tokenizer"] == "starcoder" and record["pre_tokenizer_named_by_quantbuild"]
    assert metadata(base / BASE_FILE)["tokenizer.ggml.pre"] == "starcoder"


def test_hf_and_llama_cpp_token_ids_are_identical_on_every_bundled_file(base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    files = sorted((REPO / "data" / "eval").glob("*.jsonl")) + sorted(DATA.glob("*.jsonl"))
    checked = 0
    with LlamaCppModel(base / BASE_FILE, n_ctx=256) as model:
        for path in files:
            for line in path.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                text = record.get("prompt") or record["text"]
                assert model.tokenize(text) == tokenizer(text)["input_ids"], f"{path.name}: {record.get('id')}"
                checked += 1
    assert checked == 2204


def test_conversion_and_imatrix_are_byte_identical_across_runs(base, tmp_path):
    _build_base(tmp_path / "again")
    assert sha256_file(tmp_path / "again" / BASE_FILE) == sha256_file(base / BASE_FILE)
    assert sha256_file(imatrix_of(tmp_path / "again") / IMATRIX_FILE) == sha256_file(imatrix_of(base) / IMATRIX_FILE)
    imatrix = imatrix_record(imatrix_of(base))
    assert imatrix["tokens_used"] == imatrix["chunks"] * 128 and imatrix["tokens"] >= imatrix["tokens_used"]
    assert set(imatrix["composition"]) == {"workflow_prompts", "tool_calls", "domain_text"}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_builds_the_same_gguf_twice_on_one_core_as_on_all(name, built, inputs, sensitivity, tmp_path,
                                                                       monkeypatch):
    import quantbuild.runtimes.llama_build as llama_build

    assert llama_build.cores() == len(os.sched_getaffinity(0))  # what `built` was made with
    monkeypatch.setattr(llama_build, "cores", lambda: 1)
    # (a planned mix's validation runs on the cores free when it starts)
    monkeypatch.setattr(llama_build, "free_cores", lambda: {"threads": 1})
    build_variant(name, VARIANTS[name], _inputs(inputs, sensitivity, name), tmp_path / name)
    first = read_json(built[name] / RECORD)["files"]
    assert read_json(tmp_path / name / RECORD)["files"] == first


def test_quantize_gives_the_tensors_llama_quantize_gives_called_directly(built, base, tmp_path):
    direct = tmp_path / "direct.gguf"
    run_tool("llama-quantize", ["--imatrix", str(imatrix_of(base) / IMATRIX_FILE), str(base / BASE_FILE), str(direct), "Q4_K_M"],
             "direct")
    assert tensor_digest(built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE) == tensor_digest(direct)


def test_types_overrides_and_token_embedding_type_land_in_the_file(built):
    types = tensor_types(built["q4_k_s_overrides"] / MODEL_DIR / MODEL_FILE)
    assert types["token_embd.weight"] == "Q8_0"
    assert {types[f"blk.0.{t}.weight"] for t in ("attn_q", "attn_k", "ffn_down", "ffn_up")} == {"Q6_K"}
    assert types["blk.1.attn_q.weight"] == "Q4_K"
    assert tensor_types(built["q8_0"] / MODEL_DIR / MODEL_FILE)["blk.3.ffn_up.weight"] == "Q8_0"


def test_auto_mix_stays_within_its_target_and_promotes_the_most_sensitive(built, sensitivity):
    record = read_json(built["mix_3p8"] / RECORD)
    assert record["bits_per_weight"] <= 3.8
    # The planner's bits are exactly what llama-quantize stored (measured equals planned to 1e-3).
    assert abs(record["planned_bits_per_weight"] - record["bits_per_weight"]) < 1e-3
    layers = record["layers"]
    types = {entry["type"] for entry in layers.values()}
    assert len(types) >= 2 and types <= {"Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    table = load_sensitivity(sensitivity, "mix_3p8")
    assert table["candidates"] == ["Q3_K+imatrix", "Q4_K+imatrix", "Q5_K+imatrix", "Q6_K+imatrix"]
    kld = {name: entry["kld"]["Q3_K+imatrix"]["calibration"] for name, entry in table["layers"].items()}
    promoted = [name for name, entry in layers.items() if entry["type"] != "Q3_K"]
    kept = [name for name, entry in layers.items() if entry["type"] == "Q3_K"]
    # the promoted layers are, on average, the more sensitive ones at the cheapest type
    assert sum(kld[n] for n in promoted) / len(promoted) > sum(kld[n] for n in kept) / len(kept)
    assert record["sensitivity_sha256"] == table["sha256"]
    # the plan names the measure that made it
    assert record["sensitivity_measure"] == table["measure"] == "weight_error"


def test_sensitivity_is_measured_per_candidate_and_family_and_is_deterministic(sensitivity, inputs, base, tmp_path):
    table = load_sensitivity(sensitivity, "mix_3p8")
    assert load_sensitivity(sensitivity, "q8_0") is None  # a variant that plans nothing: a stub
    assert set(table["probes"]) == {"calibration", *FAMILIES}
    entry = table["layers"]["model.layers.7.mlp.down_proj"]["kld"]
    assert set(entry["Q3_K+imatrix"]) == {"calibration", *FAMILIES}
    # More bits, less divergence, on the calibration mix, for a sensitive layer.
    assert entry["Q3_K+imatrix"]["calibration"] > entry["Q4_K+imatrix"]["calibration"] > entry["Q6_K+imatrix"]["calibration"]
    write_sensitivity(BASELINE, inputs.calibration, {"mix_3p8": VARIANTS["mix_3p8"]}, CALIBRATION.sensitivity, base,
                      tmp_path / "again", imatrix=imatrix_of(base))
    assert sha256_file(tmp_path / "again" / "mix_3p8.json") == sha256_file(sensitivity / "mix_3p8.json")


def test_the_weight_space_measure_keeps_its_fisher_in_host_bfloat16_where_float32_would_not_fit(inputs, base,
                                                                                                 monkeypatch):
    """At 8B the five probe sets' Fisher diagonals are 140 GB in float32: past FISHER_SHARE of
    the free memory they are kept in bfloat16 in host memory, with the same estimates to
    within bfloat16's rounding, and the table says which storage made it; and one set's
    float32 sums, 28 GB at 8B, are formed a run of layers at a time where they do not fit."""
    import quantbuild.sensitivity as sensitivity_module
    from quantbuild.sensitivity import WEIGHT_ERROR, measure

    config = replace(CALIBRATION.sensitivity, measure=WEIGHT_ERROR)
    variant = GgufConfig(type="Q4_K_S", target_bpw=4.5, mix_types=["Q3_K", "Q6_K"])
    full = measure(BASELINE, inputs.calibration, {"mix": variant}, config, base)["mix"]
    # as little memory free as leaves room for a third of the layers' float32 sums at once:
    # each set's Fisher summed in three or more passes, each over a run of layers
    weights = sum(out * inp for out, inp in model_layers(BASELINE).values())
    monkeypatch.setattr(sensitivity_module, "_free_memory", lambda device: 8 * weights // 3)
    passes = []
    collect = sensitivity_module._Importance._collect
    monkeypatch.setattr(sensitivity_module._Importance, "_collect",
                        lambda self, *args: passes.append(args[3]) or collect(self, *args))
    compact = measure(BASELINE, inputs.calibration, {"mix": variant}, config, base)["mix"]
    assert full["fisher"] == "float32" and compact["fisher"] == "bfloat16, host memory"
    probe_sets = len(full["probes"])
    assert len(passes) >= 3 * probe_sets and sorted(sum(passes[:len(passes) // probe_sets], [])) == sorted(full["layers"])
    values = [(entry["kld"][key][probes], compact["layers"][layer]["kld"][key][probes])
              for layer, entry in full["layers"].items() for key in entry["kld"] for probes in entry["kld"][key]]
    assert len(values) == len(full["layers"]) * 2 * len(full["probes"]) and all(a > 0 for a, _ in values)
    assert max(abs(b - a) / a for a, b in values) < 0.005
    # each sequence's squared gradient product formed a bounded slice of sequences at a time
    # (an 8B model's MLP, 36 sequences: 8.5 GiB at once ran a 80 GB H100 out of memory)
    import torch

    generator = torch.Generator().manual_seed(0)
    grad, inputs_ = (torch.randn(7, 5, size, generator=generator) for size in (6, 4))
    whole = sensitivity_module._squared_per_sequence(grad, inputs_)
    monkeypatch.setattr(sensitivity_module, "PER_SEQUENCE_BYTES", 2 * 4 * 6 * 4)
    sliced = sensitivity_module._squared_per_sequence(grad, inputs_)
    expected = sum((grad[b].T @ inputs_[b]).pow(2) for b in range(7))
    assert sliced.shape == whole.shape == (6, 4) and torch.allclose(sliced, whole) and torch.allclose(whole, expected)
    # the weights beside a host Fisher in the narrowest type that holds them exactly
    weights = torch.randn(8, 8, generator=generator)
    for narrow, kept in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (None, torch.float32)):
        exact = weights.to(narrow).float() if narrow else weights
        stored = sensitivity_module._exact_compact(exact)
        assert stored.dtype == kept and torch.equal(stored.float(), exact)


def test_the_measured_kl_orders_layers_as_the_weight_space_measure_does_and_repeats(sensitivity, inputs, base):
    from quantbuild.sensitivity import KL, measure

    config = replace(CALIBRATION.sensitivity, measure=KL, family_tokens=0)
    variant = replace(VARIANTS["mix_3p8"], mix_types=["Q3_K", "Q6_K"])
    measured = measure(BASELINE, inputs.calibration, {"mix": variant}, config, base, imatrix=imatrix_of(base))["mix"]
    estimated = load_sensitivity(sensitivity, "mix_3p8")
    assert measured["measure"] == KL and estimated["measure"] == "weight_error"
    assert measured["candidates"] == ["Q3_K+imatrix", "Q6_K+imatrix"] and set(measured["probes"]) == {"calibration"}
    # the same order of layers, by and large, at the cheapest type on the calibration mix,
    # and the same order of magnitude (both are the mean KL per scored position)
    layers = sorted(measured["layers"])
    pairs = [(measured["layers"][name]["kld"]["Q3_K+imatrix"]["calibration"],
              estimated["layers"][name]["kld"]["Q3_K+imatrix"]["calibration"]) for name in layers]
    rank = lambda values: [sorted(values).index(value) for value in values]  # noqa: E731
    first, second = rank([a for a, _ in pairs]), rank([b for _, b in pairs])
    n = len(pairs)
    assert 1 - 6 * sum((a - b) ** 2 for a, b in zip(first, second)) / (n * (n * n - 1)) > 0.7
    assert 0.2 < sum(b for _, b in pairs) / sum(a for a, _ in pairs) < 5
    # measured again: the same numbers
    single = replace(variant, mix_types=["Q3_K"])
    again = measure(BASELINE, inputs.calibration, {"mix": single}, config, base, imatrix=imatrix_of(base))["mix"]
    assert all(again["layers"][name]["kld"]["Q3_K+imatrix"] == measured["layers"][name]["kld"]["Q3_K+imatrix"]
               for name in layers)


def test_auto_takes_the_weight_space_measure_from_its_model_size_up():
    from quantbuild.sensitivity import KL, WEIGHT_ERROR, measure_of

    auto = SensitivityConfig(auto_weight_error_params=100_000_000)
    assert measure_of(auto, 8_000_000) == KL and measure_of(auto, 100_000_000) == WEIGHT_ERROR
    assert measure_of(replace(auto, measure=KL), 10**10) == KL
    assert measure_of(replace(auto, measure=WEIGHT_ERROR), 1) == WEIGHT_ERROR


def test_candidate_weights_are_llama_quantize_s_read_back_in_hf_layout(base, inputs, tmp_path):
    import torch
    from safetensors.torch import load_file

    layers = model_layers(BASELINE)
    weights = gguf_weights(Candidate("gguf", "Q8_0"), BASELINE, base, layers, tmp_path)
    hf = load_file(str(BASELINE / "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"):
        reference = hf[f"{name}.weight"].float()
        error = torch.linalg.norm(torch.from_numpy(weights[name]) - reference) / torch.linalg.norm(reference)
        assert error < 0.01, name  # Q8_0 round trip, rotary permutation undone


def test_candidate_weights_are_read_one_layer_at_a_time(base, tmp_path):
    """At 8B the decoder is 28 GB in float32: the candidate's layers are dequantized when
    each is read, and what a reader lets go of is freed."""
    import tracemalloc

    layers = model_layers(BASELINE)
    decoder, largest = (4 * f(out * inp for out, inp in layers.values()) for f in (sum, max))
    tracemalloc.start()
    try:
        weights = gguf_weights(Candidate("gguf", "Q4_K"), BASELINE, base, layers, tmp_path)
        norms = {layer: float((weights[layer] ** 2).sum()) for layer in weights}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(norms) == set(layers) and all(norm > 0 for norm in norms.values())
    assert peak < min(decoder / 4, 8 * largest), (peak, decoder, largest)


def test_the_dry_run_knows_a_file_s_size_without_building_it(built, base, monkeypatch):
    import quantbuild.runtimes.llama_build as llama_build
    from quantbuild.plan_validation import DRY_RUN_ROUNDING, planned_bytes
    from quantbuild.runtimes.gguf_file import layout

    matrix = ["--imatrix", str(imatrix_of(base) / IMATRIX_FILE)]
    for name, file_type in (("q4_k_m_imat", "Q4_K_M"), ("iq4_xs_imat", "IQ4_XS"), ("q8_0", "Q8_0")):
        written = sum(tensor.nbytes for tensor in layout(built[name] / MODEL_DIR / MODEL_FILE).tensors)
        args = matrix if name.endswith("_imat") else []
        assert abs(planned_bytes(base / BASE_FILE, args, file_type) - written) <= DRY_RUN_ROUNDING, name
    # (with the matrix llama-quantize gives IQ4_XS's tensors other types: the dry run must have it too)
    assert planned_bytes(base / BASE_FILE, [], "IQ4_XS") - planned_bytes(base / BASE_FILE, matrix, "IQ4_XS") \
        > DRY_RUN_ROUNDING
    # a llama-quantize that prints no size (another version's wording) is one line, not a guess
    monkeypatch.setattr(llama_build, "run_tool", lambda *args, **kwargs: "llama_model_quantize_impl: model size = 5 MiB")
    with pytest.raises(QuantbuildError, match=r"^dry run Q4_K_M: llama-quantize printed no quant size$"):
        planned_bytes(base / BASE_FILE, [], "Q4_K_M")


def test_the_file_carries_its_lineage_and_verifies_alone(built):
    path = built["iq4_xs_imat"] / MODEL_DIR / MODEL_FILE
    values = metadata(path)
    assert values[f"{PREFIX}variant"]["parameters"]["type"] == "IQ4_XS"
    assert values[f"{PREFIX}imatrix"]["sha256"] and values[f"{PREFIX}baseline"]["name"] == "workflow-llama-8m"
    assert values[f"{PREFIX}tensors_sha256"] == tensor_digest(path)
    llama = {"any": "environment"}
    from quantbuild.hashing import sha256_json

    assert verify_gguf(path, current_llama_cpp=llama).exit_code == 2
    assert values[f"{PREFIX}build_fingerprint_sha256"] == "f" * 64
    assert not verify_gguf(path, current_llama_cpp=llama).problems
    assert sha256_json(llama) != "f" * 64


def _with_value(path: Path, out: Path, key: str, value: str | None) -> Path:
    """`path` rewritten with string key/value `key` set to `value` (any length), or removed
    (None), everything else byte for byte: an attacker's edit."""
    import struct

    from quantbuild.runtimes.gguf_file import MAGIC, _kv_string, layout

    source = layout(path)
    entries = [(_kv_string(name, value) if name == key else entry) for name, entry in source.kv_entries.items()
               if not (name == key and value is None)]
    if key not in source.kv_entries and value is not None:
        entries.append(_kv_string(key, value))
    header = (MAGIC + struct.pack("<I", source.version) + struct.pack("<Q", len(source.tensors))
              + struct.pack("<Q", len(entries)) + b"".join(entries) + source.tensor_info_bytes)
    out.write_bytes(header + b"\0" * (-len(header) % source.alignment) + path.read_bytes()[source.data_start:])
    return out


def test_an_edited_key_value_of_a_lone_gguf_names_itself(base, tmp_path):
    """Lineage, tokenizer or template edited in place (same length or not), a key added or
    removed: `verify FILE.gguf` and `lineage FILE.gguf` exit 1 in one line naming the key."""
    from quantbuild.runtimes.gguf_file import write_with_lineage

    released = tmp_path / "released.gguf"
    write_with_lineage(base / BASE_FILE, released, {"variant": {"name": "gguf_q8_0", "type": "Q8_0"}})
    assert not verify_gguf(released, current_llama_cpp={}).problems
    same_length = tmp_path / "same.gguf"
    data = released.read_bytes()
    same_length.write_bytes(data.replace(b'"gguf_q8_0"', b'"gguf_q9_0"', 1))
    longer = _with_value(released, tmp_path / "longer.gguf", f"{PREFIX}variant", '{"name":"gguf_f16","type":"F16"}')
    template = _with_value(released, tmp_path / "template.gguf", "tokenizer.chat_template", "{{ messages }}")
    removed = _with_value(released, tmp_path / "removed.gguf", "tokenizer.ggml.pre", None)
    cases = {same_length: f"{PREFIX}variant changed", longer: f"{PREFIX}variant changed",
             template: "tokenizer.chat_template added", removed: "tokenizer.ggml.pre removed"}
    with LlamaCppModel(longer, n_ctx=64) as model:  # a well-formed file: llama.cpp loads it
        assert model.n_vocab > 0
    binary = Path(sys.executable).parent / "quantbuild"
    for path, named in cases.items():
        result = subprocess.run([str(binary), "verify", str(path)], capture_output=True, text=True)
        assert result.returncode == 1 and named in result.stderr, (path.name, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
        traced = subprocess.run([str(binary), "lineage", str(path)], capture_output=True, text=True)
        assert traced.returncode == 1 and named in traced.stdout + traced.stderr, path.name
    # a file without the digest (an older quantbuild's, or stripped of it) is not trusted
    stripped = _with_value(released, tmp_path / "stripped.gguf", f"{PREFIX}kv_sha256", None)
    assert any("no digest of its key/values" in problem for problem in verify_gguf(stripped).problems)


def test_a_signed_gguf_proves_its_digests_alone_and_a_rewritten_digest_does_not_pass(base, tmp_path):
    """With a signing key, the file carries a signature over its two digests: an attacker who
    edits the lineage and rewrites `quantbuild.kv_sha256` to match passes the digest check
    and fails the signature; an unsigned file does not pass a check with a key."""
    from quantbuild.release.signing import generate_keypair, sign_gguf
    from quantbuild.runtimes.gguf_file import KV_KEY, SIGNED_KEYS, TENSORS_KEY, layout, write_with_lineage

    for name in ("a", "b"):
        generate_keypair(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
    released = tmp_path / "released.gguf"
    write_with_lineage(base / BASE_FILE, released, {"variant": {"name": "gguf_q8_0"}})
    signed, again = tmp_path / "signed.gguf", tmp_path / "again.gguf"
    for copy in (signed, again):
        shutil.copyfile(released, copy)
        sign_gguf(copy, tmp_path / "a.key")
    assert sha256_file(signed) == sha256_file(again)  # deterministic: the same release, the same bytes
    with LlamaCppModel(signed, n_ctx=64) as model:
        assert model.n_vocab > 0

    def problems(path: Path, key: str | None) -> list[str]:
        return verify_gguf(path, current_llama_cpp={}, public_key=tmp_path / key if key else None).problems

    assert problems(signed, "a.pub") == []
    assert problems(signed, "b.pub") == [f"signed.gguf: its signature does not verify with {tmp_path / 'b.pub'} "
                                         f"(signed by another key, or its digests were rewritten)"]
    assert "signed, and no public key was given" in problems(signed, None)[0]
    assert "not signed, and a public key" in problems(released, "a.pub")[0]
    forged = _with_value(signed, tmp_path / "edited.gguf", f"{PREFIX}variant", '{"name":"gguf_f16"}')
    entries = layout(forged).kv_entries
    digests = {key: hashlib.sha256(entry).hexdigest() for key, entry in entries.items()
               if key not in (KV_KEY, TENSORS_KEY, *SIGNED_KEYS)}
    forged = _with_value(forged, tmp_path / "forged.gguf", KV_KEY, json.dumps(digests, sort_keys=True,
                                                                                separators=(",", ":")))
    assert problems(forged, "a.pub") == [f"forged.gguf: its signature does not verify with {tmp_path / 'a.pub'} "
                                         f"(signed by another key, or its digests were rewritten)"]


def test_a_manifest_given_to_a_lone_gguf_obeys_the_bundle_s_path_rules(base, tmp_path):
    from quantbuild.runtimes.gguf_file import write_with_lineage

    released = tmp_path / "model.gguf"
    write_with_lineage(base / BASE_FILE, released, {"variant": {"name": "gguf_q8_0"}})
    entry = {"sha256": sha256_file(released), "size": released.stat().st_size}
    for name, said in (("../model.gguf", "escapes the bundle"), ("model.gguf\u0000x", "control character")):
        manifest = tmp_path / name.replace("/", "_").replace("\0", "") / "manifest.json"
        manifest.parent.mkdir()
        manifest.write_text(json.dumps({"schema": "quantbuild.release.manifest/v1",
                                        "files": {"model.gguf": entry, name: entry}}))
        result = verify_gguf(released, manifest, current_llama_cpp={})
        assert result.exit_code == 1 and any(said in problem for problem in result.problems), result.problems


def test_a_tampered_or_truncated_gguf_is_one_line_and_exit_1(built, tmp_path):
    source = built["q8_0"] / MODEL_DIR / MODEL_FILE
    tampered = tmp_path / "tampered.gguf"
    data = bytearray(source.read_bytes())
    data[-1000] ^= 0xFF
    tampered.write_bytes(bytes(data))
    result = subprocess.run([str(Path(sys.executable).parent / "quantbuild"), "verify", str(tampered)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "tensor data differs from its metadata" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    header = tmp_path / "header.gguf"
    header.write_bytes(b"GGUF" + b"\xff" * 60)
    result = subprocess.run([str(Path(sys.executable).parent / "quantbuild"), "verify", str(header)],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "not a valid GGUF file" in result.stderr
    with pytest.raises(IntegrityError, match="not a valid GGUF file"):
        LlamaCppModel(header, n_ctx=64)


def test_a_valid_gguf_that_is_no_model_is_one_line(base):
    with pytest.raises(IntegrityError, match="llama.cpp cannot load this GGUF file"):
        LlamaCppModel(imatrix_of(base) / IMATRIX_FILE, n_ctx=64)


def test_the_variant_loads_alone_in_llama_cpp_and_answers_every_family(built):
    from quantbuild.evaluation.suites import MAX_NEW_TOKENS
    from quantbuild.evaluation.scorers import score

    right = {}
    with LlamaCppModel(built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE, n_ctx=2048) as model:
        for family in ("structured", "retrieval", "long_context", "reasoning"):
            items = load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:8]
            outputs = [model.detokenize(model.generate(model.tokenize(item.prompt), MAX_NEW_TOKENS[family]))
                       for item in items]
            right[family] = sum(score(item, output)["correct"] for item, output in zip(items, outputs))
    assert all(count >= 1 for count in right.values()), right


def test_kv_bytes_per_token_are_the_same_for_every_variant_of_one_kv_type(built, base):
    kv = {name: memory_at(path / MODEL_DIR / MODEL_FILE, 512, "f16", 2, False)["kv_cache"]
          for name, path in built.items()}
    kv["baseline"] = memory_at(base / BASE_FILE, 512, "f16", 2, False)["kv_cache"]
    assert len(set(kv.values())) == 1, kv
    assert memory_at(base / BASE_FILE, 512, "q8_0", 2, False)["kv_cache"] < kv["baseline"]


def test_tensor_type_bits_match_gguf_py():
    import gguf

    for name, bits in TENSOR_TYPE_BITS.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert bits == size * 8 / block, name


def test_repack_is_off_on_the_cpus_where_it_crashed():
    assert not repack_allowed(["avx2", "avx512f"]) and not repack_allowed(["amx_int8"])
    assert repack_allowed(["avx", "avx2", "fma"])


def test_layer_names_map_to_gguf_tensors():
    names = gguf_names(BASELINE, model_layers(BASELINE))
    assert names["model.layers.3.mlp.down_proj"] == "blk.3.ffn_down.weight"
    assert names["model.layers.0.self_attn.o_proj"] == "blk.0.attn_output.weight"


@pytest.mark.parametrize(("variant", "message"), [
    (GgufConfig(type="Q9_K"), "type='Q9_K' is not a llama.cpp type quantbuild allows"),
    (GgufConfig(type="Q4_K_M", output_type="Q7"), "output_type='Q7' is not a llama.cpp type"),
    (GgufConfig(type="IQ2_XS"), "imatrix=False is not allowed for type IQ2_XS"),
    (GgufConfig(type="Q4_K_M", kv_cache_type="q2"), "kv_cache_type='q2' is not allowed"),
    (GgufConfig(type="Q4_K_S", target_bpw=3.0), "target_bpw=3.0 is below the smallest plan, 3.4375"),
    (GgufConfig(type="Q4_K_S", target_bpw=4.0, mix_types=["Q6_K", "Q3_K"]), "mix_types=['Q6_K', 'Q3_K'] is not allowed"),
    (GgufConfig(type="Q4_K_M", overrides=[GgufOverrideConfig(pattern=r"blk\.99\..*", type="Q8_0")]), "matches no layer"),
])
def test_bad_gguf_variants_fail_before_any_work(variant, message, inputs, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        build_variant("bad", variant, inputs, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_an_imatrix_made_for_another_model_is_one_line_and_leaves_the_old_variant(built, inputs, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(str(other))
    AutoTokenizer.from_pretrained(str(BASELINE)).save_pretrained(str(other))
    other_base = tmp_path / "other-base"
    _build_base(other_base, other)
    mixed = tmp_path / "mixed-imatrix"
    shutil.copytree(inputs.imatrix, mixed)
    shutil.copyfile(imatrix_of(other_base) / IMATRIX_FILE, mixed / IMATRIX_FILE)
    out = tmp_path / "variant"
    shutil.copytree(built["q4_k_m_imat"], out)
    before = sha256_file(out / MODEL_DIR / MODEL_FILE)
    from dataclasses import replace

    # swapped in behind the record's back: refused by its digest before llama-quantize runs
    with pytest.raises(IntegrityError, match="imatrix.gguf: sha256 differs from imatrix_record.json"):
        build_variant("q4_k_m_imat", VARIANTS["q4_k_m_imat"], replace(inputs, imatrix=mixed), out)
    # recorded as if the imatrix stage had made it: llama-quantize itself refuses it
    record = read_json(mixed / IMATRIX_RECORD)
    record["imatrix"]["sha256"] = sha256_file(mixed / IMATRIX_FILE)
    (mixed / IMATRIX_RECORD).write_text(json.dumps(record))
    with pytest.raises(QuantbuildError, match="llama-quantize failed") as failure:
        build_variant("q4_k_m_imat", VARIANTS["q4_k_m_imat"], replace(inputs, imatrix=mixed), out)
    assert "\n" not in str(failure.value)
    assert sha256_file(out / MODEL_DIR / MODEL_FILE) == before


def test_an_architecture_the_converter_does_not_know_is_one_line(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(BASELINE, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="architecture 'MadeUpForCausalLM' is not supported by llama.cpp's converter"):
        build_base(model, "f16", needed=True, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_variant_is_evaluated_in_llama_cpp_against_its_baseline_with_its_kv_type(built, base, tmp_path):
    from quantbuild.config import EvalConfig, LatencyConfig, MemoryConfig
    from quantbuild.evaluation.runner import REFERENCE

    config = EvalConfig(limit=2, latency=LatencyConfig(prompt_lengths=[16], new_tokens=4, warmup=0, repeats=3),
                        memory=MemoryConfig(context_lengths=[256, 1024]))
    data = REPO / "data" / "eval"
    reference = evaluate_gguf(base / BASE_FILE, "f16", config, data, tmp_path / "baseline", None)
    assert (tmp_path / "baseline" / REFERENCE).is_file() and reference["kld_mean"] == 0.0
    metrics = evaluate_gguf(built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE, "q8_0", config, data, tmp_path / "variant",
                            tmp_path / "baseline" / REFERENCE, baseline=base / BASE_FILE)
    assert metrics["deploy_runtime"] == "llama.cpp" and metrics["llama_cpp"]["kv_cache_type"] == "q8_0"
    assert set(metrics["families"]) == {"structured", "retrieval", "long_context", "reasoning", "degenerate"}
    assert 0 < metrics["kld_mean"] < 0.05 and metrics["tokens"] == reference["tokens"]
    paired = metrics["latency_vs_baseline"]
    assert set(paired["by_length"]) == {"16"}
    assert paired["worst"]["ci_low"] <= paired["worst"]["ratio"] <= paired["worst"]["ci_high"]
    memory = metrics["memory"]["by_context"]
    # the KV cache grows with the context (llama.cpp pads small ones to 256 cells); q8_0 holds
    # it in about half the bytes of f16
    assert memory["1024"]["kv_cache_mb"] == pytest.approx(4 * memory["256"]["kv_cache_mb"], rel=0.01)
    assert memory["1024"]["kv_cache_mb"] < reference["memory"]["by_context"]["1024"]["kv_cache_mb"] * 0.6
    assert memory["1024"]["weights_mb"] < reference["memory"]["by_context"]["1024"]["weights_mb"] / 2


def test_a_variant_answers_each_gated_family_until_a_look_decides_it_with_the_full_run_s_outcomes(built, base,
                                                                                                   tmp_path):
    """The baseline answers every item; a variant's budgeted families stop at the first look
    whose paired interval at z decides them, its must-not-degrade family is answered whole,
    each answered item's outcome is the one a run of every item gives, and the gate decides
    the stopped families on those items at the recorded z."""
    from quantbuild.config import EvalConfig, GateConfig, LatencyConfig, MemoryConfig
    from quantbuild.evaluation.runner import OUTCOMES, REFERENCE, evaluate, gguf_spec
    from quantbuild.evaluation.sequential import Sequential, early_verdict, family_rules
    from quantbuild.gate import select

    config = EvalConfig(limit=60, latency=LatencyConfig(prompt_lengths=[16], new_tokens=4, warmup=0, repeats=3),
                        memory=MemoryConfig(context_lengths=[256]))
    gate = GateConfig(max_family_drop={"retrieval": 0.25, "long_context": 0.25, "reasoning": 0.25},
                      must_not_degrade=["structured"], max_memory_ratio=None, max_latency_paired_ratio=None)
    data = REPO / "data" / "eval"
    evaluate_gguf(base / BASE_FILE, "f16", config, data, tmp_path / "baseline", None)
    variant = built["q8_0"] / MODEL_DIR / MODEL_FILE
    whole = evaluate_gguf(variant, "f16", config, data, tmp_path / "whole", tmp_path / "baseline" / REFERENCE)
    until = Sequential(read_json(tmp_path / "baseline" / OUTCOMES), family_rules(gate), (20, 40), 3.0,
                       frozenset(config.families))
    measured = evaluate(gguf_spec(variant, "f16", config, False), config, data, tmp_path / "looks",
                        tmp_path / "baseline" / REFERENCE, until=until)
    full, answered = read_json(tmp_path / "whole" / OUTCOMES), read_json(tmp_path / "looks" / OUTCOMES)
    baseline = read_json(tmp_path / "baseline" / OUTCOMES)
    stops = measured["sequential"]["stopped"]
    assert set(stops) and set(stops) <= {"retrieval", "long_context", "reasoning"}, stops
    assert len(answered["structured"]) == 60
    for family, stop in stops.items():
        items = sorted(answered[family])
        assert stop["items"] == len(items) < stop["of"] == 60
        rule, limit = family_rules(gate)[family]
        sides = ([baseline[family][i] >= 1 for i in items], [answered[family][i] >= 1 for i in items])
        assert early_verdict(rule, limit, *sides, 3.0) == stop["verdict"]
        if stop["items"] == 40:  # the first look did not decide it
            first = [i for i in baseline[family]][:20]
            assert early_verdict(rule, limit, [baseline[family][i] >= 1 for i in first],
                                 [answered[family][i] >= 1 for i in first], 3.0) is None
    for family, values in answered.items():
        if family != "failures":
            assert values == {item: full[family][item] for item in values}, family
    assert measured["families"]["structured"] == whole["families"]["structured"]
    records = {"q8_0": {"method": "gguf", "size_bytes": 1, "bits_per_weight": 8.5}}
    decision = select({**read_json(tmp_path / "baseline" / "measurements.json"), "outcomes": baseline},
                      {"q8_0": {**measured, "outcomes": answered}}, records, gate)
    checks = {check["budget"]: check for check in decision["variants"]["q8_0"]["checks"]}
    for family, stop in stops.items():
        assert (checks[f"{family}_drop"]["n"], checks[f"{family}_drop"]["of"]) == (stop["items"], 60)
    assert checks["degenerate_increase"]["n"] == 4 * 60 - sum(60 - stop["items"] for stop in stops.values())


def test_lineage_of_a_lone_gguf_reads_its_metadata_and_checks_its_tensors(built, tmp_path):
    from quantbuild.release.lineage import OK, broken, gguf_lineage

    path = built["iq4_xs_imat"] / MODEL_DIR / MODEL_FILE
    tree = gguf_lineage(path)
    links = {link["link"]: link for link in tree["children"]}
    assert tree["status"] == OK and links["quantized weights"]["status"] == OK
    assert links["quantized weights"]["facts"]["parameters"]["type"] == "IQ4_XS"
    assert links["importance matrix"]["facts"]["sha256"] and links["baseline"]["facts"]["name"] == "workflow-llama-8m"
    tampered = tmp_path / "tampered.gguf"
    data = bytearray(path.read_bytes())
    data[-500] ^= 0xFF
    tampered.write_bytes(bytes(data))
    assert broken(gguf_lineage(tampered))


def _evaluate_ladder(built: dict, base: Path, config, out: Path, latency_bound=None) -> tuple[dict, dict, dict]:
    """(baseline, variants, records) as the select stage reads them, for q8_0 and q4_k_m_imat
    (timed against the baseline until decided against `latency_bound`, where given)."""
    from quantbuild.evaluation.runner import OUTCOMES, REFERENCE

    data = REPO / "data" / "eval"

    def measured(metrics: dict, folder: Path) -> dict:
        return {**metrics, "outcomes": read_json(folder / OUTCOMES)}

    baseline = measured(evaluate_gguf(base / BASE_FILE, "f16", config, data, out / "baseline", None),
                        out / "baseline")
    variants, records = {}, {}
    for name in ("q8_0", "q4_k_m_imat"):
        metrics = evaluate_gguf(built[name] / MODEL_DIR / MODEL_FILE, "f16", config, data, out / name,
                                out / "baseline" / REFERENCE, baseline=base / BASE_FILE, latency_bound=latency_bound)
        variants[name], records[name] = measured(metrics, out / name), read_json(built[name] / RECORD)
    return baseline, variants, records


def test_the_release_decision_is_the_same_in_five_runs_under_load(built, base, tmp_path):
    """Evaluate and select five times while another process keeps a core busy: the same
    variant is chosen each time, and each of its wins holds in every run, on a latency
    verdict (its interval at or below the limit, re-measured until it decides)."""
    from quantbuild.config import EvalConfig, GateConfig, LatencyConfig, MemoryConfig
    from quantbuild.evaluation.latency import decision_bound
    from quantbuild.gate import select

    config = EvalConfig(families=["language_modelling", "structured", "retrieval"], limit=6,
                        latency=LatencyConfig(prompt_lengths=[64], new_tokens=8, warmup=1, repeats=9, max_rounds=72),
                        memory=MemoryConfig(context_lengths=[1024]))
    # Six items are too few for quality intervals to decide anything: this is about latency.
    gate = GateConfig(max_perplexity_increase_pct=50, max_kld_mean=1.0, max_kld_p99=10.0, min_top1_agreement=0.5,
                      must_not_degrade=["structured"], max_memory_ratio=0.95, memory_context=1024, fallback="none")
    bound = decision_bound(gate.max_latency_paired_ratio, gate.latency_noise_margin)
    load = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        decisions = [select(*_evaluate_ladder(built, base, config, tmp_path / str(run), bound), gate)
                     for run in range(5)]
    finally:
        load.kill()
        load.wait()
    chosen = {decision["chosen"] for decision in decisions}
    assert chosen == {"q4_k_m_imat"}, [(d["chosen"], d["variants"]["q4_k_m_imat"]["reason"]) for d in decisions]
    assert all(decision["variants"]["q4_k_m_imat"]["wins"] == {"memory_ratio": True, "latency_ratio": True}
               for decision in decisions)


def test_model_memory_is_the_runtime_s_and_kv_bytes_per_token_match_across_variants(built, base, tmp_path):
    import resource

    from quantbuild.config import EvalConfig, LatencyConfig, MemoryConfig

    config = EvalConfig(families=["language_modelling"], limit=2,
                        latency=LatencyConfig(prompt_lengths=[16], new_tokens=4, warmup=0, repeats=3),
                        memory=MemoryConfig(context_lengths=[256, 1024]))
    baseline, variants, _ = _evaluate_ladder(built, base, config, tmp_path)
    per_token = {name: metrics["memory"]["kv_cache_bytes_per_token"]
                 for name, metrics in {"baseline": baseline, **variants}.items()}
    # one architecture, one KV dtype (f16): the same bytes per token, whatever the weights' type
    assert len(set(per_token.values())) == 1 and per_token["baseline"] > 0, per_token
    process_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for metrics in (baseline, *variants.values()):
        assert metrics["memory"]["by_context"]["1024"]["peak_mb"] < process_mb / 4
    assert variants["q4_k_m_imat"]["memory"]["by_context"]["1024"]["weights_mb"] < \
        baseline["memory"]["by_context"]["1024"]["weights_mb"] / 2


def test_an_unavailable_target_is_one_line_before_any_work(tmp_path, monkeypatch):
    from quantbuild.errors import RuntimeUnavailable
    from quantbuild.runtimes import llama_build, require_target

    monkeypatch.setattr(llama_build, "home", lambda: tmp_path / "nowhere")
    with pytest.raises(RuntimeUnavailable) as caught:
        require_target("llama.cpp")
    assert "\n" not in str(caught.value) and "llama-quantize is not built" in str(caught.value)
    with pytest.raises(RuntimeUnavailable, match="target 'tensorrt': unknown"):
        require_target("tensorrt")
    with pytest.raises(RuntimeUnavailable, match="target vllm: not available here"):
        require_target("vllm")


@pytest.fixture(scope="module")
def probed(built, tmp_path_factory) -> Path:
    """The q4_k_m_imat variant's behavioural probes, recorded as the evaluate stage does."""
    from quantbuild import behaviour

    out = tmp_path_factory.mktemp("probes")
    model = built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE
    with LlamaCppModel(model, n_ctx=256, kv_type="f16", threads=2) as runtime:
        behaviour.record(runtime, out)
    return out


def test_probes_pass_on_the_runtime_they_were_recorded_on_at_any_thread_count(built, probed):
    from quantbuild import behaviour

    info = read_json(probed / behaviour.BEHAVIOUR)
    assert info["spread"]["threads"][0] == 1 and info["tolerance"]["kld_mean"] >= behaviour.KLD_FLOOR
    model = built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE
    for threads in (1, 2, 2):
        with LlamaCppModel(model, n_ctx=256, kv_type="f16") as runtime:
            outcome = behaviour.check(runtime, probed, threads=threads)
        assert outcome["drift"] == [] and outcome["measured"]["greedy_match"] == 1.0, outcome
    # small: kilobytes, covered by the manifest like every bundle file
    assert sum(path.stat().st_size for path in probed.iterdir()) < 64 * 1024


def test_a_changed_kernel_path_with_the_same_versions_is_numerical_drift(built, probed):
    """The same file and library, other arithmetic: the KV cache in q8_0 instead of f16."""
    from quantbuild import behaviour

    model = built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE
    with LlamaCppModel(model, n_ctx=256, kv_type="q8_0") as runtime:
        outcome = behaviour.check(runtime, probed)
    assert "kld_mean" in [measure for measure, _, _ in outcome["drift"]], outcome


def test_probes_hold_no_eval_or_calibration_text(probed):
    from quantbuild import behaviour

    prompts = [text for _, _, text in behaviour.probe_prompts()]
    data = [item.prompt for path in sorted((REPO / "data" / "eval").glob("*.jsonl")) for item in load_items(path)]
    data += [line for path in sorted((REPO / "data" / "calibration").glob("*.jsonl")) for line in path.read_text().splitlines()]
    joined = "\n".join(data)
    assert all(prompt not in joined for prompt in prompts)
    stored = b"".join(path.read_bytes() for path in probed.iterdir())
    for prompt in prompts:
        for fragment in (prompt[:24], prompt[-24:]):
            assert fragment.encode() not in stored


def _bundle_with_probes(built: dict, probed: Path, out: Path) -> Path:
    from quantbuild.fingerprint import fingerprints
    from quantbuild.release.packaging import build_bundle
    from test_verify import LINEAGE

    lineage = {**LINEAGE, "variant": {**LINEAGE["variant"], "method": "gguf", "variant": "q4_k_m_imat",
                                      "parameters": {"type": "Q4_K_M", "kv_cache_type": "f16"}},
               "fingerprints": {"runtime": fingerprints()["llama_cpp"], "build": {}, "runtime_scope": "llama_cpp"}}
    build_bundle(out, "bundle", built["q4_k_m_imat"] / MODEL_DIR, lineage,
                 extra={"behaviour.json": probed / "behaviour.json", "probes.safetensors": probed / "probes.safetensors"})
    return out / "bundle"


def test_verify_behaviour_exit_codes_on_a_bundle_and_a_lone_gguf(built, probed, tmp_path):
    """0 unchanged; 2 naming the measure when the weights were altered and the manifest
    re-hashed (integrity passes); 1 when the probes themselves were altered."""
    from quantbuild.release.manifest import MANIFEST

    bundle = _bundle_with_probes(built, probed, tmp_path / "package")

    def run(*args: str) -> subprocess.CompletedProcess:
        # the runtime fingerprint of this bundle is empty: compare behaviour, not versions
        return subprocess.run([str(Path(sys.executable).parent / "quantbuild"), "verify", *args, "--behaviour", "--json"],
                              capture_output=True, text=True, cwd=tmp_path)

    ok = run(str(bundle))
    report = json.loads(ok.stdout)
    assert ok.returncode == 0 and report["behaviour"]["drift"] == [] and report["behaviour"]["probes"] == 8, ok.stdout
    lone = json.loads(run(str(bundle / MODEL_FILE)).stdout)
    # (this test's variant records a made-up build fingerprint: that drift, and no numerical drift)
    assert lone["behaviour"]["drift"] == [] and [entry["key"] for entry in lone["drift"]] == [
        "llama_cpp fingerprint (sha256)"]

    # Another variant's weights under the same name, the manifest re-hashed to match.
    shutil.copyfile(built["q8_0"] / MODEL_DIR / MODEL_FILE, bundle / MODEL_FILE)
    manifest = read_json(bundle / MANIFEST)
    manifest["files"][MODEL_FILE] = {"sha256": sha256_file(bundle / MODEL_FILE), "size": (bundle / MODEL_FILE).stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    drifted = run(str(bundle))
    assert drifted.returncode == 2, drifted.stdout + drifted.stderr
    report = json.loads(drifted.stdout)
    assert report["problems"] == [] and "numerical drift: kld_mean" in [entry["key"] for entry in report["drift"]]
    text = subprocess.run([str(Path(sys.executable).parent / "quantbuild"), "verify", str(bundle), "--behaviour"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert text.returncode == 2 and "numerical drift: kld_mean = " in text.stderr

    # Probes altered after packaging: the manifest catches it first (integrity, exit 1).
    (bundle / "behaviour.json").write_text("{}")
    assert run(str(bundle)).returncode == 1


def test_kld_is_llama_perplexity_s_and_matches_a_full_vocabulary_kld(built, base, tmp_path):
    """Chunks of kl_context tokens, BOS first, second half scored; the stored reference holds
    whole distributions for this vocabulary, so the stage's KLD equals one computed here
    from both models' full distributions (within 5%, for three variants)."""
    from quantbuild.config import EvalConfig, LatencyConfig, MemoryConfig
    from quantbuild.evaluation import kld
    from quantbuild.evaluation.runner import REFERENCE

    config = EvalConfig(families=["language_modelling"], limit=24, kl_context=256,
                        latency=LatencyConfig(prompt_lengths=[16], new_tokens=2, warmup=0, repeats=1),
                        memory=MemoryConfig(context_lengths=[256]))
    data = REPO / "data" / "eval"
    reference = evaluate_gguf(base / BASE_FILE, "f16", config, data, tmp_path / "baseline", None)
    assert reference["chunks"] >= 3 and reference["kld_mean"] == 0.0 and reference["items_tokens"] > 0
    texts = [item.prompt for item in load_items(data / "language_modelling.jsonl")[:24]]

    def full_logprobs(path: Path, pieces: list) -> list:
        with LlamaCppModel(path, n_ctx=256, threads=2) as model:
            return [model.logprobs(chunk)[len(chunk) // 2:] for chunk in pieces]

    with LlamaCppModel(base / BASE_FILE, n_ctx=256, threads=2) as model:
        pieces = kld.chunks(model.tokenize("\n".join(texts)), 256,
                            model.tokenize("", add_special=True)[0])
    assert len(pieces) == reference["chunks"] and all(chunk[0] == pieces[0][0] for chunk in pieces)
    baseline = full_logprobs(base / BASE_FILE, pieces)
    for name in ("q8_0", "q4_k_m_imat", "iq4_xs_imat"):
        path = built[name] / MODEL_DIR / MODEL_FILE
        metrics = evaluate_gguf(path, "f16", config, data, tmp_path / name, tmp_path / "baseline" / REFERENCE)
        variant = full_logprobs(path, pieces)
        total = sum(float((np.exp(p) * (p - q)).sum()) for p, q in zip(baseline, variant))
        direct = total / sum(p.shape[0] for p in baseline)
        assert metrics["kld_mean"] == pytest.approx(direct, rel=0.05), (name, metrics["kld_mean"], direct)
        assert list(metrics["kld_by_position"]) == ["128-159", "160-191", "192-223", "224-254"]
        assert metrics["items_kld_mean"] > 0 and metrics["tokens"] == reference["tokens"]


# The demo's auto-mix types (conf/quant/gguf_mix_3p5.yaml).
MIX_TYPES = ["Q2_K", "Q3_K", "IQ4_XS", "Q5_K", "Q6_K"]


def test_the_ladder_s_auto_mixes_nest_and_never_ship_more_divergence_for_more_bits(inputs, base, tmp_path, monkeypatch):
    """Issue #28: more bits made a worse model (3.5 -> 3.75 -> 4.0 on held-out text). Each mix
    now starts from the plan of the next smaller target of the same types (the plans nest),
    and its validation measures every smaller plan of the chain beside it: a larger variant
    ships whichever file no larger diverges least, so what ships never diverges more as
    the budget grows. The plans meet the same stock presets on the same texts: each preset
    is built and measured once in the process (#27: nothing computed twice), rebuilt only
    where it ships."""
    import quantbuild.runtimes.llama_build as llama_build
    from quantbuild.plan_validation import PLAN, STOCK_PRESETS, _is_preset, describe

    labels: list[str] = []
    tool = llama_build.run_tool

    def counted(name: str, args: list[str], label: str, *rest, **kwargs):
        labels.append(label)
        return tool(name, args, label, *rest, **kwargs)
    monkeypatch.setattr(llama_build, "run_tool", counted)

    ladder = {f"mix_{target}": GgufConfig(type="Q4_K_S", target_bpw=target, mix_types=MIX_TYPES,
                                          validation_tokens=2048) for target in (3.5, 3.75, 4.0)}
    write_sensitivity(BASELINE, inputs.calibration, ladder, CALIBRATION.sensitivity, base, tmp_path / "sensitivity",
                      imatrix=imatrix_of(base))
    names = sorted(ladder, key=lambda name: ladder[name].target_bpw)
    tables = {name: load_sensitivity(tmp_path / "sensitivity", name) for name in names}
    assert "extends" not in tables[names[0]] and [tables[name]["extends"] for name in names[1:]] == names[:-1]
    assert [link["name"] for link in tables[names[-1]]["chain"]] == names[:-1]
    shipped_kld, types = {}, {}
    presets_measured: list[dict] = []
    shipped_presets: list[str] = []
    for name in names:
        record = build_variant(name, ladder[name], replace(inputs, sensitivity=tables[name]), tmp_path / name)
        assert record.get("plan_request", {}).get("extends") == tables[name].get("extends")
        types[name] = {layer: entry["type"] for layer, entry in record["layers"].items()}
        validation = record["validation"]
        smaller = {f"plan {other}" for other in names[:names.index(name)]}
        assert smaller <= set(validation["measured"]) | set(validation["larger_than_plan"])
        # whether the importance matrix helps each of the plan's types, measured on the texts
        by_type = validation["imatrix_by_type"]
        assert set(by_type) == set(types[name].values()), by_type
        assert all(verdict["measured"] and verdict["use"] == (verdict["with"] < verdict["without"])
                   for verdict in by_type.values()), by_type
        # the plan's divergence on the probes it was planned on, beside the held-out texts'
        assert validation["planner_tokens"]["scored"] > 0
        assert {name for name, entry in validation["measured"].items() if "planner_tokens" in entry} == \
            {PLAN, validation["shipped"]}
        assert "on the planner's own" in describe(validation)
        shipped, plan = validation["measured"][validation["shipped"]], validation["measured"][PLAN]
        shipped_kld[name] = shipped["kld_mean"]
        # the rivals are what the target's size holds (the decoder at target_bpw, the rest as
        # stored), not what the plan happened to store
        decoder = sum(layer["weights"] for layer in tables[name]["layers"].values())
        assert plan["tensor_bytes"] <= validation["budget_bytes"] <= \
            plan["tensor_bytes"] + ladder[name].target_bpw * decoder / 8 - record["planned_bits_per_weight"] * decoder / 8 + 16
        assert all(entry["tensor_bytes"] <= validation["budget_bytes"] for entry in validation["measured"].values())
        # never worse than the best preset no larger on any text where the plan is not
        assert shipped["worst_ratio"] <= max(1.0, plan["worst_ratio"]), validation
        presets_measured.append({name: entry["texts"] for name, entry in validation["measured"].items()
                                 if _is_preset(name)})
        shipped_presets.append(validation["shipped"])
    for smaller, larger in zip(names, names[1:]):
        # every layer at least as wide as in the plan below it...
        assert all(TENSOR_TYPE_BITS[types[larger][layer]] >= TENSOR_TYPE_BITS[types[smaller][layer]]
                   for layer in types[smaller]), (smaller, larger)
        # ...and what ships diverges no more on text the planner never saw
        assert shipped_kld[larger] <= shipped_kld[smaller], shipped_kld
    # each preset measured once: a later plan meets it with the same divergences, not built again
    builds = [label.removeprefix("validation ") for label in labels if label.startswith("validation ")]
    met = [name for measured in presets_measured for name in measured]
    assert len(presets_measured[0]) >= 4 and len(met) > len(set(met)), presets_measured
    for preset in set(met):
        first = next(index for index, measured in enumerate(presets_measured) if preset in measured)
        # (each file is removed once measured: rebuilt where it ships, the first time too)
        assert builds.count(preset) == 1 + shipped_presets[first:].count(preset), (preset, builds)
        texts = [measured[preset] for measured in presets_measured if preset in measured]
        assert all(other == texts[0] for other in texts), preset
    assert all(preset.partition("+")[0] in STOCK_PRESETS for preset in met)


def test_the_importance_matrix_reaches_exactly_the_tensor_types_it_is_given(base, tmp_path):
    """Issue #28 item 4: a plan built with the importance matrix on some of its tensor types
    only (`PlanBuild.with_matrix_for`): in llama-quantize's output, the tensors of those types
    are the ones quantized with the matrix, every other tensor is byte for byte the one
    quantized without it, whether the plan itself used the matrix or not."""
    from quantbuild.plan_validation import PlanBuild
    from quantbuild.quantizers.gguf import tensor_type_file
    from quantbuild.runtimes.gguf_file import layout

    names = [tensor.name for tensor in layout(base / BASE_FILE).tensors if tensor.name.startswith("blk.")
             and tensor.name.endswith("weight") and len(tensor.dims) == 2]
    plan = {name: {"gguf_name": name, "type": "Q3_K" if index % 2 else "Q5_K"} for index, name in enumerate(names)}
    types_file = tmp_path / "types.txt"
    tensor_type_file(plan, types_file)
    tensors = {kind: [name for name in names if plan[name]["type"] == kind] for kind in ("Q3_K", "Q5_K")}
    matrix = imatrix_of(base) / IMATRIX_FILE

    def built(args: list[str], label: str) -> dict[str, bytes]:
        path = tmp_path / f"{label}.gguf"
        run_tool("llama-quantize", [*args, str(base / BASE_FILE), str(path), "Q4_K_S", "2"], label)
        data = path.read_bytes()
        return {tensor.name: data[tensor.offset:tensor.offset + tensor.nbytes] for tensor in layout(path).tensors}

    args = ["--tensor-type-file", str(types_file)]
    without, every = built(args, "without"), built([*args, "--imatrix", str(matrix)], "every")
    differs = {name for name in names if without[name] != every[name]}
    assert differs == set(names), "the matrix changes every planned tensor when given to all"
    for uses in (False, True):
        only = built(PlanBuild(args, "Q4_K_S", tensors, imatrix=uses).with_matrix_for(matrix, {"Q5_K"}), f"only-{uses}")
        assert all(only[name] == every[name] for name in tensors["Q5_K"])
        assert all(only[name] == without[name] for name in tensors["Q3_K"])
    assert PlanBuild(args, "Q4_K_S", tensors, imatrix=True).with_matrix_for(matrix, set()) == args


def test_a_plan_worse_than_a_stock_preset_no_larger_ships_the_preset(inputs, base, sensitivity, tmp_path,
                                                                      monkeypatch):
    """A planted bad plan: each layer is handed the measured sensitivities of its mirror in
    order of sensitivity, so the planner widens the layers that matter least, and the
    layers that matter most are pinned at Q2_K. On held-out
    text a stock preset no larger beats it, and that preset is what the variant ships: the
    file is llama-quantize's preset, its lineage and record name it, and the validation
    text itself is nowhere in the variant's folder (its digest is)."""
    from quantbuild.plan_validation import PLAN, describe

    table = load_sensitivity(sensitivity, "mix_3p8")
    layers = table["layers"]
    order = sorted(layers, key=lambda name: layers[name]["kld"]["Q3_K+imatrix"]["calibration"])
    planted = {**table, "layers": {mine: {**layers[mine], "kld": layers[mirror]["kld"]}
                                   for mine, mirror in zip(order, reversed(order))}}
    # and the layers that matter most, every block's attn_v and ffn_down, pinned at Q2_K
    pinned = [GgufOverrideConfig(pattern=rf"blk\.\d+\.{name}\.weight", type="Q2_K") for name in ("attn_v", "ffn_down")]
    variant = GgufConfig(type="Q4_K_S", imatrix=True, target_bpw=3.8, validation_tokens=2048, overrides=pinned)
    import quantbuild.runtimes.llama_build as llama_build

    calls: list[list[str]] = []
    tool = llama_build.run_tool

    def recorded(name: str, args: list[str], *rest, **options) -> str:
        calls.append(args)
        return tool(name, args, *rest, **options)

    monkeypatch.setattr(llama_build, "run_tool", recorded)
    record = build_variant("planted", variant, replace(inputs, sensitivity=planted), tmp_path / "planted")
    validation = record["validation"]
    # a preset larger than the budget is known so from llama-quantize's dry run, never built
    built_files = {Path(args[-3]).stem for args in calls if "--dry-run" not in args and len(args) >= 3}
    dry_types = {args[-1] for args in calls if "--dry-run" in args}
    assert validation["larger_than_plan"] and not built_files & set(validation["larger_than_plan"])
    assert {name.partition("+")[0] for name in validation["larger_than_plan"]} & dry_types
    shipped = validation["shipped"]
    measured = validation["measured"]
    assert shipped != PLAN and shipped == validation["best_alternative"], describe(validation)
    assert measured[PLAN]["worst_ratio"] > 1 >= measured[shipped]["worst_ratio"]
    assert measured[shipped]["kld_mean"] < measured[PLAN]["kld_mean"]
    assert measured[shipped]["tensor_bytes"] <= measured[PLAN]["tensor_bytes"]
    assert describe(validation).startswith(f"plan replaced by stock preset {shipped}")
    # the shipped file is the preset as llama-quantize writes it, with its lineage
    preset, _, with_matrix = shipped.partition("+")
    direct = tmp_path / "direct.gguf"
    run_tool("llama-quantize", [*(["--imatrix", str(imatrix_of(base) / IMATRIX_FILE)] if with_matrix else []),
                                str(base / BASE_FILE), str(direct), preset], "direct")
    model = tmp_path / "planted" / MODEL_DIR / MODEL_FILE
    assert tensor_digest(model) == tensor_digest(direct)
    values = metadata(model)
    assert values[f"{PREFIX}validation"]["shipped"] == shipped and values[f"{PREFIX}plan"] == {}
    assert record["size_bytes"] == model.stat().st_size
    # digests only: no line of the validation text in any file of the variant
    from transformers import AutoTokenizer

    from quantbuild.plan_validation import TEXTS, validation_texts

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    drawn = validation_texts(2048, lambda value: len(tokenizer(value, verbose=False)["input_ids"]))
    assert list(validation["text"]["texts"]) == list(TEXTS) == list(measured[PLAN]["texts"])
    lines = []
    for kind, (texts, _) in drawn.items():
        text = "\n\n".join(texts)
        assert validation["text"]["texts"][kind]["sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
        lines += [line for line in text.splitlines() if len(line) > 40][:30]
    for path in (tmp_path / "planted").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(line.encode("utf-8") in content for line in lines), path


def test_a_plan_checked_whole_keeps_only_stretches_that_lower_its_held_out_kl_and_replays(inputs, base, tmp_path):
    """Issue #28 item 2: the planner measures whole plans while it plans. Each auto-mix of the
    ladder promotes in stretches of its budget; the whole plan after each stretch (every layer
    at its candidate's real quantized weight) is scored on probes held out from the table's,
    and only a stretch that lowers that KL is kept. The table records each verdict, the
    quantize stage replays them to the same plan, and the plans still nest."""
    ladder = {f"mix_{target}": GgufConfig(type="Q4_K_S", target_bpw=target, mix_types=MIX_TYPES,
                                          validation_tokens=0) for target in (3.5, 4.0)}
    config = replace(CALIBRATION.sensitivity, check_stretches=3)
    write_sensitivity(BASELINE, inputs.calibration, ladder, config, base, tmp_path / "sensitivity",
                      imatrix=imatrix_of(base))
    small, large = (load_sensitivity(tmp_path / "sensitivity", name) for name in ("mix_3.5", "mix_4.0"))
    for table in (small, large):
        check = table["check"]
        assert check["stretches"] == 3 and check["steps"], check
        # held out from the table's own probes, family by family
        held_out = {name: entry["digest"] for name, entry in check["probes"]["sets"].items()}
        assert set(held_out) == {"calibration", *FAMILIES}
        assert not set(held_out.values()) & {entry["digest"] for entry in table["probes"].values()}
        mean = sum(check["start"]["kld"].values()) / len(check["start"]["kld"])
        for step in check["steps"]:
            now = sum(step["kld"].values()) / len(step["kld"])
            assert step["kept"] == (now < mean), check
            mean = now if step["kept"] else mean
    # the larger plan starts from the smaller one as checked
    assert large["start"] == large["chain"][0]["types"]
    records = {name: build_variant(name, ladder[name], replace(inputs, sensitivity=table), tmp_path / name)
               for name, table in (("mix_3.5", small), ("mix_4.0", large))}
    types = {name: {layer: entry["type"] for layer, entry in record["layers"].items()}
             for name, record in records.items()}
    assert types["mix_3.5"] == large["chain"][0]["types"]
    for name, record in records.items():
        table = small if name == "mix_3.5" else large
        assert record["plan_check"] == {"stretches": 3, "judged": len(table["check"]["steps"]),
                                        "kept": sum(step["kept"] for step in table["check"]["steps"])}
        assert record["planned_bits_per_weight"] <= ladder[name].target_bpw + 1e-9
    assert all(TENSOR_TYPE_BITS[types["mix_4.0"][layer]] >= TENSOR_TYPE_BITS[kind]
               for layer, kind in types["mix_3.5"].items())


def test_the_validation_measures_in_a_child_process_what_it_measures_in_this_one(built, base):
    """The validation's llama.cpp work runs in a child that loads llama.cpp first (a CUDA
    build loaded after torch's or sentencepiece's libraries crashed): its divergences are the
    ones this process measures, an error there is the same one line here, and a child that
    dies is one line naming the signal."""
    from quantbuild.errors import IntegrityError
    from quantbuild.plan_validation import MODULE, kl_divergence, reference
    from quantbuild.runtimes.llama_worker import LlamaWorker

    tokens = LlamaCppModel(base / BASE_FILE, n_ctx=64, threads=1).tokenize("Rows: 12. Columns: 4. Cells?")
    drawn = {"prose": (["The quick brown fox jumps over the lazy dog. " * 20, "A second, shorter text."], 0),
             "own": ([[tokens, 3]], 0)}
    variant = built["q4_k_m_imat"] / MODEL_DIR / MODEL_FILE
    here = kl_divergence(variant, reference(base / BASE_FILE, drawn, 2, False), drawn, 2, False)
    assert 0 < here["prose"]["kld_mean"] and 0 < here["own"]["top1_agreement"] <= 1
    with LlamaWorker(MODULE, {"threads": 2, "repack": False, "device": "cpu"}) as worker:
        worker.ask("reference", name="held", path=str(base / BASE_FILE), drawn=drawn)
        assert worker.ask("divergence", name="held", path=str(variant), drawn=drawn) == here
        broken = base.parent / "broken.gguf"
        broken.write_bytes(b"GGUF" + bytes(60))
        with pytest.raises(IntegrityError, match="broken.gguf"):
            worker.ask("divergence", name="held", path=str(broken), drawn=drawn)
        # the child carries on after an error
        assert worker.ask("divergence", name="held", path=str(variant), drawn=drawn) == here
        worker.process.kill()
        with pytest.raises(QuantbuildError, match=r"its process ended \(killed by signal 9\)"):
            worker.ask("divergence", name="held", path=str(variant), drawn=drawn)
