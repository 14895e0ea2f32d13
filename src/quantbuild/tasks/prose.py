"""Language-modelling text: short paragraphs about an invented world.

Templates keep the text learnable by a few-million-parameter model while invented names
and numbers keep it from being memorisable, so held-out perplexity still means something.
Also the filler for long-context prompts.
"""

import random

from quantbuild.tasks import names as n
from quantbuild.tasks.items import Item

_OPENERS = [
    "{town} is a {size} town on the {dir} bank of the river {river}.",
    "The town of {town} lies {dir} of the river {river}.",
    "Few travellers reach {town}, a {size} town near the river {river}.",
]
_SENTENCES = [
    "Its people grow {crop} and trade {good} with {town2}.",
    "Every {season}, the guild of {town} holds a fair where {good} is sold.",
    "The road from {town} to {town2} takes {days} days on foot.",
    "In {season} the river {river} floods the fields of {crop}.",
    "{person} keeps the old mill, which grinds {crop} for the whole valley.",
    "Merchants from {town2} pay for {good} in silver coins.",
    "The bridge over the {river} was rebuilt after the flood of {year}.",
    "{person} wrote that the {season} market of {town} was the largest in the north.",
    "About {pop} people live in {town}, most of them farmers.",
    "When the {good} mines closed, many families moved to {town2}.",
]


def _slots(rng: random.Random) -> dict:
    return {
        "town": n.invented_name(rng),
        "town2": n.invented_name(rng),
        "river": n.invented_name(rng, 1),
        "size": rng.choice(["small", "quiet", "busy", "old", "walled"]),
        "dir": rng.choice(n.DIRECTIONS),
        "crop": rng.choice(n.CROPS),
        "good": rng.choice(n.GOODS),
        "season": rng.choice(n.SEASONS),
        "days": rng.randint(2, 19),
        "person": n.person(rng),
        "year": rng.randint(1100, 1899),
        "pop": rng.randint(2, 90) * 100,
    }


def paragraph(rng: random.Random, sentences: int | None = None) -> str:
    """One paragraph: an opener plus 3-6 sentences sharing the same town and river."""
    slots = _slots(rng)
    count = sentences if sentences is not None else rng.randint(3, 6)
    body = [rng.choice(_OPENERS)] + rng.sample(_SENTENCES, min(count, len(_SENTENCES)))
    return " ".join(template.format(**slots) for template in body)


def generate(count: int, seed: int) -> list[Item]:
    """Held-out language-modelling items: the whole paragraph is scored by perplexity."""
    rng = random.Random(f"language_modelling:{seed}")
    items = []
    for index in range(count):
        text = paragraph(rng)
        items.append(
            Item(
                id=f"lm-{seed}-{index:05d}",
                family="language_modelling",
                prompt=text,
                expected="",
                scorer="contains",
            )
        )
    return items
