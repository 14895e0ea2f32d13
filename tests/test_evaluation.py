"""Scorers, intervals, compact reference distributions and the release gate."""

import pytest

from conftest import BASELINE, REPO
from quantbuild.config import GateConfig
from quantbuild.errors import GateError
from quantbuild.evaluation.scorers import score
from quantbuild.evaluation.stats import percentile, wilson_interval
from quantbuild.gate import require_release, select, violations
from quantbuild.tasks.items import Item, load_items


def test_json_tool_call_scorer_separates_parse_schema_and_fields():
    item = load_items(REPO / "data" / "eval" / "structured.jsonl")[0]
    import json

    right = json.dumps(item.expected)
    assert score(item, right) == {"correct": 1.0, "parsed": 1.0, "valid": 1.0}
    assert score(item, right[:-2])["parsed"] == 0.0
    wrong_tool = dict(item.expected, name="not_a_tool")
    assert score(item, json.dumps(wrong_tool)) == {"correct": 0.0, "parsed": 1.0, "valid": 0.0}


def test_cited_answer_needs_answer_and_citation():
    item = Item("r", "retrieval", "p", {"answer": "212 metres", "citation": "D12"}, "cited_answer")
    assert score(item, " [D12] 212 metres")["correct"] == 1.0
    assert score(item, "212 metres. [D12]")["correct"] == 1.0
    assert score(item, " [D13] 212 metres") == {"correct": 0.0, "answer": 1.0, "citation": 0.0}
    assert score(item, " [D12] 213 metres") == {"correct": 0.0, "answer": 0.0, "citation": 1.0}
    assert score(item, " [D12][D13] 212 metres")["citation"] == 0.0


def test_intervals():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and high - low < 0.2
    assert wilson_interval(10, 10)[1] == 1.0
    assert percentile([1, 2, 3, 4], 50) == 2.5


def test_reference_distribution_kld_is_zero_against_itself():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild.evaluation import distributions

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    model = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    texts = [item.prompt for item in load_items(REPO / "data" / "eval" / "language_modelling.jsonl")[:4]]
    tensors, metrics = distributions.reference(model, tokenizer, texts, top_k=8, batch_size=4)
    same = distributions.compare(model, tokenizer, texts, tensors, batch_size=2)
    assert same["kld_mean"] < 1e-6 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    worse = distributions.compare(model, tokenizer, texts, tensors, batch_size=4)
    assert worse["kld_mean"] > 1e-3 and worse["kld_p99"] >= worse["kld_mean"]


def metrics(ppl, kld, structured, ttft=10.0, peak=100.0):
    return {"perplexity": ppl, "kld_mean": kld, "kld_p99": kld * 5, "top1_agreement": 1 - kld,
            "families": {"structured": {"score": structured}},
            "latency": {"128": {"ttft_ms_p99": ttft, "decode_ms_per_token_p99": 2.0}},
            "memory": {"by_context": {"1024": {"peak_mb": peak}}}}


GATE = GateConfig(max_perplexity_increase_pct=5, max_kld_mean=0.05, max_kld_p99=0.5, min_top1_agreement=0.9,
                  max_family_drop={"structured": 0.02})
RECORDS = {"int8": {"size_bytes": 900, "bits_per_weight": 8.2}, "int4": {"size_bytes": 600, "bits_per_weight": 4.4},
           "int3": {"size_bytes": 500, "bits_per_weight": 3.4}}


def test_gate_picks_the_most_compressed_variant_that_passes():
    variants = {"int8": metrics(2.0, 0.001, 0.95), "int4": metrics(2.05, 0.01, 0.94), "int3": metrics(2.4, 0.2, 0.7)}
    decision = select(metrics(2.0, 0.0, 0.95), variants, RECORDS, GATE)
    assert decision["chosen"] == "int4"
    assert decision["order_most_compressed_first"] == ["int3", "int4", "int8"]
    failed = {c["budget"] for c in decision["variants"]["int3"]["checks"] if not c["pass"]}
    assert failed == {"perplexity_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "structured_drop"}


def test_gate_with_no_passing_variant_lists_violations():
    variants = {"int8": metrics(2.2, 0.001, 0.95), "int4": metrics(2.3, 0.01, 0.90), "int3": metrics(2.4, 0.2, 0.7)}
    decision = select(metrics(2.0, 0.0, 0.95), variants, RECORDS, GATE)
    assert decision["chosen"] is None
    assert violations(decision) == ["int8: perplexity_increase_pct = 10.0 violates <= 5"]
    with pytest.raises(GateError, match="no variant passes"):
        require_release(decision)


def test_gate_checks_latency_and_memory_budgets():
    gate = GateConfig(max_perplexity_increase_pct=5, max_kld_mean=0.05, max_kld_p99=0.5, min_top1_agreement=0.9,
                      max_latency_p99_ratio=3.0, max_peak_memory_mb=500.0, memory_context=1024)
    variants = {"int8": metrics(2.0, 0.001, 0.95, ttft=50.0), "int4": metrics(2.0, 0.001, 0.95, peak=900.0),
                "int3": metrics(2.0, 0.001, 0.95, ttft=20.0)}
    decision = select(metrics(2.0, 0.0, 0.95), variants, RECORDS, gate)
    assert decision["chosen"] == "int3"
    checks = {v: {c["budget"]: c for c in decision["variants"][v]["checks"]} for v in variants}
    assert checks["int8"]["latency_p99_ratio"]["measured"] == 5.0 and not checks["int8"]["latency_p99_ratio"]["pass"]
    assert not checks["int4"]["peak_memory_mb@1024"]["pass"]


def test_gate_requires_a_measured_operational_win_on_the_runtime():
    gate = GateConfig(max_perplexity_increase_pct=5, max_kld_mean=0.05, max_kld_p99=0.5, min_top1_agreement=0.9,
                      max_latency_paired_ratio=1.1, max_memory_ratio=0.95, memory_context=1024)

    def paired(ratio: float, peak: float) -> dict:
        return {**metrics(2.0, 0.001, 0.95, peak=peak), "latency_vs_baseline": {"worst_ratio_p50": ratio}}

    # int3 is slower interleaved with the baseline, int4 saves no memory: int8 is the one released.
    variants = {"int8": paired(1.02, 60.0), "int4": paired(0.98, 97.0), "int3": paired(1.4, 50.0)}
    decision = select(metrics(2.0, 0.0, 0.95, peak=100.0), variants, RECORDS, gate)
    assert decision["chosen"] == "int8"
    checks = {v: {c["budget"]: c for c in decision["variants"][v]["checks"]} for v in variants}
    assert not checks["int3"]["latency_paired_ratio"]["pass"] and checks["int3"]["memory_ratio@1024"]["pass"]
    assert checks["int4"]["memory_ratio@1024"]["measured"] == 0.97 and not checks["int4"]["memory_ratio@1024"]["pass"]
