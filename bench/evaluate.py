"""Evaluation throughput: quantbuild's suites vs a plain forward/generate loop over the same
items, in the same run.

    python bench/evaluate.py [--items 32] [--repeats 3]

Generative families: items/s of `run_generative` (generate + score) vs a plain batched
`model.generate` loop (same batch size, no scoring). Language modelling: tokens/s of the
baseline reference pass (top-k extraction) and of a variant's comparison (KLD, top-1,
perplexity) vs a plain forward loop computing perplexity only. Medians over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def plain_generate(model, tokenizer, items, batch_size: int, max_new: dict) -> None:
    import torch

    tokenizer.padding_side = "left"
    for family in sorted({item.family for item in items}):
        prompts = [item.prompt for item in items if item.family == family]
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=max_new[family], do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def plain_perplexity(model, tokenizer, texts, batch_size: int) -> None:
    import torch

    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.inference_mode():
            logits = model(**batch).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild.evaluation import distributions
    from quantbuild.evaluation.suites import MAX_NEW_TOKENS, run_generative
    from quantbuild.runtimes.torch_stack import TorchRuntime
    from quantbuild.tasks.items import load_items

    torch.manual_seed(0)
    baseline = ROOT / "data" / "baseline" / "workflow-llama-8m"
    tokenizer = AutoTokenizer.from_pretrained(str(baseline))
    model = AutoModelForCausalLM.from_pretrained(str(baseline), dtype=torch.float32).eval()
    families = ("structured", "retrieval", "long_context", "reasoning")
    items = [item for family in families for item in load_items(ROOT / "data" / "eval" / f"{family}.jsonl")[: args.items]]
    texts = [item.prompt for item in load_items(ROOT / "data" / "eval" / "language_modelling.jsonl")[: args.items * 4]]
    tokens = sum(len(ids) - 1 for ids in tokenizer(texts)["input_ids"])
    runtime = TorchRuntime(model, tokenizer, batch_size=args.batch_size)
    reference, _ = distributions.reference_from(runtime.text_positions(texts), 32)

    ours_gen = median_time(lambda: run_generative(runtime, items), args.repeats)
    plain_gen = median_time(lambda: plain_generate(model, tokenizer, items, args.batch_size, MAX_NEW_TOKENS), args.repeats)
    ours_ref = median_time(lambda: distributions.reference_from(runtime.text_positions(texts), 32), args.repeats)
    ours_cmp = median_time(lambda: distributions.compare_from(runtime.text_positions(texts), reference), args.repeats)
    plain_ppl = median_time(lambda: plain_perplexity(model, tokenizer, texts, args.batch_size), args.repeats)

    print(f"{'suite':<44} {'quantbuild':>12} {'plain loop':>12} {'overhead':>9}")
    print(f"{'generative (items/s, ' + str(len(items)) + ' items)':<44} {len(items) / ours_gen:12.2f} "
          f"{len(items) / plain_gen:12.2f} {ours_gen / plain_gen:8.2f}x")
    print(f"{'LM reference pass (tokens/s)':<44} {tokens / ours_ref:12.0f} {tokens / plain_ppl:12.0f} "
          f"{ours_ref / plain_ppl:8.2f}x")
    print(f"{'LM compare: KLD+top-1+ppl (tokens/s)':<44} {tokens / ours_cmp:12.0f} {tokens / plain_ppl:12.0f} "
          f"{ours_cmp / plain_ppl:8.2f}x")


if __name__ == "__main__":
    main()
