"""Measure the bundled baseline on the held-out eval files, and how round-to-nearest weight
quantization at 8/4/3/2 bits changes each family (the sensitivity table of its model card).

    python -m quantbuild.baseline.report --model data/baseline/workflow-llama-8m --eval data/eval \
        --limit 300 --rtn 8:-1 4:64 3:64 2:64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from quantbuild.evaluation.suites import perplexity, run_generative, summarise
from quantbuild.prompts import prompt_format
from quantbuild.runtimes.torch_stack import TorchRuntime
from quantbuild.tasks.items import load_items

GENERATIVE = ("structured", "retrieval", "long_context", "reasoning")


def measure(model, tokenizer, eval_dir: Path, limit: int, batch_size: int) -> dict:
    lm_texts = [item.prompt for item in load_items(eval_dir / "language_modelling.jsonl")[:limit]]
    items = [item for family in GENERATIVE for item in load_items(eval_dir / f"{family}.jsonl")[:limit]]
    runtime = TorchRuntime(model, tokenizer, batch_size=batch_size)
    # an instruct model is measured through its chat template, a base model on raw prompts
    records = run_generative(runtime, items, prompt_format(tokenizer.chat_template, tokenizer.bos_token or "",
                                                           tokenizer.eos_token or ""))
    result = summarise(items, records)
    result["language_modelling"] = perplexity(runtime, lm_texts)
    long_items = [(item, record) for item, record in zip(items, records) if item.family == "long_context"]
    for length in sorted({item.meta["tokens"] for item, _ in long_items}):
        cell = [record["correct"] for item, record in long_items if item.meta["tokens"] == length]
        result["long_context"][f"recall@{length}"] = sum(cell) / len(cell)
    return result


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantbuild.quantizers.rtn import fake_quantize_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, default=Path("data/eval"))
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rtn", nargs="*", default=[], help="bits:group_size pairs, e.g. 4:64 (-1 = per channel)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    report = {}
    for variant in ["baseline", *args.rtn]:
        model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).to(device).eval()
        if variant != "baseline":
            bits, group = (int(part) for part in variant.split(":"))
            fake_quantize_model(model, bits, group, symmetric=True)
        report[variant] = measure(model, tokenizer, args.eval, args.limit, args.batch_size)
        print(json.dumps({variant: report[variant]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
