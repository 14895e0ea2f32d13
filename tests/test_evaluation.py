"""Scorers, intervals, compact reference distributions and the release gate."""

from dataclasses import replace

import pytest

from conftest import BASELINE, REPO
from quantbuild.config import GateConfig
from quantbuild.errors import GateError
from quantbuild.evaluation.scorers import score
from quantbuild.evaluation.stats import median_interval, paired_drop_interval, percentile, wilson_interval
from quantbuild.gate import require_release, select, violations
from quantbuild.tasks.items import Item, load_items


def test_json_tool_call_scorer_separates_parse_schema_and_fields():
    item = load_items(REPO / "data" / "eval" / "structured.jsonl")[0]
    import json

    right = json.dumps(item.expected)
    assert score(item, right) == {"correct": 1.0, "wrapper": 1.0, "parsed": 1.0, "valid": 1.0}
    assert score(item, right[:-2])["parsed"] == 0.0
    wrong_tool = dict(item.expected, name="not_a_tool")
    assert score(item, json.dumps(wrong_tool)) == {"correct": 0.0, "wrapper": 1.0, "parsed": 1.0, "valid": 0.0}


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
    from quantbuild.runtimes.torch_stack import TorchRuntime

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    model = AutoModelForCausalLM.from_pretrained(str(BASELINE), dtype=torch.float32).eval()
    texts = [item.prompt for item in load_items(REPO / "data" / "eval" / "language_modelling.jsonl")[:4]]
    tensors, metrics = distributions.reference_from(TorchRuntime(model, tokenizer, batch_size=4).text_positions(texts),
                                                    top_k=8)
    same = distributions.compare_from(TorchRuntime(model, tokenizer, batch_size=2).text_positions(texts), tensors)
    assert same["kld_mean"] < 1e-6 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    worse = distributions.compare_from(TorchRuntime(model, tokenizer, batch_size=4).text_positions(texts), tensors)
    assert worse["kld_mean"] > 1e-3 and worse["kld_p99"] >= worse["kld_mean"]


N_ITEMS = 300


def outcomes(correct: int, lost: tuple[int, ...] = ()) -> dict:
    """Per-item outcomes of one family: the first `correct` of N_ITEMS right, minus `lost`."""
    return {f"s{i:03d}": float(i < correct and i not in lost) for i in range(N_ITEMS)}


def metrics(ppl, kld, structured=None, ttft=10.0, peak=100.0, ratio=(0.9, 0.85, 0.95), runtime="llama.cpp"):
    """A variant's measured metrics as the evaluate stage writes them, with outcomes added."""
    structured = structured if structured is not None else outcomes(285)
    score = sum(structured.values()) / len(structured)
    return {"perplexity": ppl, "kld_mean": kld, "kld_p99": kld * 5, "top1_agreement": 1 - kld,
            "deploy_runtime": runtime,
            "families": {"structured": {"score": score}}, "outcomes": {"structured": structured},
            "latency": {"128": {"ttft_ms_p50": ttft, "ttft_ms_p99": ttft, "decode_ms_per_token_p50": 2.0,
                                "decode_ms_per_token_p99": 2.0}},
            "latency_vs_baseline": paired(ratio),
            "memory": {"by_context": {"1024": {"peak_mb": peak}}}}


def paired(decode: tuple[float, float, float], ttft: tuple[float, float, float] = (0.9, 0.85, 0.95),
           runs: int = 15) -> dict:
    """An interleaved latency record at one prompt length: (ratio, ci_low, ci_high) each."""
    ratios = {label: {"ratio": r, "ci_low": low, "ci_high": high} for label, (r, low, high) in
              (("ttft", ttft), ("decode", decode))}
    return {"by_length": {"128": {"runs": runs, **ratios}}, "worst": {**ratios["decode"], "at": "decode@128"}}


BASE = metrics(2.0, 0.0, peak=120.0, ratio=(1.0, 1.0, 1.0))
GATE = GateConfig(max_perplexity_increase_pct=5, max_kld_mean=0.05, max_kld_p99=0.5, min_top1_agreement=0.9,
                  max_family_drop={"structured": 0.02}, max_memory_ratio=0.95, memory_context=1024)
RECORDS = {"int8": {"method": "gguf", "size_bytes": 900, "bits_per_weight": 8.2},
           "int4": {"method": "gguf", "size_bytes": 600, "bits_per_weight": 4.4},
           "int3": {"method": "gguf", "size_bytes": 500, "bits_per_weight": 3.4},
           "f16": {"method": "gguf", "size_bytes": 1600, "bits_per_weight": 16.0}}


def checks_of(decision: dict, name: str) -> dict:
    return {check["budget"]: check for check in decision["variants"][name]["checks"]}


def test_gate_picks_the_most_compressed_variant_that_passes():
    variants = {"int8": metrics(2.0, 0.001), "int4": metrics(2.05, 0.01), "int3": metrics(2.4, 0.2, outcomes(200))}
    decision = select(BASE, variants, RECORDS, GATE)
    assert decision["chosen"] == "int4"
    assert decision["order_most_compressed_first"] == ["int3", "int4", "int8"]
    failed = {c["budget"] for c in decision["variants"]["int3"]["checks"] if not c["pass"]}
    assert failed == {"perplexity_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "structured_drop"}
    assert decision["variants"]["int3"]["reason"].startswith("quality: perplexity_increase_pct = 20")
    assert decision["variants"]["int8"]["reason"] == "passes, but int4 is smaller"
    assert decision["variants"]["int4"]["reason"].startswith("released")
    assert decision["variants"]["int4"]["target"] == "llama.cpp"


def test_a_variant_that_drops_on_a_golden_family_is_refused_naming_it():
    """The user's golden family (eval.golden's `support`) under must_not_degrade: int4 loses 20
    of the 280 the baseline answers (the paired interval lies above zero) and is refused with the family in
    its reason; int8 answers them all and is released."""
    def with_support(measured: dict, lost: tuple[int, ...] = ()) -> dict:
        return {**measured, "outcomes": {**measured["outcomes"], "support": outcomes(280, lost)}}

    gate = replace(GATE, must_not_degrade=["support"])
    base = with_support(BASE)
    variants = {"int8": with_support(metrics(2.0, 0.001)), "int4": with_support(metrics(2.05, 0.01), tuple(range(20)))}
    decision = select(base, variants, RECORDS, gate)
    assert decision["chosen"] == "int8"
    assert decision["variants"]["int4"]["reason"].startswith("quality: support_drop = 0.06667 [0.03873, 0.09947] violates <= 0")
    assert checks_of(decision, "int4")["support_drop"]["rule"] == "must_not_degrade"


def test_the_decision_and_the_summary_name_the_preset_a_planned_mix_was_swapped_for():
    """A planned mix whose quantize record says validation shipped a stock preset (the
    record's shape: quantbuild.plan_validation) carries it into the decision, worded once
    for decision.json, the summary and the report."""
    from quantbuild.plan_validation import choose
    from quantbuild.report import validation_lines

    def entry(eval_kld: float, prose_kld: float, size: int) -> dict:
        return {"tensor_bytes": size, "bits_per_weight": size * 8 / 1000,
                "texts": {"eval": {"kld_mean": eval_kld}, "prose": {"kld_mean": prose_kld}}}

    # the plan wins on eval text and loses on prose to the preset, which is best on both
    measured = {"plan": entry(0.006, 0.018, 490), "Q3_K_S+imatrix": entry(0.008, 0.010, 480),
                "Q2_K": entry(0.02, 0.04, 400)}
    shipped, best = choose(measured)
    assert (shipped, best) == ("Q3_K_S+imatrix", "Q3_K_S+imatrix")
    assert measured["plan"]["worst_ratio"] == 1.8 and measured["Q3_K_S+imatrix"]["worst_ratio"] == 1.0
    validation = {"text": {"sha256": "a" * 64, "tokens": 16400, "seed": 5001, "texts": {}},
                  "measured": measured, "larger_than_plan": ["Q3_K_M"], "best_alternative": best, "shipped": shipped}
    records = {**RECORDS, "int3": {**RECORDS["int3"], "validation": validation}}
    variants = {"int3": metrics(2.0, 0.001), "int8": metrics(2.0, 0.001)}
    decision = select(BASE, variants, records, GATE)
    carried = decision["variants"]["int3"]["validation"]
    assert carried["shipped"] == "Q3_K_S+imatrix" and carried["kld_mean"]["plan"] == 0.012
    assert carried["line"] == ("plan replaced by stock preset Q3_K_S+imatrix: its KLD 0.00900 at 3.840 bits/weight "
                               "(at most 1.00x the best stock preset on each text) against the plan's 0.01200 at "
                               "3.920 (1.80x); 16400 held-out tokens (eval, prose)")
    assert "validation" not in decision["variants"]["int8"]
    assert validation_lines({"llama.cpp-cpu": decision, "llama.cpp-cuda": decision}) == [
        f"validation int3: {carried['line']}"]


def test_a_plan_ships_only_where_it_is_never_worse_than_the_best_preset_on_any_text():
    """issue #28: the validation's rule over its three texts (quantbuild.plan_validation)."""
    from quantbuild.plan_validation import choose

    def entry(kinds: tuple, size: int) -> dict:
        return {"tensor_bytes": size, "texts": {kind: {"kld_mean": value}
                                                for kind, value in zip(("eval", "calibration", "prose"), kinds)}}

    # best on every text: kept, and the best alternative is the lowest mean of the rest
    kept = {"plan": entry((1, 1, 1), 500), "Q3_K_S": entry((2, 1.5, 1.2), 480), "Q2_K": entry((3, 3, 3), 400)}
    assert choose(kept) == ("plan", "Q3_K_S") and kept["plan"]["worst_ratio"] == pytest.approx(1 / 1.2, abs=1e-4)
    # a tie with a preset on every text: the plan wins it
    tie = {"plan": entry((1, 1, 1), 500), "Q3_K_S": entry((1, 1, 1), 480)}
    assert choose(tie)[0] == "plan"
    # no file is best everywhere: the lowest worst ratio ships (here a smaller plan of the chain)
    split = {"plan": entry((1, 2, 3), 500), "Q3_K_S": entry((2, 1, 2), 480), "Q3_K_M": entry((3, 3, 1), 490),
             "plan gguf_mix_3": entry((1.5, 1.2, 1.4), 450)}
    assert choose(split) == ("plan gguf_mix_3", "plan gguf_mix_3")
    assert split["plan"]["worst_ratio"] == 3 and split["plan gguf_mix_3"]["worst_ratio"] == 1.4
    # no stock preset as small: measured against the best candidate on each text
    alone = {"plan": entry((1, 1, 1), 500), "plan gguf_mix_3": entry((2, 2, 2), 450)}
    assert choose(alone) == ("plan", "plan gguf_mix_3") and alone["plan gguf_mix_3"]["worst_ratio"] == 2


def test_a_split_preset_is_repaired_by_dropping_the_roles_whose_matrix_hurts():
    """issue #28: where Q3_K_S with and without the importance matrix split the texts, the
    validation searches the roles to give the matrix (`drop_roles`, backward elimination);
    the repaired file is no preset (it never sets the floor) and is named for what it is."""
    from quantbuild.plan_validation import BY_ROLE, _is_preset, choose, describe, drop_roles

    # the matrix helps attn_k and ffn_down, hurts ffn_gate badly and ffn_up a little
    effect = {"attn_k": -0.2, "ffn_down": -0.1, "ffn_gate": 0.3, "ffn_up": 0.05}
    seen = []

    def worst_of(kept: frozenset) -> float:
        seen.append(kept)
        return round(1.2 + sum(effect[role] for role in kept), 4)
    kept, worst, scored = drop_roles(list(effect), worst_of)
    assert kept == {"attn_k", "ffn_down"} and worst == pytest.approx(0.9) and scored == len(seen) == 1 + 4 + 3 + 2
    assert drop_roles(["attn_k"], lambda kept: 1.0) == (frozenset({"attn_k"}), 1.0, 2)  # no drop helps: all kept

    def entry(kinds: tuple, size: int) -> dict:
        return {"tensor_bytes": size, "bits_per_weight": size * 8 / 1000,
                "texts": {kind: {"kld_mean": value} for kind, value in zip(("eval", "calibration", "prose"), kinds)}}
    name = f"Q3_K_S{BY_ROLE}"
    assert _is_preset("Q3_K_S+imatrix") and not _is_preset(name) and not _is_preset("plan gguf_mix_3")
    measured = {"plan": entry((1.3, 1.3, 1.3), 500), "Q3_K_S": entry((1.0, 1.4, 1.2), 480),
                "Q3_K_S+imatrix": entry((1.1, 1.0, 1.0), 480), name: entry((0.98, 1.0, 1.0), 480)}
    assert choose(measured) == (name, name) and measured[name]["worst_ratio"] == 1.0
    validation = {"text": {"tokens": 16400}, "measured": measured, "best_alternative": name, "shipped": name,
                  "imatrix_by_role": {"preset": "Q3_K_S", "roles": ["attn_k", "ffn_down"], "worst_ratio": 1.0,
                                      "scored": 10}}
    assert describe(validation).startswith("plan replaced by stock preset Q3_K_S with the importance matrix on "
                                           "attn_k, ffn_down only: its KLD 0.99333")


def test_gate_with_no_passing_variant_and_no_fallback_lists_violations():
    gate = replace(GATE, fallback="none")
    variants = {"int8": metrics(2.2, 0.001), "int4": metrics(2.3, 0.01), "int3": metrics(2.4, 0.2)}
    decision = select(BASE, variants, RECORDS, gate)
    assert decision["chosen"] is None
    assert violations(decision) == ["int8: perplexity_increase_pct = 10 violates <= 5"]
    with pytest.raises(GateError, match="no variant passes"):
        require_release(decision)


def test_a_slower_variant_is_rejected_and_a_smaller_not_slower_one_released():
    # int3: smaller, but its interleaved decode ratio's interval lies above 1.0 + margin.
    variants = {"int3": metrics(2.0, 0.001, peak=60.0, ratio=(1.4, 1.3, 1.5)),
                "int4": metrics(2.0, 0.001, peak=80.0, ratio=(1.01, 0.97, 1.04))}
    decision = select(BASE, variants, RECORDS, GATE)
    assert decision["chosen"] == "int4"
    slow = checks_of(decision, "int3")["latency_ratio"]
    assert not slow["pass"] and slow["interval"] == [1.3, 1.5] and slow["limit"] == 1.05
    assert slow["verdict"] == "fail" and checks_of(decision, "int4")["latency_ratio"]["verdict"] == "pass"
    assert decision["variants"]["int3"]["reason"].startswith("no operational win: latency_ratio = 1.4")
    assert decision["variants"]["int3"]["wins"] == {"memory_ratio": True, "latency_ratio": False}
    assert decision["variants"]["int4"]["wins"] == {"memory_ratio": True, "latency_ratio": True}


def test_a_variant_is_released_on_a_latency_verdict_never_on_its_absence():
    """Issue #26: 1.68 [0.76, 2.78] was released because noise could not prove it slower.
    Against 1.0 + 0.05: pass when the interval lies at or below, fail when wholly above,
    otherwise undecided, which does not pass."""
    variants = {"int3": metrics(2.0, 0.001, peak=60.0, ratio=(1.68, 0.76, 2.78)),
                "int4": metrics(2.0, 0.001, peak=70.0, ratio=(1.44, 1.19, 2.99)),
                "int8": metrics(2.0, 0.001, peak=80.0, ratio=(0.97, 0.9, 1.05))}
    decision = select(BASE, variants, RECORDS, replace(GATE, fallback="none"))
    verdicts = {name: checks_of(decision, name)["latency_ratio"]["verdict"] for name in variants}
    assert verdicts == {"int3": "undecided", "int4": "fail", "int8": "pass"}
    assert decision["chosen"] == "int8"
    noisy = checks_of(decision, "int3")["latency_ratio"]
    assert not noisy["pass"] and noisy["applies_to"] == "ci_high" and noisy["rounds"] == 15
    assert {"budget", "kind", "measured", "limit", "interval", "applies_to", "pass"} <= set(noisy)
    assert decision["variants"]["int3"]["reason"] == ("undecided: too noisy: latency_ratio = 1.68 [0.76, 2.78] "
                                                      "reaches both sides of 1.05 after 15 rounds")
    assert decision["variants"]["int4"]["reason"].startswith("no operational win: latency_ratio = 1.44 [1.19, 2.99]")


def test_an_undecided_latency_keeps_the_baseline_precision_and_names_itself_in_violations():
    variants = {"int4": metrics(2.0, 0.001, peak=80.0, ratio=(1.0, 0.97, 1.08))}
    decision = select(BASE, variants, RECORDS, replace(GATE, fallback="none"))
    assert decision["chosen"] is None
    assert violations(decision) == ["int4: undecided: too noisy: latency_ratio = 1 [0.97, 1.08] reaches both sides "
                                    "of 1.05 after 15 rounds"]


def test_the_gate_decides_every_interleaved_ratio_against_its_own_limit():
    # decode passes; TTFT at the same length reaches both sides of 1.05
    straddling = metrics(2.0, 0.001, peak=80.0, ratio=(0.9, 0.85, 0.95))
    straddling["latency_vs_baseline"] = paired((0.9, 0.85, 0.95), ttft=(1.0, 0.9, 1.2), runs=60)
    check = checks_of(select(BASE, {"int4": straddling}, RECORDS, GATE), "int4")["latency_ratio"]
    assert (check["verdict"], check["at"], check["rounds"]) == ("undecided", "ttft@128", 60)
    # the same measurements with a looser limit: decided
    loose = checks_of(select(BASE, {"int4": straddling}, RECORDS, replace(GATE, max_latency_paired_ratio=1.2)),
                      "int4")["latency_ratio"]
    assert loose["verdict"] == "pass" and loose["pass"] and loose["limit"] == 1.25


def test_a_variant_that_saves_no_memory_is_not_released():
    variants = {"int4": metrics(2.0, 0.001, peak=118.0)}
    decision = select(BASE, variants, RECORDS, replace(GATE, fallback="none"))
    assert decision["chosen"] is None
    assert decision["variants"]["int4"]["reason"].startswith("no operational win: memory_ratio@1024 = 0.9833")


def test_without_a_win_the_gate_keeps_the_baseline_precision_variant():
    variants = {"int4": metrics(2.0, 0.001, peak=118.0), "f16": metrics(2.0, 0.0, peak=120.0, ratio=(1.0, 0.98, 1.02))}
    decision = select(BASE, variants, RECORDS, GATE)
    assert decision["chosen"] == "f16" and decision["fell_back"]
    assert decision["variants"]["f16"]["reason"].startswith("released at baseline precision")
    # ...but never when a quantized variant wins, even though f16 passes its quality checks.
    decision = select(BASE, {**variants, "int4": metrics(2.0, 0.001, peak=80.0)}, RECORDS, GATE)
    assert decision["chosen"] == "int4" and not decision["fell_back"]
    assert decision["variants"]["f16"]["reason"] == "not needed: a quantized variant passed"


def test_one_changed_item_gets_the_verdict_of_no_change():
    """The interval, not the point estimate, decides: one item of 300 is noise."""
    gate = replace(GATE, max_family_drop={}, must_not_degrade=["structured"])
    same = select(BASE, {"int4": metrics(2.0, 0.001, outcomes(285))}, RECORDS, gate)
    one = select(BASE, {"int4": metrics(2.0, 0.001, outcomes(285, lost=(7,)))}, RECORDS, gate)
    assert same["chosen"] == one["chosen"] == "int4"
    assert checks_of(one, "int4")["structured_drop"]["measured"] == pytest.approx(1 / 300, abs=1e-6)
    # A budget of 2 points decides the same way for 0 and 1 changed answers...
    for decision in (select(BASE, {"int4": metrics(2.0, 0.001, outcomes(285, lost=lost))}, RECORDS, GATE)
                     for lost in ((), (7,))):
        assert decision["chosen"] == "int4"
    # ...and a real drop (15 answers lost, 5 points) fails both rules.
    real = metrics(2.0, 0.001, outcomes(285, lost=tuple(range(15))))
    for rules in (gate, GATE):
        check = checks_of(select(BASE, {"int4": real}, RECORDS, rules), "int4")["structured_drop"]
        assert not check["pass"] and check["interval"][0] > 0


def test_a_variant_not_measured_on_its_target_cannot_be_released():
    variants = {"int4": metrics(2.0, 0.001, peak=80.0, runtime="torch")}
    decision = select(BASE, variants, RECORDS, replace(GATE, fallback="none"))
    assert decision["chosen"] is None
    assert decision["variants"]["int4"]["reason"] == ("not validated on its target: measured on torch, "
                                                      "ships for llama.cpp")


def test_gate_on_items_scored_differently_is_an_error():
    other = metrics(2.0, 0.001, {f"x{i}": 1.0 for i in range(N_ITEMS)})
    with pytest.raises(GateError, match="different items"):
        select(BASE, {"int4": other}, RECORDS, GATE)


def test_absolute_limits_are_checked_when_configured():
    gate = replace(GATE, max_latency_p99_ratio=3.0, max_peak_memory_mb=90.0)
    variants = {"int8": metrics(2.0, 0.001, ttft=50.0, peak=80.0), "int4": metrics(2.0, 0.001, peak=100.0),
                "int3": metrics(2.0, 0.001, ttft=20.0, peak=80.0)}
    decision = select(BASE, variants, RECORDS, gate)
    assert decision["chosen"] == "int3"
    assert checks_of(decision, "int8")["latency_p99_ratio"]["measured"] == 5.0
    assert not checks_of(decision, "int8")["latency_p99_ratio"]["pass"]
    assert not checks_of(decision, "int4")["peak_memory_mb@1024"]["pass"]


def test_paired_drop_interval_and_median_interval():
    same = [True] * 200 + [False] * 100
    drop, low, high = paired_drop_interval(same, same)
    assert drop == 0 and low < 0 < high < 0.01
    lost = [True] * 10 + same[10:]
    assert paired_drop_interval(same[:], [False] * 10 + same[10:])[1] > 0  # 10 of 300 lost: a real drop
    assert paired_drop_interval(lost, lost)[0] == 0
    assert median_interval(list(range(1, 10))) == (5, 2, 8)
    assert median_interval(list(range(1, 22))) == (11, 6, 16)
    assert median_interval([3.0, 1.0]) == (2.0, 1.0, 3.0)


# --- families answered until decided (quantbuild.evaluation.sequential) ---------------------

def stopped(measured: dict, family: str, answered: int, verdict: str, of: int = N_ITEMS, z: float = 3.0) -> dict:
    """`measured` as a variant's evaluation writes it when `family` stopped at a look after
    `answered` items: its outcomes those items' alone, and the `sequential` record."""
    kept = dict(list(measured["outcomes"][family].items())[:answered])
    return {**measured, "outcomes": {**measured["outcomes"], family: kept},
            "sequential": {"looks": [100, 200], "z": z, "stopped": {family: {"items": answered, "of": of,
                                                                            "verdict": verdict}}}}


def test_a_look_decides_a_budget_either_way_and_a_must_not_degrade_family_only_to_fail():
    from quantbuild.evaluation.sequential import BUDGET, FAIL, MUST_NOT_DEGRADE, PASS, early_verdict

    same = [True] * 200
    assert early_verdict(BUDGET, 0.05, same, same, 3.0) == PASS  # [0, 0.043] at z 3 on 200 items
    assert early_verdict(BUDGET, 0.05, same[:100], same[:100], 3.0) is None  # [0, 0.083]: not yet
    assert early_verdict(BUDGET, 0.05, same[:100], same[:100], 1.96) == PASS  # the laxer z would have stopped
    lost = [index >= 30 for index in range(100)]  # 30 of 100 lost: beyond any 5-point budget
    assert early_verdict(BUDGET, 0.05, same[:100], lost, 3.0) == FAIL
    # no drop on any of 200 items is no early pass for a family that must not degrade
    assert early_verdict(MUST_NOT_DEGRADE, 0.0, same, same, 3.0) is None
    assert early_verdict(MUST_NOT_DEGRADE, 0.0, same[:100], lost, 3.0) == FAIL


def test_the_steps_are_a_gated_generated_family_s_looks_then_all_its_items():
    from quantbuild.evaluation.sequential import Sequential, family_rules

    gate = replace(GATE, max_family_drop={"retrieval": 0.05, "support": 0.05}, must_not_degrade=["structured"])
    until = Sequential({}, family_rules(gate), (200, 100, 300, 0), 3.0, frozenset({"retrieval", "structured", "reasoning"}))
    assert until.steps("retrieval", 300) == [100, 200, 300]
    assert until.steps("structured", 150) == [100, 150]
    assert until.steps("reasoning", 300) == [300]  # not gated
    assert until.steps("support", 300) == [300]  # the user's golden family: answered whole


def test_a_family_stopped_at_a_look_is_decided_there_at_its_z_and_summarised_on_its_items():
    from quantbuild.report import family_line

    gate = replace(GATE, max_family_drop={"structured": 0.05})
    variant = stopped(metrics(2.0, 0.001, outcomes(285)), "structured", 200, "pass")
    decision = select(BASE, {"int8": variant}, RECORDS, gate)
    check = checks_of(decision, "int8")["structured_drop"]
    assert check["pass"] and (check["n"], check["of"], check["z"]) == (200, N_ITEMS, 3.0)
    assert check["interval"][1] == pytest.approx(paired_drop_interval([True] * 200, [True] * 200, 3.0)[2], abs=1e-6)
    assert check["scores_on_these_items"] == [1.0, 1.0]  # the first 200 of 285 right on both sides
    assert decision["chosen"] == "int8"
    line = family_line("structured", {"score": 0.95}, {"score": 1.0, "n": 200}, check)
    assert line.startswith("  structured     1.000 -> 1.000  (n=200 of 300, decided at z 3; drop +0.000 [")


def test_a_stopped_family_the_gate_would_not_stop_or_whose_items_do_not_add_up_is_one_line():
    gate = replace(GATE, max_family_drop={"structured": 0.05})
    # stopped on a pass that 100 items do not give at z 3 (the budgets changed since)
    early = stopped(metrics(2.0, 0.001, outcomes(285)), "structured", 100, "pass")
    with pytest.raises(GateError, match="structured: its evaluation stopped at 100 of 300 items on a verdict"):
        select(BASE, {"int8": early}, RECORDS, gate)
    # an item of the 200 it reached is missing from its outcomes
    short = stopped(metrics(2.0, 0.001, outcomes(285)), "structured", 200, "pass")
    short["outcomes"]["structured"].pop("s000")
    with pytest.raises(GateError, match="stopped at 200 of 300 items, but its outcomes hold 199"):
        select(BASE, {"int8": short}, RECORDS, gate)


def test_the_degenerate_check_pairs_the_items_a_variant_answered():
    def clean(count: int) -> dict:
        return {f"s{i:03d}": 1.0 for i in range(count)}

    gate = replace(GATE, max_family_drop={"structured": 0.05}, max_degenerate_increase=0.0)
    base = {**BASE, "outcomes": {**BASE["outcomes"], "degenerate": clean(N_ITEMS)}}
    variant = stopped(metrics(2.0, 0.001, outcomes(285)), "structured", 200, "pass")
    variant["outcomes"]["degenerate"] = clean(200)
    check = checks_of(select(base, {"int8": variant}, RECORDS, gate), "int8")["degenerate_increase"]
    assert check["pass"] and check["n"] == 200
    variant["outcomes"]["degenerate"] = clean(250)  # more items than it answered
    with pytest.raises(GateError, match="degenerate outputs: the baseline and the variant were checked on different"):
        select(base, {"int8": variant}, RECORDS, gate)


def test_log_softmax_in_float32_is_the_float64_pass_to_its_own_rounding():
    """The log-softmax every KL divergence starts from takes its exponentials in float32 (a
    float64 pass throughout was slower, bench/log_softmax.py). Against a float64 pass: within
    float32 rounding everywhere, rows that sum to one, the same argmax, and the same mean KL
    divergence between two nearby distributions to within 2e-4 of itself; logits far from zero
    (an offset of 1e4) lose nothing to the shift."""
    import numpy as np

    from quantbuild.evaluation.distributions import log_softmax

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((64, 32000)) * 4).astype(np.float32)
    logits[:8] += 1e4
    nudged = logits + (rng.standard_normal(logits.shape) * 0.01).astype(np.float32)

    def float64_pass(values):
        shifted = values.astype(np.float64) - values.astype(np.float64).max(-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))

    ours, exact = log_softmax(logits), float64_pass(logits)
    assert ours.dtype == np.float32 and ours.shape == logits.shape
    assert np.abs(ours - exact).max() < 1e-5
    assert np.abs(np.exp(ours.astype(np.float64)).sum(-1) - 1).max() < 1e-5
    assert (ours.argmax(-1) == exact.argmax(-1)).all()
    # the KL divergence as the evaluation computes it, from float32 log-probabilities: the
    # float64 pass's (what quantbuild computed before) and this one's agree
    before = [float64_pass(values).astype(np.float32) for values in (logits, nudged)]
    kl = float((np.exp(ours) * (ours - log_softmax(nudged))).sum(-1).mean())
    kl_before = float((np.exp(before[0]) * (before[0] - before[1])).sum(-1).mean())
    assert kl == pytest.approx(kl_before, rel=2e-4) and kl > 0
