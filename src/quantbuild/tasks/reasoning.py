"""Reasoning: short exact-answer problems a small model can learn (comparison, small
arithmetic, counting, sequences, minimum of a list)."""

import random
from typing import Callable

from quantbuild.tasks import names as n
from quantbuild.tasks.chat_forms import question_turns
from quantbuild.tasks.items import Item


def _compare(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10, 100), 2)
    return f"Which is larger: {a} or {b}?", str(max(a, b))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 49), rng.randint(10, 49)
    return f"What is {a} + {b}?", str(a + b)


def _subtract(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(20, 99)
    b = rng.randint(1, a)
    return f"What is {a} - {b}?", str(a - b)


def _count(rng: random.Random) -> tuple[str, str]:
    target = rng.choice(n.FRUITS)
    basket = [rng.choice(n.FRUITS) for _ in range(rng.randint(3, 8))]
    return f"How many times does {target} appear in: {', '.join(basket)}?", str(basket.count(target))


def _sequence(rng: random.Random) -> tuple[str, str]:
    start, step = rng.randint(1, 30), rng.randint(1, 9)
    terms = [start + step * k for k in range(4)]
    return f"What comes next: {', '.join(map(str, terms))}?", str(start + step * 4)


def _minimum(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(1, 100), rng.randint(3, 5))
    return f"What is the smallest of {', '.join(map(str, values))}?", str(min(values))


_KINDS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "compare": _compare,
    "add": _add,
    "subtract": _subtract,
    "count": _count,
    "sequence": _sequence,
    "minimum": _minimum,
}


def make_item(rng: random.Random, item_id: str) -> Item:
    kind = rng.choice(sorted(_KINDS))
    question, answer = _KINDS[kind](rng)
    return Item(
        id=item_id,
        family="reasoning",
        prompt=f"Question: {question}\nAnswer:",
        messages=question_turns(question),
        expected=answer,
        scorer="exact",
        meta={"kind": kind},
    )


def generate(count: int, seed: int) -> list[Item]:
    rng = random.Random(f"reasoning:{seed}")
    return [make_item(rng, f"reasoning-{seed}-{index:05d}") for index in range(count)]
