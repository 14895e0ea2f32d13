"""A planned GGUF mix, checked before it ships against llama.cpp's own presets.

The auto-mix is chosen from per-layer sensitivities measured on the calibration mix; nothing
there says the finished plan beats what `llama-quantize` gives for free. So every planned
variant is measured in llama.cpp (the bindings; quantbuild's KL divergence, which agrees
with `llama-perplexity --kl-divergence` to 0.999-1.026: bench/README.md) against the F16
base GGUF, on held-out validation text, beside each stock preset no larger than it
(with and without the importance matrix, where there is one), and beside the smaller plans
of its chain (quantizers.gguf.nest_plans). Where a file no larger has
the lower divergence, the variant ships that preset instead and its record says so: the
ladder never ships a mix worse than llama.cpp's preset at its size on text the planner
never saw.

The validation text is eval-family text with its answers (every generated family's prompt
and the target a correct model writes), drawn by the task generators at a seed of its own,
without any prompt the committed eval files hold. It lives in memory only; its digest and
token count are recorded: it never enters an artifact. (llama-perplexity was the first
measure: its logger is leaked at exit by design, and under load its last lines, the
statistics, were lost in 2 of 8 runs.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

from quantbuild.hashing import sha256_bytes

# Seeds of the task generators: eval 1001, calibration 2001, the golden example 3001.
VALIDATION_SEED = 5001
# The families the validation text is drawn from, in turn, until it has enough tokens.
VALIDATION_FAMILIES = ("structured", "retrieval", "reasoning", "long_context", "language_modelling")
# llama.cpp's stock file types a plan is held against, and the cheapest tensor type each
# stores its decoder in (a preset whose cheapest type is already larger than the plan's
# file is not built at all).
# (the stored bits per weight of Q2_K, Q3_K, IQ4_XS, Q4_K, Q5_K and Q6_K tensors).
STOCK_PRESETS = {"Q2_K": 2.625, "Q3_K_S": 3.4375, "Q3_K_M": 3.4375, "Q3_K_L": 3.4375, "IQ4_XS": 4.25,
                 "Q4_K_S": 4.5, "Q4_K_M": 4.5, "Q5_K_S": 5.5, "Q5_K_M": 5.5, "Q6_K": 6.5625}
# The context each validation text is scored in (the longest, long-context items with their
# answers, fit).
N_CTX = 2048
PLAN = "plan"


def validation_text(tokens: int, count_tokens: Any, seed: int = VALIDATION_SEED) -> tuple[list[str], int]:
    """(texts, their token count): at least `tokens` tokens of eval-family text with answers,
    one text per item, drawn from `seed` on, with no prompt of the committed eval files
    (regenerated here)."""
    from quantbuild.tasks import GENERATORS
    from quantbuild.tasks.items import render_target
    from quantbuild.tasks.write_data import EVAL_COUNTS, EVAL_SEED

    held = {item.prompt for family in VALIDATION_FAMILIES for item in GENERATORS[family](EVAL_COUNTS[family], EVAL_SEED)}
    texts: list[str] = []
    counted = 0
    while counted < tokens:
        for family in VALIDATION_FAMILIES:
            for item in GENERATORS[family](8, seed):
                if item.prompt is None or item.prompt in held:
                    continue
                text = item.prompt + render_target(item) if family != "language_modelling" else item.prompt
                texts.append(text)
                counted += count_tokens(text)
        seed += 1
    return texts, counted


def _model(path: Path, threads: int, repack: bool) -> Any:
    from quantbuild.runtimes.llama_cpp import LlamaCppModel

    return LlamaCppModel(path, n_ctx=N_CTX, threads=threads, repack=repack)


def reference(base: Path, texts: list[str], threads: int, repack: bool) -> dict:
    """The base GGUF's next-token distributions over `texts`: whole where the vocabulary is
    small, else the top-k with a tail bucket (the evaluation's own settings)."""
    from quantbuild.config import EvalConfig
    from quantbuild.evaluation.distributions import reference_from

    settings = EvalConfig()
    with _model(base, threads, repack) as model:
        stored, _ = reference_from(model.text_positions(texts), settings.kl_top_k,
                                   model.n_vocab <= settings.kl_full_vocab)
    return stored


def kl_divergence(path: Path, stored: dict, texts: list[str], threads: int, repack: bool) -> dict[str, float]:
    """Mean KL divergence of `path` to the stored reference and its top-1 agreement."""
    from quantbuild.evaluation.distributions import compare_from

    with _model(path, threads, repack) as model:
        measured = compare_from(model.text_positions(texts), stored)
    return {"kld_mean": round(measured["kld_mean"], 8), "top1_agreement": round(measured["top1_agreement"], 6)}


def tensor_bytes(path: Path) -> int:
    """The bytes of a GGUF file's tensors (what its type mix costs, metadata aside)."""
    from quantbuild.runtimes.gguf_file import layout

    return sum(tensor.nbytes for tensor in layout(path).tensors)


def validate_plan(plan_file: Path, base: Path, imatrix: Optional[Path], tokenizer_dir: Path, tokens: int,
                  threads: int, repack: bool,
                  smaller: Optional[dict[str, tuple[list[str], str]]] = None) -> tuple[dict[str, Any], Optional[Path], Any]:
    """Measure `plan_file`, every stock preset no larger than it and the ladder's smaller
    plans of the same chain (`smaller`: label -> (llama-quantize arguments, file type)) on
    validation text.

    Returns (the record, the file to ship instead or None, the temporary folder holding
    it, to be cleaned up by the caller once copied). The record names each candidate with
    its tensor bytes, bits per weight over the tensors and KL divergence, and `shipped`:
    `plan`, or the candidate (`Q3_K_S+imatrix`, `plan gguf_mix_3p5`) whose divergence is the
    lowest of those no larger and below the plan's.
    """
    from transformers import AutoTokenizer

    from quantbuild.runtimes.gguf_file import layout
    from quantbuild.runtimes.llama_build import run_tool

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts, counted = validation_text(tokens, lambda value: len(tokenizer(value, verbose=False)["input_ids"]))
    work = tempfile.TemporaryDirectory(prefix="quantbuild-validation-")
    folder = Path(work.name)
    stored = reference(base, texts, threads, repack)
    plan_bytes = tensor_bytes(plan_file)
    elements = sum(tensor.elements for tensor in layout(plan_file).tensors)

    def entry(path: Path) -> dict[str, Any]:
        size = tensor_bytes(path)
        return {"tensor_bytes": size, "bits_per_weight": round(size * 8 / elements, 4),
                **kl_divergence(path, stored, texts, threads, repack)}

    measured: dict[str, dict[str, Any]] = {PLAN: entry(plan_file)}
    larger: list[str] = []

    def candidate(name: str, args: list[str], file_type: str) -> None:
        """Build `name` with llama-quantize and measure it, unless it stores more than the plan."""
        path = folder / f"{name}.gguf"
        run_tool("llama-quantize", [*args, str(base), str(path), file_type, str(threads)], f"validation {name}")
        if tensor_bytes(path) > plan_bytes:
            path.unlink()
            larger.append(name)
        else:
            measured[name] = entry(path)

    for preset, cheapest_bits in STOCK_PRESETS.items():
        if cheapest_bits * elements / 8 > plan_bytes:
            larger.append(preset)
            continue
        for with_imatrix in ((False, True) if imatrix is not None else (False,)):
            candidate(f"{preset}+imatrix" if with_imatrix else preset,
                      ["--imatrix", str(imatrix)] if with_imatrix else [], preset)
    # a smaller target of the chain stored larger than this plan is no alternative either
    for label, (args, file_type) in (smaller or {}).items():
        candidate(label, args, file_type)
    others = {name: entry for name, entry in measured.items() if name != PLAN}
    best = min(others, key=lambda name: (others[name]["kld_mean"], others[name]["tensor_bytes"], name), default=None)
    shipped = best if best is not None and others[best]["kld_mean"] < measured[PLAN]["kld_mean"] else PLAN
    record = {"text": {"sha256": sha256_bytes("\n\n".join(texts).encode("utf-8")), "tokens": counted,
                       "items": len(texts), "seed": VALIDATION_SEED, "families": list(VALIDATION_FAMILIES)},
              "measured": measured, "larger_than_plan": sorted(larger), "best_alternative": best, "shipped": shipped}
    return record, (folder / f"{shipped}.gguf" if shipped != PLAN else None), work


def describe(validation: dict[str, Any]) -> str:
    """One line: the plan's divergence against the best alternative no larger (a stock
    preset, or a smaller plan of its chain), and what shipped."""
    measured, best = validation["measured"], validation.get("best_alternative")
    plan = measured[PLAN]
    tokens = validation["text"]["tokens"]
    if best is None:
        return (f"plan KLD {plan['kld_mean']:.5f} on {tokens} held-out tokens; no stock preset is as small "
                f"({plan['bits_per_weight']:.3f} bits/weight)")
    what = f"the smaller {best}" if best.startswith("plan ") else f"stock preset {best}"
    if validation["shipped"] == PLAN:
        return (f"plan kept: KLD {plan['kld_mean']:.5f} at {plan['bits_per_weight']:.3f} bits/weight beats the best "
                f"alternative no larger ({what}: {measured[best]['kld_mean']:.5f} at "
                f"{measured[best]['bits_per_weight']:.3f} bits/weight) on {tokens} held-out tokens")
    return (f"plan replaced by {what}: its KLD {measured[best]['kld_mean']:.5f} at "
            f"{measured[best]['bits_per_weight']:.3f} bits/weight beats the plan's {plan['kld_mean']:.5f} at "
            f"{plan['bits_per_weight']:.3f} on {tokens} held-out tokens")
