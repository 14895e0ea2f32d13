"""The runtime protocol: every adapter answers the same questions the same way.

The bundled baseline is opened on each runtime it deploys on (its F16 GGUF in llama.cpp,
its checkpoint in transformers) through `open_runtime`, and each protocol method is checked
on both, against the other where they must agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import BASELINE, REPO
from quantbuild.runtimes.llama_cpp import _shared_prefix
from quantbuild.runtimes.protocol import ADAPTERS, LLAMA_CPP, TORCH, LoadSpec, Runtime, open_runtime
from quantbuild.tasks.items import load_items

PROTOCOL = [name for name in vars(Runtime) if not name.startswith("_") or name in ("__enter__", "__exit__")]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, LoadSpec]:
    from quantbuild.runtimes.gguf_file import convert

    gguf = tmp_path_factory.mktemp("runtimes") / "base.gguf"
    convert(BASELINE, gguf, "f16")
    return {LLAMA_CPP: LoadSpec(LLAMA_CPP, gguf, threads=2, n_ctx=256, batch_size=4),
            TORCH: LoadSpec(TORCH, BASELINE, batch_size=4)}


@pytest.fixture(scope="module")
def opened(specs) -> dict[str, Runtime]:
    runtimes = {name: open_runtime(spec) for name, spec in specs.items()}
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


def test_every_registered_adapter_offers_the_whole_protocol(opened):
    assert set(opened) == set(ADAPTERS)
    for name, runtime in opened.items():
        missing = [member for member in PROTOCOL if not hasattr(runtime, member)]
        assert not missing, (name, missing)
        assert runtime.name == name and runtime.describe()["deploy_runtime"] == name


def test_an_unknown_runtime_is_one_line():
    from quantbuild.errors import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable, match="runtime 'tensorrt': unknown"):
        open_runtime(LoadSpec("tensorrt", Path("model")))


def test_both_runtimes_tokenize_alike_and_give_distributions(opened):
    text = load_items(REPO / "data" / "eval" / "reasoning.jsonl")[0].prompt
    llama, torch_runtime = opened[LLAMA_CPP], opened[TORCH]
    assert llama.n_vocab == torch_runtime.n_vocab
    assert llama.tokenize(text) == torch_runtime.tokenize(text) and llama.bos_token() == torch_runtime.bos_token()
    tokens = llama.tokenize(text)
    rows = {name: runtime.logprobs(tokens) for name, runtime in opened.items()}
    for name, logprobs in rows.items():
        # numpy float32 from every runtime: no framework crosses the protocol
        assert isinstance(logprobs, np.ndarray) and logprobs.dtype == np.float32, name
        assert logprobs.shape == (len(tokens) - 1, llama.n_vocab), name
        assert np.abs(np.exp(logprobs).sum(-1) - 1).max() < 1e-3, name
    # F16 weights in llama.cpp against float32 in torch: the same next-token choices
    assert (rows[LLAMA_CPP].argmax(-1) == rows[TORCH].argmax(-1)).mean() > 0.95


def test_text_positions_cover_every_next_token_once(opened):
    texts = [item.prompt for item in load_items(REPO / "data" / "eval" / "language_modelling.jsonl")[:5]]
    for name, runtime in opened.items():
        positions = list(runtime.text_positions(texts))
        assert all(targets.dtype == np.int64 and logprobs.dtype == np.float32 for logprobs, targets in positions)
        targets = sum(int(targets.size) for _, targets in positions)
        assert targets == sum(len(runtime.tokenize(text)) - 1 for text in texts), name


def test_batched_completions_are_each_prompt_s_own_greedy_continuation(opened):
    # prompts of different lengths, in batches of 4 (the last one partial), answers that stop
    # at the end-of-generation token and answers cut at the budget
    items = [item for family in ("reasoning", "structured", "retrieval")
             for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:3]]
    for name, runtime in opened.items():
        completed = runtime.complete([item.prompt for item in items], 24)
        decode = runtime.detokenize if name == LLAMA_CPP else (
            lambda tokens: runtime.tokenizer.decode(tokens, skip_special_tokens=True))
        alone = [runtime.generate(runtime.tokenize(item.prompt), 24) for item in items]
        assert [completion.text for completion in completed] == [decode(tokens) for tokens in alone], name
        assert {len(tokens) < 24 for tokens in alone} == {True, False}, name
        # stopped: ended at the end-of-generation token, before the budget
        assert [completion.stopped for completion in completed] == [len(tokens) < 24 for tokens in alone], name
        # the runtime's own context is back for what follows
        assert runtime.generate(runtime.tokenize(items[0].prompt), 24) == alone[0], name


def test_prompts_sharing_a_prefix_prefill_it_once_and_answer_as_alone(opened):
    # llama.cpp: a prompt that begins as the one before it (in token order) copies that
    # prefix's KV cells from its sequence instead of prefilling it again, the first of a
    # batch from the last of the batch before. Prompts of one structured instruction, a
    # duplicate, a prompt that is all of another's prefix, and two of another family that
    # share nothing with a structured one (nor with each other); in batches of 4 (the last partial)
    runtime = opened[LLAMA_CPP]
    structured = [item.prompt for item in load_items(REPO / "data" / "eval" / "structured.jsonl")[:6]]
    retrieval = [item.prompt for item in load_items(REPO / "data" / "eval" / "retrieval.jsonl")[:2]]
    prompts = [*structured, structured[0], structured[1][:-12], *retrieval]
    tokens = [runtime.tokenize(prompt) for prompt in prompts]
    ordered = sorted(tokens)
    pairs = [_shared_prefix(before, after) for before, after in zip(ordered, ordered[1:])]
    # across the batch boundaries: one prompt takes its prefix from the carried stream, the
    # first of the last batch shares nothing with the one before (its stream is cleared)
    assert pairs[3] > 0 and pairs[7] == 0
    before = dict(runtime.prompt_tokens)
    completed = runtime.complete(prompts, 24)
    prefilled = runtime.prompt_tokens["prefilled"] - before["prefilled"]
    shared = runtime.prompt_tokens["shared"] - before["shared"]
    assert [completion.text for completion in completed] == [runtime.detokenize(runtime.generate(sequence, 24))
                                                            for sequence in tokens]
    # every prompt token either prefilled or copied, each neighbour's shared prefix copied
    assert shared == sum(pairs) > 0 and prefilled + shared == sum(map(len, tokens))
    # one at a time, nothing is shared: each prompt alone is the reference
    runtime.parallel = 1
    try:
        runtime.complete(prompts[:2], 4)
    finally:
        runtime.parallel = 4
    assert runtime.prompt_tokens["shared"] - before["shared"] == shared


def test_timing_memory_and_threads(opened):
    memory = {}
    for name, runtime in opened.items():
        runtime.reserve(64)
        timing = runtime.timed(list(range(3, 19)), 4)
        assert timing.ttft_s > 0 and timing.decode_s_per_token > 0, name
        # llama.cpp allocates the KV cache in blocks of 256 cells: contexts that fill them
        measured = runtime.memory([256, 512], 64.0)
        assert set(measured["by_context"]) == {"256", "512"} and measured["runtime"] == name
        memory[name] = measured["kv_cache_bytes_per_token"]
        tokens = runtime.tokenize("Question: what is 2 + 3?")
        with runtime.at_threads(1) as single:
            assert np.abs(single.logprobs(tokens) - runtime.logprobs(tokens)).max() < 1e-4, name
        assert set(runtime.probe_settings()) <= {"kv_cache_type", "repack", "load_runtime", "device", "gpu_kernels",
                                                  "flash_attention"}
    # one architecture: llama.cpp's KV cache in f16 holds half the bytes of torch's float32
    assert memory[TORCH] == 2 * memory[LLAMA_CPP] > 0


def test_llama_cpp_s_log_goes_to_stderr_only_when_asked(tmp_path):
    # llama.cpp's log is kept in-process (its failures become one line); an abort in C
    # leaves its reason in that log only, so QUANTBUILD_LLAMA_LOG prints it as well
    import os
    import subprocess
    import sys

    from quantbuild.runtimes.llama_bindings import ECHO

    script = ("from quantbuild.runtimes.llama_bindings import bindings\n"
              "lib = bindings()\n"
              f"assert not lib.llama_model_load_from_file({str(tmp_path / 'absent.gguf')!r}.encode(), "
              "lib.llama_model_default_params())\n")
    stderr = {}
    for echo in (False, True):
        env = {key: value for key, value in os.environ.items() if key != ECHO}
        if echo:
            env[ECHO] = "1"
        stderr[echo] = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                      check=True).stderr
    assert "absent.gguf" in stderr[True] and "absent.gguf" not in stderr[False]
