"""Greedy, batched generation through `transformers`' own `generate`: the runtime path a
user deploys with, so what we score is what they get."""

from __future__ import annotations

from typing import Any

MAX_NEW_TOKENS = {"structured": 72, "retrieval": 20, "long_context": 8, "reasoning": 8, "golden": 64}


def generate_greedy(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Completions (special tokens removed) for `prompts`, in order.

    Prompts are sorted by length inside the call so batches pad little; greedy decoding
    makes the result independent of that order.
    """
    import torch

    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    outputs: dict[int, str] = {}
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer([prompts[index] for index in chunk], return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        for index, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[index] = text
    return [outputs[index] for index in range(len(prompts))]
