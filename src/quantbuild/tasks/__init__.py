"""Task-family generators: deterministic, seeded producers of eval items and training text.

Each family module exposes `make_item(rng, item_id)`-style builders and
`generate(count, seed) -> list[Item]`; the same seed always gives byte-identical items.
"""

import random
from typing import Callable

from quantbuild.tasks import long_context, prose, reasoning, retrieval, tools
from quantbuild.tasks.items import Item, render_target

GENERATORS: dict[str, Callable[[int, int], list[Item]]] = {
    "language_modelling": prose.generate,
    "structured": tools.generate,
    "retrieval": retrieval.generate,
    "long_context": long_context.generate,
    "reasoning": reasoning.generate,
}


def training_pair(item: Item) -> tuple[str, str]:
    """(prompt, target) of one item; the target is what the loss weighs up in training."""
    return item.prompt, render_target(item)


def training_text(item: Item) -> str:
    """What the model is trained on for one item: prompt followed by its target."""
    return item.prompt + render_target(item)


def sample_training_item(rng: random.Random, weights: dict[str, float]) -> Item:
    """One fresh training item drawn from the family mix (never from the eval seeds)."""
    family = rng.choices(sorted(weights), [weights[name] for name in sorted(weights)])[0]
    item_id = f"train-{family}"
    if family == "language_modelling":
        return Item(item_id, family, prose.paragraph(rng), "", "contains")
    if family == "structured":
        return tools.make_item(rng, item_id)
    if family == "retrieval":
        return retrieval.make_item(rng, item_id)
    if family == "long_context":
        tokens = rng.choice(sorted(long_context.WORDS_FOR_TOKENS))
        return long_context.make_item(rng, item_id, tokens, rng.random() * 0.9 + 0.05, rng.randint(0, 3))
    return reasoning.make_item(rng, item_id)
