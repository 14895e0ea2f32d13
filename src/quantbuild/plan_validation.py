"""A planned GGUF mix, checked before it ships against llama.cpp's own presets.

The auto-mix is chosen from per-layer sensitivities measured on the calibration mix; nothing
there says the finished plan beats what `llama-quantize` gives for free. So every planned
variant is measured in llama.cpp (the bindings; quantbuild's KL divergence, which agrees
with `llama-perplexity --kl-divergence` to 0.999-1.026: bench/README.md) against the F16
base GGUF, on held-out validation text, beside each stock preset its size budget holds
(with and without the importance matrix, where there is one), and beside the smaller plans
of its chain (quantizers.gguf.nest_plans). The budget is what the variant's target allows,
not what the plan happened to store: a plan that came out a little under its target still
meets the preset at that target's size.

A plan tuned on one kind of text can lose on another (issue #28: on eval-family text IQ4_XS
and Q3_K_L beat plans that won on calibration-like text), so the validation text is three
texts, each scored on its own (`TEXTS`): eval-family prompts with the answers a correct model
writes, calibration-like text (the calibration sources' generators), and prose (the
language-modelling family). A candidate's `worst_ratio` is its largest KL divergence, over
the three texts, relative to the best stock preset within the budget on that text. What ships:
among the candidates never worse than that best preset on any text (worst ratio <= 1), the
one with the lowest mean divergence over the texts; where none is, the one with the lowest
worst ratio. The plan wins ties. Where none is and a preset's files with and without the
matrix split the texts, that preset with the matrix on some of its tensor roles only is
searched for and measured beside them (`_imatrix_by_role`). So the ladder never ships a mix worse than llama.cpp's
preset at its size on any of the three texts wherever one file can be so, and ships the
plan only where its win holds on every text.

For an instruct model (its tokenizer has a chat template) the eval-family items and the
calibration conversations are rendered through the template, with the answer as the last
turn, and tokenized with its special tokens parsed: what the deployed model reads. (Measured
on the 33M chat model: on raw text, which it never sees deployed, Q3_K_S's importance matrix
seemed to hurt eval-family text; rendered, it helps on all three texts, bench/README.md.)

Each text is drawn by the generators at a seed of its own (`VALIDATION_SEED` on), without
any item the committed eval or calibration files hold or the planner chose on. It lives in
memory only; its digest and token count are recorded: it never enters an artifact. (llama-perplexity was the first
measure: its logger is leaked at exit by design, and under load its last lines, the
statistics, were lost in 2 of 8 runs.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from quantbuild.hashing import sha256_bytes
from quantbuild.runtimes.llama_worker import LlamaWorker
from quantbuild.tasks.write_data import VALIDATION_SEED

# The texts a plan is validated on, and what each is drawn from: eval families (prompt and
# answer), calibration sources, or the language-modelling family's prose.
EVAL_FAMILIES = ("structured", "retrieval", "reasoning", "long_context")
TEXTS = ("eval", "calibration", "prose")
# llama.cpp's stock file types a plan is held against, and the cheapest tensor type each
# stores its decoder in (a preset whose cheapest type is already larger than the plan's
# file is not built at all).
# (the stored bits per weight of Q2_K, Q3_K, IQ4_XS, Q4_K, Q5_K and Q6_K tensors).
STOCK_PRESETS = {"Q2_K": 2.625, "Q3_K_S": 3.4375, "Q3_K_M": 3.4375, "Q3_K_L": 3.4375, "IQ4_XS": 4.25,
                 "Q4_K_S": 4.5, "Q4_K_M": 4.5, "Q5_K_S": 5.5, "Q5_K_M": 5.5, "Q6_K": 6.5625}
# The file type whose `llama-quantize --pure` file stores every tensor at one tensor type:
# how the importance matrix's effect on that type is measured.
PURE_FILE_TYPES = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K",
                   "Q8_0": "Q8_0", "IQ4_XS": "IQ4_XS", "IQ4_NL": "IQ4_NL", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
                   "Q5_0": "Q5_0", "Q5_1": "Q5_1", "IQ3_S": "IQ3_S", "IQ3_XXS": "IQ3_XXS"}
BY_TYPE = "plan, imatrix by type"
# a stock preset with the importance matrix on some of its decoder tensor roles (`by_role`)
BY_ROLE = "+imatrix by role"
# the planner's own tokens, scored beside the held-out texts
OWN = "planner"
# The context each validation text is scored in (the longest, long-context items with their
# answers, fit).
N_CTX = 2048
PLAN = "plan"
# run as LlamaWorker's child (`python -m`): the validation's llama.cpp work, see the end
MODULE = "quantbuild.plan_validation"
# the name the held-out texts' reference is kept under in the measuring process
TEXTS_REFERENCE = "texts"


@lru_cache(maxsize=None)
def _held(kind: str) -> frozenset:
    """The texts (calibration) or prompts (eval, prose) the committed data files hold (the
    golden example's included)."""
    from quantbuild.tasks import GENERATORS, calibration_sources
    from quantbuild.tasks.write_data import (CALIBRATION_COUNTS, CALIBRATION_SEED, EVAL_COUNTS, EVAL_SEED,
                                             golden_example)

    if kind == "calibration":
        return frozenset(record["text"] for source, count in CALIBRATION_COUNTS.items()
                         for record in calibration_sources.generate(source, count, CALIBRATION_SEED))
    return frozenset([item.prompt for family in _families(kind)
                      for item in GENERATORS[family](EVAL_COUNTS[family], EVAL_SEED)] +
                     [item.prompt for item in golden_example()])


@lru_cache(maxsize=None)
def _planner_prompts() -> tuple[str, ...]:
    """The prompts of the items the planner chose on: the sensitivity table's and those whole
    plans are checked on (`quantbuild.probes`)."""
    from quantbuild.probes import FAMILIES, FAMILY_SEED, MAX_FAMILY_ITEMS, check_items
    from quantbuild.tasks import GENERATORS

    return tuple(sorted({item.prompt for family in FAMILIES
                         for item in GENERATORS[family](MAX_FAMILY_ITEMS, FAMILY_SEED) + check_items(family)}))


def _families(kind: str) -> tuple[str, ...]:
    return EVAL_FAMILIES if kind == "eval" else ("language_modelling",)


def _drawn(kind: str, seed: int, template: Optional[Any] = None) -> list[str]:
    """The texts of `kind` the generators give at `seed`, less any the committed data holds or
    that begins with a prompt the planner chose on (calibration-like text quotes items).
    For an instruct model (`template`, its ChatTemplate) each eval-family item and each
    calibration conversation is the conversation rendered through the template with the
    answer as its last turn, as the deployed model reads it; prose stays raw text."""
    from quantbuild.prompts import conversation_pair
    from quantbuild.tasks import GENERATORS, calibration_sources
    from quantbuild.tasks.items import render_target

    held, planner = _held(kind), _planner_prompts()
    if kind == "calibration":
        records = [record for source in calibration_sources.SOURCES
                   for record in calibration_sources.generate(source, 8, seed)
                   if record["text"] not in held and not record["text"].startswith(planner)]
        return [calibration_sources.rendered(record, template) if template is not None and "messages" in record
                else record["text"] for record in records]
    drawn = [(item, item.prompt + (render_target(item) if kind == "eval" else "")) for family in _families(kind)
             for item in GENERATORS[family](8, seed) if item.prompt is not None and item.prompt not in held]
    kept = [(item, text) for item, text in drawn if not text.startswith(planner)]
    if kind != "eval" or template is None:
        return [text for _, text in kept]
    return ["".join(conversation_pair(item, template)) for item, _ in kept]


def validation_texts(tokens: int, count_tokens: Callable[[str], int],
                     seed: int = VALIDATION_SEED, template: Optional[Any] = None) -> dict[str, tuple[list[str], int]]:
    """Each of `TEXTS` -> (its texts, their token count): together at least `tokens` tokens,
    a third each, drawn from `seed` on; rendered through `template` where `_drawn` says.
    Text so rendered is tokenized with its special tokens parsed (`special`)."""
    drawn: dict[str, tuple[list[str], int]] = {}
    share = -(-tokens // len(TEXTS))
    for kind in TEXTS:
        texts: list[str] = []
        counted, at = 0, seed
        while counted < share:
            for text in _drawn(kind, at, template):
                texts.append(text)
                counted += count_tokens(text)
            at += 1
        drawn[kind] = (texts, counted)
    return drawn


def texts_record(drawn: dict[str, tuple[list[str], int]], seed: int = VALIDATION_SEED) -> dict[str, Any]:
    """What the record keeps of the validation texts: digests and counts, never the text."""
    return {kind: {"sha256": sha256_bytes("\n\n".join(texts).encode("utf-8")), "tokens": counted,
                   "items": len(texts), "seed": seed} for kind, (texts, counted) in drawn.items()}


def _model(path: Path, threads: int, repack: bool, device: str) -> Any:
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    return LlamaCppModel(path, n_ctx=N_CTX, threads=threads, repack=repack, device=device)


# A text, or a token sequence with the first position it is scored from (the planner's own
# probes: an answer's positions only).
Scored = Any


def _positions(model: Any, items: list[Scored], special: bool = False) -> Any:
    """(log-probabilities, next-token targets) of each text or token sequence, from its
    first scored position on; texts tokenized with special tokens parsed where `special`
    (rendered through a chat template)."""
    from quantbuild.runtimes.protocol import sequence_positions

    for item in items:
        tokens, first = (model.tokenize(item, special), 0) if isinstance(item, str) else item
        logprobs, targets = next(sequence_positions(model, [tokens]))
        yield logprobs[first:], targets[first:]


def reference(base: Path, drawn: dict[str, tuple[list[Scored], int]], threads: int, repack: bool,
              device: str = "cpu", special: bool = False) -> dict[str, dict]:
    """The base GGUF's next-token distributions over each text: whole where the vocabulary
    is small, else the top-k with a tail bucket (the evaluation's own settings)."""
    from quantbuild.config import EvalConfig
    from quantbuild.evaluation.distributions import reference_from

    settings = EvalConfig()
    with _model(base, threads, repack, device) as model:
        return {kind: reference_from(_positions(model, texts, special), settings.kl_top_k,
                                     model.n_vocab <= settings.kl_full_vocab)[0]
                for kind, (texts, _) in drawn.items()}


def kl_divergence(path: Path, stored: dict[str, dict], drawn: dict[str, tuple[list[Scored], int]], threads: int,
                  repack: bool, device: str = "cpu", special: bool = False) -> dict[str, dict[str, float]]:
    """Each text -> the mean KL divergence of `path` to its stored reference, and top-1
    agreement."""
    from quantbuild.evaluation.distributions import compare_from

    scores = {}
    with _model(path, threads, repack, device) as model:
        for kind, (texts, _) in drawn.items():
            measured = compare_from(_positions(model, texts, special), stored[kind])
            scores[kind] = {"kld_mean": round(measured["kld_mean"], 8),
                            "top1_agreement": round(measured["top1_agreement"], 6)}
    return scores


def tensor_bytes(path: Path) -> int:
    """The bytes of a GGUF file's tensors (what its type mix costs, metadata aside)."""
    from quantbuild.runtimes.gguf_file import layout

    return sum(tensor.nbytes for tensor in layout(path).tensors)


# `llama-quantize --dry-run` prints the tensors' size it would write in MiB to two decimals.
DRY_RUN_ROUNDING = int(0.005 * 2**20) + 1


def planned_bytes(base: Path, args: list[str], file_type: str) -> int:
    """The tensor bytes llama-quantize would write for `file_type` with `args`, from its dry
    run (milliseconds: no tensor is quantized; an 8B model's file takes minutes), to within
    DRY_RUN_ROUNDING."""
    import re

    from quantbuild.errors import QuantbuildError
    from quantbuild.runtimes.llama_build import run_tool

    output = run_tool("llama-quantize", ["--dry-run", *args, str(base), file_type], f"dry run {file_type}")
    found = re.search(r"quant size\s*=\s*([0-9.]+) MiB", output)
    if not found:
        raise QuantbuildError(f"dry run {file_type}: llama-quantize printed no quant size")
    return round(float(found.group(1)) * 2**20)


@dataclass
class PlanBuild:
    """How the plan was built, for building it again with the importance matrix on only
    some of its tensor types: llama-quantize's arguments less `--imatrix`, its file type,
    the GGUF tensors the plan gives each tensor type, and whether the plan used the matrix."""

    args: list[str]
    file_type: str
    tensors: dict[str, list[str]] = field(default_factory=dict)
    imatrix: bool = False

    def with_matrix_for(self, matrix: Path, types: set[str]) -> list[str]:
        """The arguments that give the importance matrix to the tensors of `types` only (the
        other plan tensors quantize without it; tensors outside the plan keep the plan's
        choice). llama-quantize matches names as substrings: every plan tensor is a whole
        `blk.N.` name, which no other tensor's name contains."""
        if not types:
            return list(self.args)
        if self.imatrix:
            dropped = [name for kind, names in self.tensors.items() if kind not in types for name in names]
            return [*self.args, "--imatrix", str(matrix), *[arg for name in dropped for arg in ("--exclude-weights", name)]]
        kept = [name for kind in types for name in self.tensors.get(kind, [])]
        return [*self.args, "--imatrix", str(matrix), *[arg for name in kept for arg in ("--include-weights", name)]]


def validate_plan(plan_file: Path, base: Path, imatrix: Optional[Path], tokenizer_dir: Path, tokens: int,
                  threads: int, repack: bool,
                  smaller: Optional[dict[str, tuple[list[str], str]]] = None,
                  build: Optional[PlanBuild] = None,
                  own: Optional[list[tuple[list[int], int]]] = None,
                  budget_bytes: int = 0, device: str = "cpu") -> tuple[dict[str, Any], Optional[Path], Any]:
    """Measure `plan_file`, every stock preset within its size (`budget_bytes`, the tensor
    bytes its target allows, where that is more than the plan stores: a preset the budget
    holds is a rival even where the plan came out smaller) and the ladder's smaller
    plans of the same chain (`smaller`: label -> (llama-quantize arguments, file type)) on
    the validation texts; and, given the plan's `build` and an importance matrix, whether
    the matrix helps each of the plan's tensor types (`imatrix_by_type`: a pure file of the
    type with and without it), and the plan built with the matrix on exactly the types it
    helps (`BY_TYPE`), where that differs from the plan. `own`: the token sequences the
    plan was chosen on (sensitivity.planner_probes), on which each candidate's divergence is
    reported beside the held-out texts' (`planner_tokens`), never used to choose.
    `device`: where llama.cpp runs every candidate (runtimes.llama_cpp.fastest_device), the
    same for all of them; the record names it.

    Returns (the record, the file to ship instead or None, the temporary folder holding
    it, to be cleaned up by the caller once copied). The record names each candidate with
    its tensor bytes, bits per weight over the tensors, KL divergence on each text, their
    mean and its worst ratio (`choose`), and `shipped`: `plan`, or the candidate
    (`Q3_K_S+imatrix`, `plan gguf_mix_3p5`) chosen instead.
    """
    from transformers import AutoTokenizer

    from quantbuild.prompts import tokenizer_template

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = tokenizer_template(tokenizer)
    drawn = validation_texts(tokens, lambda value: len(tokenizer(value, verbose=False)["input_ids"]), template=template)
    work = tempfile.TemporaryDirectory(prefix="quantbuild-validation-")
    settings = {"threads": threads, "repack": repack, "device": device, **({"special": True} if template else {})}
    try:
        with LlamaWorker(MODULE, settings) as worker:
            return _validate(plan_file, base, imatrix, drawn, worker, threads, work, smaller, build, own,
                             budget_bytes)
    except BaseException:
        work.cleanup()
        raise


def _validate(plan_file: Path, base: Path, imatrix: Optional[Path], drawn: dict[str, tuple[list[Scored], int]],
              worker: Any, threads: int, work: Any, smaller: Optional[dict[str, tuple[list[str], str]]],
              build: Optional[PlanBuild], own: Optional[list[tuple[list[int], int]]],
              budget_bytes: int) -> tuple[dict[str, Any], Optional[Path], Any]:
    from quantbuild.runtimes.gguf_file import layout
    from quantbuild.runtimes.llama_build import run_tool

    folder = Path(work.name)
    worker.ask("reference", name=TEXTS_REFERENCE, path=str(base), drawn=drawn)
    allowed = max(tensor_bytes(plan_file), budget_bytes)
    elements = sum(tensor.elements for tensor in layout(plan_file).tensors)

    def entry_of(size: int) -> dict[str, Any]:
        return {"tensor_bytes": size, "bits_per_weight": round(size * 8 / elements, 4)}

    def entry(path: Path, texts: Optional[dict[str, dict[str, float]]] = None) -> dict[str, Any]:
        return {**entry_of(tensor_bytes(path)), "texts": texts if texts is not None else
                worker.ask("divergence", name=TEXTS_REFERENCE, path=str(path), drawn=drawn)}

    measured: dict[str, dict[str, Any]] = {PLAN: entry(plan_file)}
    larger: list[str] = []
    recipes: dict[str, tuple[list[str], str]] = {}
    texts = texts_record(drawn)
    texts_key = "".join(part["sha256"] for part in texts.values())

    def rebuild(name: str) -> Path:
        args, file_type = recipes[name]
        path = folder / f"{name}.gguf"
        run_tool("llama-quantize", [*args, str(base), str(path), file_type, str(threads)], f"validation {name}")
        return path

    def candidate(name: str, args: list[str], file_type: str, key: Optional[tuple] = None) -> None:
        """Build `name` with llama-quantize and measure it, unless it stores more than the plan's
        budget: known from llama-quantize's dry run without building it where that is
        beyond its rounding, else from the file. `key`: a stock preset's, under which its
        size and divergences are kept for the process (the ladder's plans meet the same
        presets on the same texts; each is measured once)."""
        recipes[name] = (args, file_type)
        size, known = _PRESETS.get(key, (None, None))
        if size is not None and size > allowed:
            larger.append(name)
            return
        if known is not None:
            measured[name] = {**entry_of(size), "texts": {kind: dict(value) for kind, value in known.items()}}
            return
        if size is None and planned_bytes(base, args, file_type) - DRY_RUN_ROUNDING > allowed:
            larger.append(name)
            return
        path = rebuild(name)
        size = tensor_bytes(path)
        if size > allowed:
            larger.append(name)
        else:
            measured[name] = entry(path)
        # rebuilt where it ships (llama-quantize is deterministic): at 8B each file is 3-5 GB
        path.unlink()
        if key is not None:
            _PRESETS[key] = (size, measured[name]["texts"] if name in measured else None)

    for preset, cheapest_bits in STOCK_PRESETS.items():
        if cheapest_bits * elements / 8 > allowed:
            larger.append(preset)
            continue
        for with_imatrix in ((False, True) if imatrix is not None else (False,)):
            matrix = imatrix if with_imatrix else None
            candidate(f"{preset}+imatrix" if with_imatrix else preset,
                      ["--imatrix", str(imatrix)] if with_imatrix else [], preset,
                      (preset, _stamp(base), _stamp(matrix), texts_key, worker.settings["device"],
                       worker.settings.get("special", False)))
    # a smaller target of the chain stored larger than this plan is no alternative either
    for label, (args, file_type) in (smaller or {}).items():
        candidate(label, args, file_type)
    by_type = None
    if build is not None and imatrix is not None:
        by_type = _imatrix_by_type(build, base, imatrix, folder, lambda path: entry(path)["texts"], threads, texts_key)
        helped = {kind for kind, verdict in by_type.items() if verdict["use"]}
        if helped != (set(build.tensors) if build.imatrix else set()):
            candidate(BY_TYPE, build.with_matrix_for(imatrix, helped), build.file_type)
    shipped, best = choose(measured)
    by_role = None
    if imatrix is not None and measured[shipped]["worst_ratio"] > 1:  # no file never worse: repair a split preset
        repaired = _imatrix_by_role(measured, base, imatrix, folder, lambda path: entry(path)["texts"], threads)
        if repaired is not None:  # built once more (llama-quantize is deterministic), not measured again
            name, args, by_role, divergences = repaired
            recipes[name] = (args, by_role["preset"])
            measured[name] = entry(rebuild(name), divergences)
            shipped, best = choose(measured)
    if shipped != PLAN and not (folder / f"{shipped}.gguf").is_file():  # a preset measured earlier in the process
        rebuild(shipped)
    if own:  # the plan, and what ships instead of it, on the tokens the plan was chosen on
        probes = {OWN: (own, 0)}
        worker.ask("reference", name=OWN, path=str(base), drawn=probes)
        files = {PLAN: plan_file, **({shipped: folder / f"{shipped}.gguf"} if shipped != PLAN else {})}
        for name, path in files.items():
            measured[name]["planner_tokens"] = worker.ask("divergence", name=OWN, path=str(path), drawn=probes)[OWN]
    record = {"text": {"seed": VALIDATION_SEED, "tokens": sum(counted for _, counted in drawn.values()),
                       "sha256": sha256_bytes(texts_key.encode("ascii")), "texts": texts,
                       **({"rendered": "chat template"} if worker.settings.get("special") else {})},
              "device": worker.settings["device"], "budget_bytes": allowed, "measured": measured, "larger_than_plan": sorted(larger), "best_alternative": best, "shipped": shipped,
              **({"imatrix_by_type": by_type} if by_type is not None else {}),
              **({"imatrix_by_role": by_role} if by_role is not None else {}),
              **({"planner_tokens": {"sequences": len(own), "scored": sum(len(ids) - 1 - first for ids, first in own)}}
                 if own else {})}
    return record, (folder / f"{shipped}.gguf" if shipped != PLAN else None), work


def _imatrix_by_type(build: PlanBuild, base: Path, imatrix: Path, folder: Path, score: Callable[[Path], dict],
                     threads: int, texts_key: str) -> dict[str, dict[str, Any]]:
    """Each tensor type of the plan -> its pure file's mean KL divergence over the texts
    without and with the importance matrix, and whether to use it (it lowers the
    divergence). A type with no pure file type (or one llama.cpp refuses without a matrix)
    keeps the plan's choice."""
    from quantbuild.runtimes.llama_build import run_tool

    verdicts: dict[str, dict[str, Any]] = {}
    for kind in sorted(build.tensors):
        file_type = PURE_FILE_TYPES.get(kind)
        if file_type is None:
            verdicts[kind] = {"use": build.imatrix, "measured": False}
            continue
        # the same type, base, matrix and texts give the same verdict: measured once a process
        key = (kind, texts_key, *(str(path) for path in (base, imatrix)),
               *(path.stat().st_mtime_ns for path in (base, imatrix)), threads)
        if key in _VERDICTS:
            verdicts[kind] = dict(_VERDICTS[key])
            continue
        means = {}
        for with_matrix in (False, True):
            path = folder / f"pure-{kind}.gguf"
            run_tool("llama-quantize", ["--pure", *(["--imatrix", str(imatrix)] if with_matrix else []), str(base),
                                        str(path), file_type, str(threads)], f"validation pure {kind}")
            texts = score(path)
            path.unlink()
            means["with" if with_matrix else "without"] = round(
                sum(entry["kld_mean"] for entry in texts.values()) / len(texts), 8)
        verdicts[kind] = _VERDICTS[key] = {**means, "use": means["with"] < means["without"], "measured": True}
    return verdicts


_VERDICTS: dict[tuple, dict[str, Any]] = {}
# a stock preset's (tensor bytes, divergence on each text or None where it was too large to
# measure), by what makes them: the preset, the base and matrix files, the texts, the device
# and the tokenization (`_validate`; not the threads, which each validation takes from the
# cores free when it starts: files and divergences are the same on one core as on all)
_PRESETS: dict[tuple, tuple[int, Optional[dict[str, dict[str, float]]]]] = {}


def _stamp(path: Optional[Path]) -> Optional[tuple]:
    """What identifies a file's content within a process: its path, size and modification time."""
    if path is None:
        return None
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _is_preset(name: str) -> bool:
    """A stock preset's own file, with or without the importance matrix (not one repaired)."""
    preset, _, rest = name.partition("+")
    return preset in STOCK_PRESETS and rest in ("", "imatrix")


def _floor(measured: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each text -> the lowest divergence of a stock preset on it (of any candidate where
    no preset is as small)."""
    kinds = list(next(iter(measured.values()))["texts"])
    presets = [name for name in measured if _is_preset(name)] or list(measured)
    return {kind: min(measured[name]["texts"][kind]["kld_mean"] for name in presets) for kind in kinds}


def _worst_ratio(texts: dict[str, dict[str, float]], floor: dict[str, float]) -> float:
    return round(max(texts[kind]["kld_mean"] / floor[kind] if floor[kind] > 0 else
                     (1.0 if texts[kind]["kld_mean"] <= 0 else float("inf")) for kind in floor), 4)


def drop_roles(roles: list[str], worst_of: Callable[[frozenset], float]) -> tuple[frozenset, float, int]:
    """(the roles kept, their worst ratio, how many subsets were scored): from every role,
    drop the one whose dropping lowers `worst_of` most, while one does (backward
    elimination; ties go to the first role in order)."""
    kept = frozenset(roles)
    worst, scored = worst_of(kept), 1
    while kept:
        trials = [(worst_of(kept - {role}), role) for role in sorted(kept)]
        scored += len(trials)
        best, role = min(trials)
        if best >= worst:
            break
        kept, worst = kept - {role}, best
    return kept, worst, scored


def decoder_roles(base: Path) -> list[str]:
    """The decoder's tensor roles in a GGUF (`attn_k`, `ffn_down`, ... of `blk.N.<role>.weight`)."""
    from quantbuild.runtimes.gguf_file import layout

    return sorted({tensor.name.split(".")[2] for tensor in layout(base).tensors
                   if tensor.name.startswith("blk.") and len(tensor.dims) >= 2})


def role_args(imatrix: Path, roles: Iterable[str]) -> list[str]:
    """llama-quantize's arguments giving the importance matrix to the tensors of `roles`
    only (its `--include-weights` matches a substring of the matrix's tensor names)."""
    return ["--imatrix", str(imatrix), *[arg for role in sorted(roles) for arg in ("--include-weights", f".{role}.")]]


def _imatrix_by_role(measured: dict[str, dict[str, Any]], base: Path, imatrix: Path, folder: Path,
                     score: Callable[[Path], dict], threads: int
                     ) -> Optional[tuple[str, list[str], dict[str, Any], dict[str, dict[str, float]]]]:
    """Where no candidate is never worse than the best preset on every text and a preset's
    files with and without the importance matrix split the texts (issue #28, the 33M chat
    model: Q3_K_S without the matrix best on eval-family text, with it on the other two), that
    preset with the matrix on only some of its decoder tensor roles (`blk.N.attn_k`, ...),
    chosen by `drop_roles` on the validation texts. Returns (its candidate name, its
    llama-quantize arguments, the search's record, its divergence on each text), or None
    where no split preset has a subset better than both of its files."""
    from quantbuild.runtimes.llama_build import run_tool

    floor = _floor(measured)
    split = [name for name in measured if _is_preset(name) and "+" not in name and f"{name}+imatrix" in measured]
    if not split:
        return None
    preset = min(split, key=lambda name: min(_worst_ratio(measured[name]["texts"], floor),
                                             _worst_ratio(measured[f"{name}+imatrix"]["texts"], floor)))
    roles = decoder_roles(base)
    texts: dict[frozenset, dict[str, dict[str, float]]] = {}

    def worst_of(kept: frozenset) -> float:
        if kept == frozenset(roles) or not kept:
            return _worst_ratio(measured[f"{preset}+imatrix" if kept else preset]["texts"], floor)
        path = folder / "by-role.gguf"
        run_tool("llama-quantize", [*role_args(imatrix, kept), str(base), str(path), preset, str(threads)],
                 f"validation {preset} by role")
        texts[kept] = score(path)
        path.unlink()
        return _worst_ratio(texts[kept], floor)

    kept, worst, scored = drop_roles(roles, worst_of)
    both = min(_worst_ratio(measured[name]["texts"], floor) for name in (preset, f"{preset}+imatrix"))
    if not kept or kept == frozenset(roles) or worst >= both:
        return None
    return (f"{preset}{BY_ROLE}", role_args(imatrix, kept),
            {"preset": preset, "roles": sorted(kept), "worst_ratio": worst, "scored": scored}, texts[kept])


def choose(measured: dict[str, dict[str, Any]]) -> tuple[str, Optional[str]]:
    """(what ships, the best alternative to the plan) among the measured candidates, each
    with its KL divergence per text; fills in each one's `kld_mean` (over the texts) and
    `worst_ratio` (its largest divergence relative to the best stock preset on that text;
    to the best candidate where no preset is as small).

    Ranked: never worse than that best preset on any text (worst ratio <= 1) first, then by
    mean divergence; where no candidate is, by worst ratio. The plan wins a tie, then the
    smaller file."""
    floor = _floor(measured)
    for entry in measured.values():
        entry["kld_mean"] = round(sum(value["kld_mean"] for value in entry["texts"].values()) / len(floor), 8)
        entry["worst_ratio"] = _worst_ratio(entry["texts"], floor)
    safe = any(entry["worst_ratio"] <= 1 for entry in measured.values())

    def rank(name: str) -> tuple:
        entry = measured[name]
        order = entry["kld_mean"] if safe else entry["worst_ratio"]
        return (safe and entry["worst_ratio"] > 1, order, name != PLAN, entry["tensor_bytes"], name)
    others = [name for name in measured if name != PLAN]
    best = min(others, key=rank, default=None)
    return (best if best is not None and rank(best) < rank(PLAN) else PLAN), best


def describe(validation: dict[str, Any]) -> str:
    """One line: the plan against the best alternative within its budget (a stock preset, or
    a smaller plan of its chain) on the validation texts, and what shipped."""
    measured, best = validation["measured"], validation.get("best_alternative")
    plan = measured[PLAN]
    tokens = validation["text"]["tokens"]
    texts = ", ".join(measured[PLAN].get("texts", {})) or "one"
    if best is None:
        return (f"plan KLD {plan['kld_mean']:.5f} on {tokens} held-out tokens ({texts}); no stock preset is as small "
                f"({plan['bits_per_weight']:.3f} bits/weight)")
    what = (_by_type(validation) if best == BY_TYPE else f"the smaller {best}" if best.startswith("plan ")
            else _by_role(validation) if best.endswith(BY_ROLE) else f"stock preset {best}")
    if "planner_tokens" in plan:  # in-sample against held out: how far the plan's choices generalise
        tokens = f"{tokens} held-out tokens; {plan['planner_tokens']['kld_mean']:.5f} on the planner's own"
    if validation["shipped"] == PLAN:
        return (f"plan kept: KLD {plan['kld_mean']:.5f} at {plan['bits_per_weight']:.3f} bits/weight, at most "
                f"{plan['worst_ratio']:.2f}x the best stock preset within its budget on each text ({texts}); "
                f"best alternative "
                f"{what}: {measured[best]['kld_mean']:.5f} at {measured[best]['bits_per_weight']:.3f} bits/weight; "
                f"{tokens}" + ("" if "planner_tokens" in plan else " held-out tokens"))
    shipped = measured[best]
    return (f"plan replaced by {what}: its KLD {shipped['kld_mean']:.5f} at {shipped['bits_per_weight']:.3f} "
            f"bits/weight (at most {shipped['worst_ratio']:.2f}x the best stock preset on each text) against the "
            f"plan's {plan['kld_mean']:.5f} at {plan['bits_per_weight']:.3f} ({plan['worst_ratio']:.2f}x); "
            f"{tokens}" + ("" if "planner_tokens" in plan else " held-out tokens") + f" ({texts})")


def _by_type(validation: dict[str, Any]) -> str:
    helped = sorted(kind for kind, verdict in validation.get("imatrix_by_type", {}).items() if verdict["use"])
    return f"the plan with the importance matrix on {', '.join(helped)} only" if helped else \
        "the plan without the importance matrix"


def _by_role(validation: dict[str, Any]) -> str:
    repaired = validation["imatrix_by_role"]
    return f"stock preset {repaired['preset']} with the importance matrix on {', '.join(repaired['roles'])} only"


def _measurer() -> dict[str, Callable[[dict[str, Any]], Any]]:
    """The validation's llama.cpp work as the child of `LlamaWorker` serves it: a reference
    kept under its name, and a file's divergence from one."""
    stored: dict[str, dict] = {}

    def drawn(request: dict[str, Any]) -> dict[str, tuple[list[Scored], int]]:
        return {kind: (items, counted) for kind, (items, counted) in request["drawn"].items()}

    def settings(request: dict[str, Any]) -> tuple[int, bool, str, bool]:
        given = request["settings"]
        return given["threads"], given["repack"], given["device"], given.get("special", False)

    def keep(request: dict[str, Any]) -> None:
        stored[request["name"]] = reference(Path(request["path"]), drawn(request), *settings(request))

    def divergence(request: dict[str, Any]) -> dict[str, dict[str, float]]:
        return kl_divergence(Path(request["path"]), stored[request["name"]], drawn(request), *settings(request))

    return {"reference": keep, "divergence": divergence}


if __name__ == "__main__":  # LlamaWorker's child: llama.cpp loads before anything native
    from quantbuild.runtimes.llama_worker import serve

    serve(_measurer())
