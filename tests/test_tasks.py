"""Task-family generators and the eval-item format."""

import json
from pathlib import Path

import jsonschema
import pytest

from conftest import REPO
from quantbuild.errors import DataError
from quantbuild.tasks import GENERATORS, calibration_sources
from quantbuild.tasks.items import FAMILIES, SCORERS, load_items, render_target
from quantbuild.tasks.write_data import CALIBRATION_COUNTS, EVAL_COUNTS, GOLDEN_EXAMPLE, write_all


@pytest.mark.parametrize("family", sorted(GENERATORS))
def test_generator_is_deterministic_and_seed_sensitive(family):
    generate = GENERATORS[family]
    first = [item.to_json() for item in generate(20, 7)]
    assert first == [item.to_json() for item in generate(20, 7)]
    other = [item.to_json() for item in generate(20, 8)]
    assert not set(first) & set(other)


def test_committed_data_is_what_the_generators_write(tmp_path):
    write_all(tmp_path)
    for family in EVAL_COUNTS:
        assert (tmp_path / "eval" / f"{family}.jsonl").read_bytes() == (REPO / "data" / "eval" / f"{family}.jsonl").read_bytes()
    for source in CALIBRATION_COUNTS:
        path = Path("calibration") / f"{source}.jsonl"
        assert (tmp_path / path).read_bytes() == (REPO / "data" / path).read_bytes()
    assert (tmp_path / GOLDEN_EXAMPLE).read_bytes() == (REPO / "data" / GOLDEN_EXAMPLE).read_bytes()
    # the example golden family validates and shares no item with the eval files
    golden = load_items(REPO / "data" / GOLDEN_EXAMPLE)
    assert len(golden) == 80 and {item.family for item in golden} == {"golden"}
    prompts = {item.prompt for family in EVAL_COUNTS for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")}
    assert not prompts & {item.prompt for item in golden}


def test_nothing_a_method_tunes_on_is_what_it_is_judged_on():
    """Each use of the generators draws at a seed of its own; the golden example shares no
    prompt with the eval files or the sensitivity stage's family items (the planner tuned
    on them: they once were the same items), nor do the items plans are checked on, and the
    validation texts share none with any of them."""
    from transformers import AutoTokenizer

    from conftest import BASELINE
    from quantbuild.plan_validation import validation_texts
    from quantbuild.probes import FAMILIES, check_items
    from quantbuild.tasks import GENERATORS
    from quantbuild.tasks import write_data
    from quantbuild.tasks.write_data import SENSITIVITY_ITEMS, SENSITIVITY_SEED

    seeds = [write_data.EVAL_SEED, write_data.CALIBRATION_SEED, SENSITIVITY_SEED, write_data.PLAN_CHECK_SEED,
             write_data.GOLDEN_SEED, write_data.VALIDATION_SEED]
    assert len(set(seeds)) == len(seeds)
    golden = {item.prompt for item in load_items(REPO / "data" / GOLDEN_EXAMPLE)}
    planner: set = set()
    for family in FAMILIES:
        tuned = {item.prompt for item in GENERATORS[family](SENSITIVITY_ITEMS, SENSITIVITY_SEED)}
        evaluated = {item.prompt for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")}
        assert not tuned & golden, family
        # the items whole plans are checked on: neither the table's, nor judged ones
        checked = {item.prompt for item in check_items(family)}
        assert checked and not checked & (tuned | golden | evaluated), family
        planner |= tuned | checked
    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    drawn = validation_texts(6000, lambda value: len(tokenizer(value, verbose=False)["input_ids"]))
    judged = planner | golden | {item.prompt for family in EVAL_COUNTS
                                 for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")}
    assert not any(text.startswith(prompt) for texts, _ in drawn.values() for text in texts for prompt in judged
                   if text[:40] == prompt[:40])


@pytest.mark.parametrize("family", sorted(EVAL_COUNTS))
def test_committed_eval_items_validate(family):
    items = load_items(REPO / "data" / "eval" / f"{family}.jsonl")
    assert len(items) == EVAL_COUNTS[family]
    for item in items:
        assert item.family == family and item.scorer in SCORERS
        if item.scorer == "json_tool_call":
            jsonschema.validate(item.expected, item.schema)
            assert json.loads(render_target(item)) == item.expected


def test_structured_family_covers_every_argument_kind():
    items = load_items(REPO / "data" / "eval" / "structured.jsonl")
    tools = {item.expected["name"] for item in items}
    assert len(tools) >= 6
    values = [value for item in items for value in item.expected["arguments"].values()]
    assert {type(value) for value in values} >= {str, int, list, dict}
    schemas = [item.schema["properties"]["arguments"] for item in items]
    assert any(set(schema["required"]) < set(schema["properties"]) for schema in schemas)  # optional fields
    assert any("enum" in prop for schema in schemas for prop in schema["properties"].values())


def test_long_context_reaches_the_trained_length():
    from transformers import AutoTokenizer

    from conftest import BASELINE

    tokenizer = AutoTokenizer.from_pretrained(str(BASELINE))
    items = [item for item in load_items(REPO / "data" / "eval" / "long_context.jsonl") if item.meta["tokens"] == 1024]
    lengths = [len(tokenizer(item.prompt + render_target(item))["input_ids"]) for item in items]
    assert min(lengths) >= 900 and max(lengths) <= 1024


def test_retrieval_items_have_distractors():
    items = load_items(REPO / "data" / "eval" / "retrieval.jsonl")
    assert all(item.prompt.count("\n[D") >= 3 for item in items)
    assert all(f"[{item.expected['citation']}]" in item.prompt for item in items)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a", "family": "reasoning", "prompt": "p", "scorer": "exact"}', "missing field(s) expected"),
        ('{"id": "a", "family": "reasoning", "prompt": "p", "expected": "1", "scorer": "fuzzy"}', "unknown scorer 'fuzzy'"),
        ('{"id": "a", "family": "poetry", "prompt": "p", "expected": "1", "scorer": "exact"}', "unknown family 'poetry'"),
        ('{"id": "a", "family": "reasoning", "prompt": "p", "expected": "1", "scorer": "exact"', "invalid JSON"),
        ('{"id": "a", "family": "structured", "prompt": "p", "expected": {}, "scorer": "json_tool_call", "schema": {"type": 5}}',
         "not a valid JSON Schema"),
        # instruct-model items (issue #25): a conversation instead of, or beside, the raw prompt
        ('{"id": "a", "family": "reasoning", "expected": "1", "scorer": "exact"}', "needs 'prompt'"),
        ('{"id": "a", "family": "reasoning", "messages": [], "expected": "1", "scorer": "exact"}',
         "'messages' must be a non-empty list"),
        ('{"id": "a", "family": "reasoning", "messages": [{"role": "robot", "content": "x"}], "expected": "1", '
         '"scorer": "exact"}', "messages[0]: needs a 'role'"),
        ('{"id": "a", "family": "reasoning", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
         '"content": "1"}], "expected": "1", "scorer": "exact"}', "the last message is the assistant's"),
        ('{"id": "a", "family": "reasoning", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": '
         '"function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "expected": "1", "scorer": "exact"}',
         "tools[0] (f) parameters: 'parameters' is not a valid JSON Schema"),
        ('{"id": "a", "family": "reasoning", "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f"}], '
         '"expected": "1", "scorer": "exact"}', "tools[0]: expected"),
    ],
)
def test_bad_lines_are_rejected_with_file_and_line(tmp_path, line, message):
    good = '{"id": "ok", "family": "reasoning", "prompt": "p", "expected": "1", "scorer": "exact"}'
    path = tmp_path / "golden.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        load_items(path)
    assert f"{path}:2" in str(err.value) and message in str(err.value)


def test_each_schema_is_checked_once_and_a_bad_one_every_time(tmp_path):
    """The schema check remembers the schemas it passed (the eval file repeats a few tool
    lists 300 times), never one it refused, nor one that only looks like a passed one."""
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    line = {"id": "s0", "family": "structured", "prompt": "p", "expected": {}, "scorer": "json_tool_call",
            "schema": schema}
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({**line, "id": f"s{n}"}) + "\n" for n in range(3)))
    assert len(load_items(good)) == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**line, "schema": {**schema, "properties": {"x": {"type": "integr"}}}}) + "\n")
    for _ in range(2):
        with pytest.raises(DataError, match=r"bad.jsonl:1: 'schema' is not a valid JSON Schema"):
            load_items(bad)
    assert len(load_items(good)) == 3


def test_bytes_that_are_not_utf8_are_one_line_naming_file_and_line(tmp_path):
    from quantbuild.tasks.calibration_sources import load_source

    good = b'{"id": "ok", "family": "reasoning", "prompt": "p", "expected": "1", "scorer": "exact"}\n'
    path = tmp_path / "golden.jsonl"
    path.write_bytes(good + b'{"id": "b\xff", "family": "reasoning"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 \(byte 0xff"):
        load_items(path)
    (tmp_path / "source.jsonl").write_bytes(b'{"text": "fine"}\n\xfe\n')
    with pytest.raises(DataError, match="source.jsonl:2: not UTF-8"):
        load_source(tmp_path / "source.jsonl")


def test_empty_and_missing_files_are_rejected(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no items"):
        load_items(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="not found"):
        load_items(tmp_path / "absent.jsonl")


def test_calibration_sources_are_deterministic_and_load():
    assert calibration_sources.generate("tool_calls", 5, 3) == calibration_sources.generate("tool_calls", 5, 3)
    texts = calibration_sources.load_source(REPO / "data" / "calibration" / "tool_calls.jsonl")
    assert len(texts) == CALIBRATION_COUNTS["tool_calls"]


def test_families_constant_matches_generators():
    assert set(GENERATORS) <= set(FAMILIES)
