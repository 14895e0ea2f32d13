"""Behavioural fingerprint: what the model computes, not what the versions say.

A kernel, driver or dispatch change (llama.cpp picks AVX2, AVX-512, AMX or a repacked
layout at run time; a library rebuilt with other flags) can change the numbers while every
version string stays the same. So every evaluated variant records a fixed set of probes on
the runtime it was validated on, and every bundle carries them:

- the probes: synthetic prompts from the task-family generators with their own seed (no
  eval, calibration or user text), formed as the model is deployed (through an instruct
  model's chat template), stored as token IDs only;
- per probe and position, the top-k log-probabilities, and the greedy continuation;
- tolerances set from the runtime's own spread (the same probes rerun at other thread
  counts), with a floor below which differences are rounding.

`check` reruns the probes on the current runtime and compares: KL divergence against the
stored top-k, top-1 agreement, and exact greedy-token match. Outside tolerance is numerical
drift: revalidate (`dvc repro`) before trusting the artifact on this runtime.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from quantbuild.errors import DataError, IntegrityError
from quantbuild.hashing import read_json, sha256_file, sha256_json, write_json
from quantbuild.prompts import PromptFormat
from quantbuild.runtimes.protocol import Runtime, sequence_positions

PROBES = "probes.safetensors"
BEHAVIOUR = "behaviour.json"
SCHEMA = 1
# Probe prompts: this many per family, from the generators at a seed no data file uses.
PROBE_SEED = 91_000_003
PROBES_PER_FAMILY = 2
PROBE_FAMILIES = ("language_modelling", "structured", "retrieval", "reasoning")
MAX_PROBE_TOKENS = 96
# a conversation through a chat template carries a system prompt and tool definitions first
MAX_CHAT_PROBE_TOKENS = 512
NEW_TOKENS = 16
TOP_K = 8
# Below these the spread is rounding: tolerances are never tighter.
KLD_FLOOR = 1e-5
TOP1_SLACK = 0.01


def probe_items(prompt_format: Optional[PromptFormat] = None) -> list[tuple[str, Any, str]]:
    """(id, generated item, text) of the probes, in order."""
    from quantbuild.tasks import GENERATORS

    probes = []
    for family in PROBE_FAMILIES:
        for index, item in enumerate(GENERATORS[family](PROBES_PER_FAMILY, PROBE_SEED)):
            chat = prompt_format is not None and prompt_format.chat and item.messages is not None
            probes.append((f"probe-{family}-{index}", item, prompt_format.render(item) if chat else item.prompt))
    return probes


def _answered(runtime: Runtime, item: Any, tokens: list[int]) -> Optional[bool]:
    """Whether a probe's greedy continuation is a right answer to its generated item (None
    for language modelling, or a runtime that cannot detokenize)."""
    from quantbuild.evaluation.scorers import score

    detokenize = getattr(runtime, "detokenize", None)
    if item.family == "language_modelling" or detokenize is None:
        return None
    return bool(score(item, detokenize(tokens)).get("correct", 0.0) >= 1)


def card_example(info: dict) -> Optional[tuple[str, str]]:
    """(prompt, expected answer) of a raw-prompt probe this runtime answered right when its
    probes were recorded: synthetic text (the probes' own seed, never eval text) that a card
    can show with its answer checked. None when none was answered right."""
    answered = {probe["id"] for probe in info.get("probes", []) if probe.get("correct")}
    for probe_id, item, text in probe_items(None):
        if probe_id in answered and item.family == "reasoning" and isinstance(item.expected, str):
            return text, item.expected
    return None


def probe_prompts(prompt_format: Optional[PromptFormat] = None) -> list[tuple[str, str, str]]:
    """(id, family, text) of the probe prompts: synthetic, seeded, the same on every machine;
    through the chat template of `prompt_format` where it has one (prose stays prose)."""
    return [(probe_id, item.family, text) for probe_id, item, text in probe_items(prompt_format)]


def _run(model: Runtime, sequences: list[list[int]]) -> tuple[dict, list[list[int]]]:
    """(top-k tensors over every position of every probe, greedy continuations)."""
    from quantbuild.evaluation.distributions import reference_from

    tensors, _ = reference_from(sequence_positions(model, sequences), TOP_K)
    return tensors, [model.generate(tokens, NEW_TOKENS) for tokens in sequences]


def _compare(tensors: dict, greedy: list[list[int]], model: Runtime, sequences: list[list[int]]) -> dict[str, float]:
    from quantbuild.evaluation.distributions import compare_from

    measured = compare_from(sequence_positions(model, sequences), tensors)
    now = [model.generate(tokens, NEW_TOKENS) for tokens in sequences]
    matches = sum(1 for old, new in zip(greedy, now) if old == new)
    return {"kld_mean": measured["kld_mean"], "kld_max": measured["kld_p99"],
            "top1_agreement": measured["top1_agreement"], "greedy_match": matches / len(sequences)}


def _longest(sequences: list[list[int]]) -> int:
    """The context the probes run in: the longest probe with its greedy continuation."""
    return max(len(tokens) for tokens in sequences) + NEW_TOKENS


def _threads() -> int:
    return os.cpu_count() or 1


def record(runtime: Runtime, out: Path, prompt_format: Optional[PromptFormat] = None) -> dict[str, Any]:
    """Record the probes as `runtime` answers them, into `out/` (probes.safetensors,
    behaviour.json, with the runtime's probe settings), with tolerances from reruns at
    other thread counts. An instruct model's probes are conversations through its chat
    template (`prompt_format`), tokenized with their special tokens."""
    from quantbuild.evaluation.distributions import save_reference

    items = probe_items(prompt_format)
    prompts = [(probe_id, item.family, text) for probe_id, item, text in items]
    chat = prompt_format is not None and prompt_format.chat
    cap = MAX_CHAT_PROBE_TOKENS if chat else MAX_PROBE_TOKENS
    workers = _threads()
    sequences = [runtime.tokenize(text, chat)[:cap] for _, _, text in prompts]
    with runtime.at_threads(workers, _longest(sequences)) as model:
        tensors, greedy = _run(model, sequences)
        spread = [_compare(tensors, greedy, model, sequences)]
    thread_counts = sorted({1, max(1, workers // 2), workers})
    for threads in thread_counts:
        if threads != workers:
            with runtime.at_threads(threads, _longest(sequences)) as model:
                spread.append(_compare(tensors, greedy, model, sequences))
    tensors = {**tensors, **_pack("prompt", sequences), **_pack("greedy", greedy)}
    out.mkdir(parents=True, exist_ok=True)
    save_reference(tensors, out / PROBES)
    worst = {"kld_mean": max(s["kld_mean"] for s in spread), "kld_max": max(s["kld_max"] for s in spread),
             "top1_agreement": min(s["top1_agreement"] for s in spread),
             "greedy_match": min(s["greedy_match"] for s in spread)}
    info = {
        "schema": SCHEMA,
        "runtime": runtime.name,
        **runtime.probe_settings(),
        "probes": [{"id": probe_id, "family": family, "prompt_tokens": len(tokens), "greedy_tokens": len(out_tokens),
                    "correct": _answered(runtime, item, out_tokens)}
                   for (probe_id, family, _), (_, item, _), tokens, out_tokens
                   in zip(prompts, items, sequences, greedy)],
        "probe_seed": PROBE_SEED,
        **(prompt_format.describe() if prompt_format is not None else {"prompt_format": "raw"}),
        # digests, never the text: what the probes were and what they tokenized to
        "probe_text_sha256": sha256_json([text for _, _, text in prompts]),
        "probe_tokens_sha256": sha256_json(sequences),
        "probes_sha256": sha256_file(out / PROBES),
        "top_k": TOP_K,
        "spread": {"threads": thread_counts, "runs": len(spread), **{k: round(v, 9) for k, v in worst.items()}},
        "tolerance": {
            "kld_mean": max(KLD_FLOOR, 10 * worst["kld_mean"]),
            "top1_agreement": max(0.0, round(worst["top1_agreement"] - TOP1_SLACK, 6)),
            "greedy_match": worst["greedy_match"],
        },
    }
    write_json(out / BEHAVIOUR, info)
    return info


def _pack(name: str, rows: list[list[int]]) -> dict:
    """Ragged token lists as one flat int32 tensor plus offsets."""
    import numpy as np

    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    flat = [token for row in rows for token in row]
    return {f"{name}_tokens": np.asarray(flat, dtype=np.int32), f"{name}_offsets": np.asarray(offsets, dtype=np.int64)}


def _unpack(tensors: dict, name: str) -> list[list[int]]:
    flat, offsets = tensors[f"{name}_tokens"].tolist(), tensors[f"{name}_offsets"].tolist()
    return [flat[start:end] for start, end in zip(offsets, offsets[1:])]


def load(folder: Path) -> tuple[dict, dict]:
    """(behaviour.json, probe tensors) of a bundle or eval folder; DataError when absent."""
    from quantbuild.evaluation.distributions import load_reference

    info_path, probes_path = folder / BEHAVIOUR, folder / PROBES
    if not info_path.is_file() or not probes_path.is_file():
        raise DataError(f"{folder}: no behavioural probes ({BEHAVIOUR}, {PROBES}); package it again with this "
                        f"quantbuild to record them")
    info = read_json(info_path)
    if sha256_file(probes_path) != info.get("probes_sha256"):
        raise IntegrityError(f"{probes_path}: sha256 does not match behaviour.json's probes_sha256")
    return info, load_reference(probes_path)


def check(runtime: Runtime, folder: Path, threads: Optional[int] = None) -> dict[str, Any]:
    """Rerun the probes stored in `folder` on `runtime` (the artifact loaded with the
    settings they were recorded with); the measures, the tolerances and the measures
    outside them (`drift`)."""
    info, tensors = load(folder)
    sequences, greedy = _unpack(tensors, "prompt"), _unpack(tensors, "greedy")
    stored = {"topk_ids": tensors["topk_ids"], "topk_logprobs": tensors["topk_logprobs"]}
    with runtime.at_threads(threads or _threads(), _longest(sequences)) as model:
        measured = _compare(stored, greedy, model, sequences)
    tolerance = info["tolerance"]
    drift = []
    if measured["kld_mean"] > tolerance["kld_mean"]:
        drift.append(("kld_mean", measured["kld_mean"], f"<= {tolerance['kld_mean']:.3g}"))
    if measured["top1_agreement"] < tolerance["top1_agreement"]:
        drift.append(("top1_agreement", measured["top1_agreement"], f">= {tolerance['top1_agreement']:.4g}"))
    if measured["greedy_match"] < tolerance["greedy_match"]:
        drift.append(("greedy_match", measured["greedy_match"], f">= {tolerance['greedy_match']:.4g}"))
    return {"measured": {key: round(value, 9) for key, value in measured.items()}, "tolerance": tolerance,
            "probes": len(sequences), "runtime": info["runtime"], "drift": drift}
