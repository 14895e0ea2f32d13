"""The evaluate stage's library: suites, latency, memory, golden prompts, privacy, and
bad input rejected before any model is loaded."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import BASELINE, REPO
from quantbuild.config import EvalConfig, LatencyConfig, MemoryConfig
from quantbuild.errors import DataError
from quantbuild.evaluation import runner
from quantbuild.runtimes import protocol
from quantbuild.runtimes.torch_stack import TorchRuntime


def small_config(**extra) -> EvalConfig:
    values = dict(families=["language_modelling", "reasoning", "structured"], limit=3, batch_size=4,
                  latency=LatencyConfig(prompt_lengths=[8, 32], new_tokens=3, warmup=1, repeats=3),
                  memory=MemoryConfig(context_lengths=[16, 64], budget_mb=32.0))
    return EvalConfig(**{**values, **extra})


def test_baseline_evaluation_writes_metrics_plots_and_no_text(tmp_path):
    metrics = runner.evaluate(runner.torch_spec(BASELINE, small_config()), small_config(), REPO / "data" / "eval",
                              tmp_path / "out", None)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["behaviour.json", "families.json", "latency.json",
                                                     "measurements.json", "memory.json", "metrics.json",
                                                     "outcomes.json", "probes.safetensors", "quality.json",
                                                     "reference.safetensors"]
    # dvc metrics show: headline numbers, no digests
    headline = json.loads((out / runner.METRICS).read_text())
    assert "eval_files_sha256" not in headline and headline["score"]["reasoning"] == metrics["families"]["reasoning"]["score"]
    assert set(json.loads((out / runner.OUTCOMES).read_text())["reasoning"].values()) <= {0.0, 1.0}
    assert metrics["families"]["reasoning"]["n"] == 3 and 0 <= metrics["families"]["reasoning"]["ci_low"] <= 1
    assert set(metrics["latency"]) == {"8", "32"}
    assert metrics["latency"]["32"]["ttft_ms_p99"] >= metrics["latency"]["32"]["ttft_ms_p50"] > 0
    assert metrics["memory"]["kv_cache_bytes_per_token"] == 2 * 8 * 256 * 4  # float32 K and V, 8 layers
    assert metrics["memory"]["memory_cliff_tokens"] > 0
    text = b"".join(path.read_bytes() for path in out.iterdir())
    assert b"Question:" not in text and b"Request:" not in text


def test_generations_are_stored_only_when_configured(tmp_path):
    config = small_config(store_generations=True, families=["reasoning"])
    runner.evaluate(runner.torch_spec(BASELINE, config), config, REPO / "data" / "eval", tmp_path / "out", None)
    lines = (tmp_path / "out" / runner.GENERATIONS).read_text().splitlines()
    assert len(lines) == 3 and "output" in json.loads(lines[0])


def test_a_variant_that_is_the_baseline_s_own_file_reuses_its_quality_until_anything_changes(tmp_path):
    from quantbuild.runtimes.gguf_file import convert, layout, model_digest, write_with_lineage

    config = small_config(families=["language_modelling", "reasoning"], threads=2)
    base = tmp_path / "base.gguf"
    convert(BASELINE, base, "f16")
    data = tmp_path / "eval"
    shutil.copytree(REPO / "data" / "eval", data)
    spec = runner.gguf_spec(base, "f16", config, repack=False)
    measured = runner.evaluate(spec, config, data, tmp_path / "baseline", None)
    assert measured["model_sha256"] == model_digest(base)

    def variant(name: str, file: Path, config=config) -> dict:
        return runner.evaluate(runner.gguf_spec(file, "f16", config, repack=False), config, data, tmp_path / name,
                               tmp_path / "baseline" / runner.REFERENCE, baseline=spec, reuse=tmp_path / "baseline")

    # the baseline's own tensors with quantbuild's lineage added, as a variant carries them
    copy = tmp_path / "model.gguf"
    write_with_lineage(base, copy, {"variant": "gguf_f16"})
    reused = variant("same", copy)
    quality = json.loads((tmp_path / "baseline" / runner.QUALITY).read_text())
    assert reused["quality_reused_from"]["model_sha256"] == quality["model_sha256"]
    assert (tmp_path / "same" / runner.QUALITY).read_bytes() == (tmp_path / "baseline" / runner.QUALITY).read_bytes()
    assert (tmp_path / "same" / runner.OUTCOMES).read_bytes() == (tmp_path / "baseline" / runner.OUTCOMES).read_bytes()
    # latency, memory and the probes are the variant's own, measured; timed against the baseline
    assert reused["latency_vs_baseline"]["worst"]["ratio"] > 0 and (tmp_path / "same" / "probes.safetensors").is_file()
    # measured afresh when one weight differs, the eval text or the settings change
    changed = bytearray(base.read_bytes())
    changed[layout(base).tensors[-1].offset] ^= 1
    other = tmp_path / "other.gguf"
    other.write_bytes(bytes(changed))
    assert "quality_reused_from" not in variant("other_weights", other)
    lines = (data / "reasoning.jsonl").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "prompt": first["prompt"].replace(" ", "  ", 1)})
    (data / "reasoning.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert "quality_reused_from" not in variant("other_text", copy)
    shutil.copy(REPO / "data" / "eval" / "reasoning.jsonl", data / "reasoning.jsonl")
    assert "quality_reused_from" not in variant("other_settings", copy, small_config(
        families=["language_modelling", "reasoning"], threads=2, kl_top_k=8))
    assert "quality_reused_from" in variant("same_again", copy)


def test_golden_prompts_are_their_own_family(tmp_path):
    golden = tmp_path / "golden.jsonl"
    golden.write_text("".join(line + "\n" for line in (REPO / "data" / "eval" / "reasoning.jsonl").read_text().splitlines()[:2]))
    config = small_config(families=["reasoning"], golden={"support": str(golden), "billing": str(golden)})
    metrics = runner.evaluate(runner.torch_spec(BASELINE, config), config, REPO / "data" / "eval", tmp_path / "out",
                              None)
    # each golden file its own family, named by the user, scored like the others (outcomes per item)
    assert metrics["families"]["support"]["n"] == metrics["families"]["billing"]["n"] == 2
    assert {"support", "billing"} <= set(metrics["eval_files_sha256"])
    outcomes = json.loads((tmp_path / "out" / "outcomes.json").read_text())
    assert len(outcomes["support"]) == 2 and set(outcomes["support"].values()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda path: path.write_text(path.read_text() + "{broken\n"), "invalid JSON"),
        (lambda path: path.write_text(""), "no items"),
        (lambda path: path.unlink(), "eval file not found"),
    ],
)
def test_bad_eval_data_fails_before_any_model_is_loaded(tmp_path, monkeypatch, corrupt, message):
    data = tmp_path / "eval"
    shutil.copytree(REPO / "data" / "eval", data)
    corrupt(data / "reasoning.jsonl")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the eval data was validated")

    monkeypatch.setattr(protocol.importlib, "import_module", no_model)
    with pytest.raises(DataError, match=message):
        runner.evaluate(runner.torch_spec(BASELINE, small_config()), small_config(), data, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()


def test_wrong_family_in_a_family_file(tmp_path):
    data = tmp_path / "eval"
    shutil.copytree(REPO / "data" / "eval", data)
    shutil.copy(data / "structured.jsonl", data / "reasoning.jsonl")
    with pytest.raises(DataError, match="belongs to another family"):
        runner.load_eval_items(small_config(), data)


def test_torch_variants_are_timed_interleaved_with_their_baseline(tmp_path):
    config = small_config(families=["reasoning"])
    spec = runner.torch_spec(BASELINE, config)
    metrics = runner.evaluate(spec, config, REPO / "data" / "eval", tmp_path / "out", None, baseline=spec)
    worst = metrics["latency_vs_baseline"]["worst"]
    assert worst["ci_low"] <= worst["ratio"] <= worst["ci_high"] and set(metrics["latency_vs_baseline"]["by_length"]) == {
        "8", "32"}
    # model memory is the weights and the KV cache the runtime holds, not the process
    memory = metrics["memory"]["by_context"]["64"]
    assert memory["peak_mb"] == pytest.approx(memory["weights_mb"] + memory["kv_cache_mb"], abs=0.01)


def test_a_patched_linear_layer_in_the_torch_runtime_is_numerical_drift(tmp_path):
    """Same versions, same weights on disk, other arithmetic in one layer: caught."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild import behaviour

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    model = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    runtime = TorchRuntime(model, tokenizer)
    info = behaviour.record(runtime, tmp_path / "probes")
    assert info["spread"]["threads"][0] == 1
    same = behaviour.check(runtime, tmp_path / "probes", threads=1)
    assert same["drift"] == [], same
    import torch.nn.functional as F

    def bf16(module):  # a bfloat16 GEMM kernel where the validated runtime ran float32
        return lambda x: F.linear(x.to(torch.bfloat16), module.weight.to(torch.bfloat16)).to(torch.float32)

    patched = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}
    for module in patched.values():
        module.forward = bf16(module)
    try:
        drifted = behaviour.check(runtime, tmp_path / "probes")
    finally:
        for module in patched.values():
            del module.forward
    # KLD stays tiny (~2e-7): the greedy continuations are what move
    assert [measure for measure, _, _ in drifted["drift"]] == ["greedy_match"], drifted
    assert behaviour.check(runtime, tmp_path / "probes")["drift"] == []
