"""The latency check's measurement: interleaved rounds re-measured while undecided, and the
thread count that follows the cores actually free.

The stopping rule is a pure function of the timings, so it is tested with made-up ones;
the same loop on the real llama.cpp runtime (the bundled model's F16 GGUF) is tested
below it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest

from conftest import BASELINE, REPO
from quantbuild.config import EvalConfig, LatencyConfig, MemoryConfig
from quantbuild.evaluation.latency import confidence_per_look, decided, deciding_ratio, paired_latency, timed_rounds, verdict
from quantbuild.runtimes.llama_build import busy_cores, free_cores, free_threads
from quantbuild.runtimes.protocol import LLAMA_CPP, LoadSpec, Timing, open_runtime

BOUND = 1.05


def rounds_of(ratios: list[float]):
    """`time_round` for timed_rounds: round i times the variant at ratios[i] of a 10 ms
    baseline (TTFT and decode alike), and counts the rounds asked for."""
    asked = []

    def time_round(index: int) -> tuple[Timing, Timing]:
        asked.append(index)
        ratio = ratios[index]
        return Timing(0.01 * ratio, 0.001 * ratio), Timing(0.01, 0.001)

    return time_round, asked


def test_verdict_is_pass_fail_or_undecided_against_the_bound():
    assert verdict(0.8, 1.05, BOUND) == "pass"          # the upper end at the bound passes
    assert verdict(1.06, 1.4, BOUND) == "fail"          # wholly above
    assert verdict(1.05, 1.4, BOUND) == "undecided"     # the lower end at the bound is not above it
    assert verdict(0.76, 2.78, BOUND) == "undecided"    # issue #26: released before, on noise
    assert verdict(1.19, 2.99, BOUND) == "fail"
    # together: one ratio wholly above decides; otherwise all must be at or below
    assert decided([{"ci_low": 0.9, "ci_high": 1.2}, {"ci_low": 1.1, "ci_high": 1.3}], BOUND)
    assert not decided([{"ci_low": 0.9, "ci_high": 1.2}, {"ci_low": 0.8, "ci_high": 0.9}], BOUND)
    assert decided([{"ci_low": 0.9, "ci_high": 1.0}, {"ci_low": 0.8, "ci_high": 0.9}], BOUND)


def test_a_clear_ratio_stops_after_the_first_rounds():
    for ratio in (0.6, 1.8):
        time_round, asked = rounds_of([ratio] * 100)
        rounds, intervals = timed_rounds(time_round, BOUND, repeats=15, max_rounds=60)
        assert len(rounds) == len(asked) == 15
        assert intervals["decode"]["ratio"] == pytest.approx(ratio)


def test_an_undecided_ratio_is_re_measured_until_it_decides():
    # the first 15 rounds swing around the bound; later ones are steady at 0.9
    time_round, asked = rounds_of([0.7, 1.5] * 7 + [1.5] + [0.9] * 100)
    rounds, intervals = timed_rounds(time_round, BOUND, repeats=15, max_rounds=60)
    assert len(rounds) == 45 and asked == list(range(45))
    assert intervals["decode"]["ci_high"] <= BOUND and intervals["ttft"]["ci_high"] <= BOUND


def test_a_ratio_too_noisy_to_decide_stops_at_max_rounds():
    time_round, _ = rounds_of([0.7, 1.5] * 50)
    rounds, intervals = timed_rounds(time_round, BOUND, repeats=15, max_rounds=50)
    assert len(rounds) == 50
    assert verdict(intervals["decode"]["ci_low"], intervals["decode"]["ci_high"], BOUND) == "undecided"


def test_without_a_bound_exactly_repeats_rounds_at_95_percent():
    time_round, _ = rounds_of([0.7, 1.5] * 50)
    rounds, _ = timed_rounds(time_round, None, repeats=15, max_rounds=60)
    assert len(rounds) == 15
    assert confidence_per_look(None, 15, 60) == pytest.approx(0.95)
    # four looks (15, 30, 45, 60 rounds) share the 5%
    assert confidence_per_look(BOUND, 15, 60) == pytest.approx(1 - 0.05 / 4)
    assert confidence_per_look(BOUND, 15, 15) == pytest.approx(0.95)


def test_the_deciding_ratio_is_the_one_that_decides():
    by_length = {"64": {"runs": 15, "ttft": {"ratio": 0.9, "ci_low": 0.8, "ci_high": 1.2},
                        "decode": {"ratio": 0.9, "ci_low": 0.85, "ci_high": 0.95}},
                 "256": {"runs": 45, "ttft": {"ratio": 1.2, "ci_low": 1.1, "ci_high": 1.3},
                         "decode": {"ratio": 1.0, "ci_low": 0.7, "ci_high": 1.6}}}
    assert deciding_ratio(by_length, BOUND)["at"] == "ttft@256"  # wholly above: a fail, whatever reaches higher
    assert deciding_ratio(by_length, 1.5)["at"] == "decode@256"  # none above: the one reaching highest
    assert deciding_ratio(by_length, 1.5)["runs"] == 45


@pytest.mark.parametrize(
    ("cpus", "load", "usable", "threads"),
    [
        (2, 0.0, 2, 2),      # an idle machine: every core
        (2, 0.3, 2, 2),      # to the nearest core
        (2, 0.6, 2, 1),
        (2, 1.7, 2, 1),
        (2, 6.0, 2, 1),      # at least one
        (16, 3.2, 16, 13),
        (16, 3.2, 4, 4),     # at most the cores this process may run on
        (16, 0.0, 1, 1),
    ],
)
def test_threads_follow_the_cores_actually_free(cpus, load, usable, threads):
    assert free_threads(cpus, load, usable) == threads


def test_free_cores_reads_this_machine():
    seen = free_cores()
    assert seen["cpus"] == os.cpu_count() and seen["usable"] == len(os.sched_getaffinity(0))
    assert 1 <= seen["threads"] <= seen["usable"] and seen["load_1min"] >= 0
    assert 0 <= seen["busy"] <= seen["cpus"] + 1e-6


def test_busy_cores_sees_a_core_kept_busy():
    import subprocess
    import sys

    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.8
    finally:
        spinning.kill()


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from quantbuild.runtimes.gguf_file import convert

    path = tmp_path_factory.mktemp("latency") / "base.gguf"
    convert(BASELINE, path, "f16")
    return path


def test_paired_latency_on_llama_cpp_measures_more_rounds_only_while_undecided(gguf):
    config = EvalConfig(latency=LatencyConfig(prompt_lengths=[16, 32], new_tokens=4, warmup=1, repeats=3,
                                              max_rounds=9))
    spec = LoadSpec(LLAMA_CPP, gguf, threads=1)
    with open_runtime(spec) as model, open_runtime(spec) as reference:
        fixed = paired_latency(model, reference, config)
        # a bound no ratio can reach, and one every ratio lies above: decided in the first rounds
        clear = paired_latency(model, reference, config, bound=1e6)
        slow = paired_latency(model, reference, config, bound=1e-6)
        # the same file against itself, judged against ratios at 1: re-measured, at most to 9 rounds
        close = paired_latency(model, reference, config, bound=1.0)
    assert fixed["bound"] is None and fixed["confidence"] == 0.95
    assert {entry["runs"] for entry in fixed["by_length"].values()} == {3} and "decided" not in fixed["by_length"]["16"]
    for record in (clear, slow):
        assert all(entry["runs"] == 3 and entry["decided"] for entry in record["by_length"].values())
        assert record["max_rounds"] == 9 and record["confidence"] == pytest.approx(1 - 0.05 / 3, abs=1e-6)
    assert verdict(slow["worst"]["ci_low"], slow["worst"]["ci_high"], 1e-6) == "fail"
    for entry in close["by_length"].values():
        assert entry["runs"] in (3, 6, 9)
        assert entry["decided"] == decided([entry["ttft"], entry["decode"]], 1.0)
        assert entry["decided"] or entry["runs"] == 9
    worst = close["worst"]
    assert worst["ci_low"] <= worst["ratio"] <= worst["ci_high"] and worst["runs"] in (3, 6, 9)


def test_an_evaluation_on_llama_cpp_runs_on_the_free_cores_and_records_them(gguf, tmp_path):
    from quantbuild.evaluation import runner

    config = EvalConfig(families=["reasoning"], limit=2, threads=0,
                        latency=LatencyConfig(prompt_lengths=[16], new_tokens=4, warmup=0, repeats=3, max_rounds=6),
                        memory=MemoryConfig(context_lengths=[256]))
    spec = runner.gguf_spec(gguf, "f16", config, False)
    metrics = runner.evaluate(spec, config, REPO / "data" / "eval", tmp_path / "out", None, baseline=spec,
                              latency_bound=1e6)
    cores, paired = metrics["cores"], metrics["latency_vs_baseline"]
    assert 1 <= cores["threads"] <= cores["usable"] and cores["load_1min"] >= 0
    # every suite, the timed rounds included, on the free cores' thread count
    assert metrics["llama_cpp"]["threads"] == paired["threads"] == cores["threads"]
    assert paired["load_1min"] == cores["load_1min"] and paired["bound"] == 1e6
    assert paired["by_length"]["16"]["runs"] == 3 and paired["by_length"]["16"]["decided"]
    # a fixed eval.threads is kept
    fixed = replace(config, threads=1)
    metrics = runner.evaluate(runner.gguf_spec(gguf, "f16", fixed, False), fixed, REPO / "data" / "eval",
                              tmp_path / "fixed", None)
    assert metrics["llama_cpp"]["threads"] == 1 and "latency_vs_baseline" not in metrics


def test_llama_cpp_quality_is_the_same_at_one_and_two_threads(gguf):
    """Why every suite may follow the free cores: the numbers do not depend on the thread
    count (llama.cpp splits each product by rows, one thread per output), so a loaded
    machine measures the same quality, only slower."""
    texts = [item.prompt for item in _items("language_modelling")[:4]]
    prompts = [item.prompt for item in _items("reasoning")[:4] + _items("structured")[:4]]
    outputs = []
    for threads in (1, 2):
        with open_runtime(LoadSpec(LLAMA_CPP, gguf, threads=threads, n_ctx=1024, batch_size=4)) as runtime:
            logprobs = [runtime.logprobs(runtime.tokenize(text)[:512]) for text in texts]
            outputs.append((logprobs, runtime.complete(prompts, 24)))
    (one, one_text), (two, two_text) = outputs
    assert all(bool((a == b).all()) for a, b in zip(one, two)) and one_text == two_text


def _items(family: str):
    from quantbuild.tasks.items import load_items

    return load_items(REPO / "data" / "eval" / f"{family}.jsonl")
