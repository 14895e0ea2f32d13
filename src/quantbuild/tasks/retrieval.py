"""Retrieval: a question over a handful of documents with invented facts; the answer must be
right *and* cite the document it came from. Distractor documents state the same kind of
fact about other entities, so only reading the right document gives the right answer."""

import random

from quantbuild.tasks import names as n
from quantbuild.tasks.chat_forms import SEARCH_TOOL, search_turns
from quantbuild.tasks.items import Item

# (document template, question template, answer template, value); {e} is the entity, {v} the
# value. Value pools are large so that guessing a frequent answer never beats reading.
_RELATIONS = [
    ("The {e} Bridge was built in {v}.", "When was the {e} Bridge built?", "{v}", lambda r: r.randint(1200, 1999)),
    ("Lake {e} is {v} metres deep.", "How deep is Lake {e}?", "{v} metres", lambda r: r.randint(5, 900)),
    ("The {e} Company was founded by {v}.", "Who founded the {e} Company?", "{v}", n.person),
    ("The flag of {e} is {v}.", "What colour is the flag of {e}?", "{v}", lambda r: " and ".join(r.sample(n.COLORS, 2))),
    ("Mount {e} is {v} metres high.", "How high is Mount {e}?", "{v} metres", lambda r: r.randint(300, 8800)),
    ("The {e} Library holds {v} books.", "How many books does the {e} Library hold?", "{v}", lambda r: r.randint(100, 99999)),
    ("The main export of {e} is {v}.", "What is the main export of {e}?", "{v}", lambda r: r.choice(n.EXPORTS)),
]


def make_item(rng: random.Random, item_id: str, documents: int | None = None) -> Item:
    count = documents if documents is not None else rng.randint(3, 6)
    doc_ids = [f"D{number}" for number in rng.sample(range(10, 100), count)]
    facts = []
    for _ in range(count):
        doc_tpl, question_tpl, answer_tpl, value = rng.choice(_RELATIONS)
        entity = n.invented_name(rng)
        facts.append((doc_tpl, question_tpl, answer_tpl, entity, value(rng)))
    target = rng.randrange(count)
    lines = [f"[{doc_id}] " + tpl.format(e=entity, v=val) for doc_id, (tpl, _, _, entity, val) in zip(doc_ids, facts)]
    _, question_tpl, answer_tpl, entity, val = facts[target]
    question = question_tpl.format(e=entity)
    prompt = "Documents:\n" + "\n".join(lines) + f"\nQuestion: {question}\nAnswer:"
    return Item(
        id=item_id,
        family="retrieval",
        prompt=prompt,
        messages=search_turns(question, "\n".join(lines)),
        tools=[SEARCH_TOOL],
        expected={"answer": answer_tpl.format(v=val), "citation": doc_ids[target]},
        scorer="cited_answer",
        meta={"documents": count},
    )


def generate(count: int, seed: int) -> list[Item]:
    rng = random.Random(f"retrieval:{seed}")
    return [make_item(rng, f"retrieval-{seed}-{index:05d}") for index in range(count)]
