"""Long context: a fact (the needle) placed at a chosen depth of a long prompt of prose,
asked back at the end, with distractor facts of the same shape elsewhere in the prompt.

Lengths are measured in words of filler; `WORDS_FOR_TOKENS` maps the token budgets of the
bundled tokenizer to word counts so the longest bucket fills the model's trained length.
"""

import random

from quantbuild.tasks import names as n
from quantbuild.tasks import prose
from quantbuild.tasks.chat_forms import question_turns
from quantbuild.tasks.items import Item

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
# Token budget -> words of filler, calibrated on the bundled tokenizer (about 1.3 tokens a
# word for this prose); the 1024 bucket stays under the 1024-token trained length with the
# question and the answer.
WORDS_FOR_TOKENS = {256: 150, 512: 340, 1024: 700}


def _needle(rng: random.Random, used: set) -> tuple[str, str, str]:
    while True:
        key = (rng.choice(n.COLORS), rng.choice(n.OBJECTS))
        if key not in used:
            used.add(key)
            break
    code = f"{rng.randint(1000, 9999)}"
    return f"The code for the {key[0]} {key[1]} is {code}.", f"What is the code for the {key[0]} {key[1]}?", code


def _filler(rng: random.Random, words: int) -> list[str]:
    sentences: list[str] = []
    total = 0
    while total < words:
        for sentence in prose.paragraph(rng).split(". "):
            sentence = sentence.rstrip(".") + "."
            sentences.append(sentence)
            total += len(sentence.split())
            if total >= words:
                break
    return sentences


def make_item(rng: random.Random, item_id: str, tokens: int, depth: float, distractors: int = 2) -> Item:
    sentences = _filler(rng, WORDS_FOR_TOKENS[tokens])
    used: set = set()
    needle, question, answer = _needle(rng, used)
    for _ in range(distractors):
        other, _, _ = _needle(rng, used)
        sentences.insert(rng.randrange(len(sentences) + 1), other)
    sentences.insert(round(depth * len(sentences)), needle)
    prompt = " ".join(sentences) + f"\nQuestion: {question}\nAnswer:"
    return Item(
        id=item_id,
        family="long_context",
        prompt=prompt,
        messages=question_turns(" ".join(sentences) + f"\n\nQuestion: {question}"),
        expected=answer,
        scorer="exact",
        meta={"tokens": tokens, "depth": depth},
    )


def generate(count: int, seed: int) -> list[Item]:
    """Items cycle over every (length, depth) cell so each cell gets an equal share."""
    rng = random.Random(f"long_context:{seed}")
    cells = [(tokens, depth) for tokens in sorted(WORDS_FOR_TOKENS) for depth in DEPTHS]
    return [
        make_item(rng, f"long_context-{seed}-{index:05d}", *cells[index % len(cells)]) for index in range(count)
    ]
