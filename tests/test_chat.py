"""Instruct models as deployed (issue #25), the parts that need no model: chat templates and
their rendering, tool calls in each model family's syntax, degenerate output, its gate, and
calibration text rendered through the template."""

from __future__ import annotations

import json

import pytest

from conftest import BASELINE, REPO
from quantbuild.baseline.chat import TEMPLATE, make_chat_tokenizer
from quantbuild.config import GateConfig
from quantbuild.errors import DataError
from quantbuild.evaluation import degenerate
from quantbuild.evaluation.scorers import failure, score
from quantbuild.gate import select
from quantbuild.prompts import PromptFormat, TemplateError, prompt_format
from quantbuild.tasks import GENERATORS, render_target, tool_calls
from quantbuild.tasks.items import load_items

CALL = {"name": "create_event", "arguments": {"title": "roadmap call", "date": "2026-05-28", "duration_minutes": 90}}
GENERATIVE = ("structured", "retrieval", "long_context", "reasoning")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """The bundled tokenizer made a chat tokenizer, as bench/chat_model.sh makes it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat-tokenizer")
    make_chat_tokenizer(BASELINE, folder)
    return AutoTokenizer.from_pretrained(str(folder)), folder


@pytest.mark.parametrize("name", tool_calls.FORMATS)
def test_each_syntax_parses_what_its_models_write(name):
    written = tool_calls.write(name, CALL)
    assert tool_calls.parse(name, written) == tool_calls.ParsedCall(True, CALL)
    assert tool_calls.parse(name, "\n" + written + "\n").call == CALL


@pytest.mark.parametrize(("name", "text", "wrapper", "parsed"), [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {}}', False, False),            # never closed
    ("hermes", '{"name": "f", "arguments": {}}', False, False),                          # no tags at all
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {\n</tool_call>', True, False),  # tags fine, JSON not
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and more', False, True),
    ("hermes", '<tool_call>{"name": "f", "parameters": {}}</tool_call>', True, False),   # another family's keys
    ("mistral", '[{"name": "f", "arguments": {}}]', False, False),
    ("mistral", '[TOOL_CALLS]{"name": "f", "arguments": {}}', False, False),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}', True, True),
    ("llama3_json", '{"name": "f", "arguments": {"a": 1}}', True, False),
    ("raw_json", '{"name": "f", "arguments": "{\\"a\\": 1}"}', True, True),               # arguments JSON-encoded
])
def test_malformed_wrappers_are_told_from_bad_json(name, text, wrapper, parsed):
    result = tool_calls.parse(name, text)
    assert result.wrapper is wrapper and (result.call is not None) is parsed


def test_the_structured_scorer_names_a_malformed_wrapper():
    item = next(item for item in GENERATORS["structured"](5, 7))
    good = tool_calls.write("hermes", item.expected)
    assert score(item, good, "hermes") == {"correct": 1.0, "wrapper": 1.0, "parsed": 1.0, "valid": 1.0}
    unclosed = score(item, good.replace("</tool_call>", ""), "hermes")
    assert unclosed["correct"] == 0.0 and failure(unclosed) == "malformed_wrapper"
    assert failure(score(item, render_target(item), "hermes")) == "malformed_wrapper"  # raw JSON: no tags
    assert failure(score(item, render_target(item), "raw_json")) is None
    wrong = dict(item.expected, name="get_weather")
    assert failure(score(item, tool_calls.write("hermes", wrong), "hermes")) == "invalid_arguments"


def test_the_syntax_is_detected_from_the_template():
    assert tool_calls.detect(TEMPLATE) == "hermes"
    assert tool_calls.detect("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert tool_calls.detect("{% if message.role == 'ipython' %}<|python_tag|>{% endif %}") == "llama3_json"
    assert tool_calls.detect("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}") is None
    assert prompt_format(TEMPLATE).tool_call_format == "hermes"
    assert prompt_format(None).tool_call_format == "raw_json" and not prompt_format(None).chat


def test_every_bundled_item_renders_as_transformers_renders_it(chat_tokenizer):
    """quantbuild's renderer (the template text the artifact carries, in a Jinja2 sandbox) and
    transformers' `apply_chat_template` give the same tokens on every bundled item."""
    tokenizer, _ = chat_tokenizer
    fmt = prompt_format(tokenizer.chat_template)
    items = [item for family in GENERATIVE for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")]
    assert len(items) == 1200 and all(item.messages for item in items)
    ours = tokenizer([fmt.render(item) for item in items], add_special_tokens=False)["input_ids"]
    for item, tokens in zip(items, ours):
        theirs = tokenizer.apply_chat_template(item.messages, tools=item.tools, add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
        assert tokens == list(theirs), item.id
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(tokens[0] == im_start and tokens.count(im_start) >= 2 for tokens in ours)


def test_raw_items_on_a_chat_model_become_a_user_turn_and_conversations_need_a_template():
    item = GENERATORS["reasoning"](1, 3)[0]
    chat = prompt_format(TEMPLATE)
    from dataclasses import replace

    raw_only = replace(item, messages=None)
    assert chat.render(raw_only) == f"<|im_start|>user\n{item.prompt}<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TemplateError, match="has only 'messages', and the model has no chat template"):
        PromptFormat(None).render(replace(item, prompt=None))


@pytest.mark.parametrize(("template", "declared", "message"), [
    ("{% for m in messages %}{{ m.content }", None, "does not parse"),
    ("{{ raise_exception('no system role') }}", None, "chat template: no system role"),
    ("{% for m in messages %}{{ m.content.upper(1, 2) }}{% endfor %}", None, "does not render"),
    (TEMPLATE, "mistral", "tool_call_format is mistral, but the chat template writes hermes"),
])
def test_templates_that_do_not_render_or_fit_are_one_line(template, declared, message):
    with pytest.raises(TemplateError) as err:
        prompt_format(template, declared=declared)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_template_without_tool_turns_serves_items_without_tools():
    """Templates that insist on user/assistant alternation (Llama 2, early Mistral) render
    plain conversations and refuse a tool turn: they serve items that need no tools."""
    alternating = ("{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                   "[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    fmt = prompt_format(alternating.replace("messages %}", "messages if m.role != 'system' %}", 1))
    fmt.check(GENERATORS["reasoning"](2, 5))
    with pytest.raises(TemplateError, match="roles must alternate"):
        prompt_format(alternating)  # a system turn first: it cannot render a plain conversation


def test_items_that_need_tools_meet_a_template_without_them():
    no_tools = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}<|im_end|>\n{% endfor %}"
    fmt = prompt_format(no_tools)
    items = GENERATORS["structured"](2, 5)
    with pytest.raises(TemplateError, match=f"item {items[0].id}: needs tools, and the model's chat template renders none"):
        fmt.check(items)
    fmt.check(GENERATORS["reasoning"](2, 5))


def test_degenerate_output_is_found_and_right_answers_are_clean():
    assert degenerate.kinds("ok ok ok ok ok ok ok ok ok ok", True, "ok") == ["loop"]
    assert degenerate.kinds("The answer is 12. The answer is 12. The answer is 12. The", False, "What is 5 + 7? 12") == ["loop", "no_stop"]
    assert degenerate.kinds("1253", False, "1253") == ["no_stop"]
    assert degenerate.kinds("答案是 1253", True, "When was it built? 1253") == ["script"]
    assert degenerate.kinds("\ufffd\ufffd", True, "x") == ["script"]
    # every bundled item's right answer, in both syntaxes, is clean
    for family in GENERATIVE:
        for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl"):
            context = item.prompt + json.dumps(item.expected, ensure_ascii=False)
            assert degenerate.kinds(render_target(item), True, context) == [], item.id
            if item.scorer == "json_tool_call":
                assert degenerate.kinds(tool_calls.write("hermes", item.expected), True, context) == []


def _metrics(clean: list[float]) -> dict:
    ids = [f"i{index:03d}" for index in range(len(clean))]
    return {"perplexity": 2.0, "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0, "deploy_runtime": "llama.cpp",
            "families": {}, "outcomes": {"degenerate": dict(zip(ids, clean))},
            "latency": {}, "memory": {"by_context": {"1024": {"peak_mb": 50.0}}}}


def test_the_gate_pairs_degenerate_items_with_the_baseline():
    gate = GateConfig(max_latency_paired_ratio=None, max_memory_ratio=None)
    base = _metrics([1.0] * 290 + [0.0] * 10)
    records = {"q4": {"method": "gguf", "size_bytes": 500, "bits_per_weight": 4.5}}
    same = select(base, {"q4": _metrics([1.0] * 290 + [0.0] * 10)}, records, gate)
    loops = select(base, {"q4": _metrics([1.0] * 250 + [0.0] * 50)}, records, gate)
    check = next(c for c in loops["variants"]["q4"]["checks"] if c["budget"] == "degenerate_increase")
    assert same["chosen"] == "q4" and loops["chosen"] is None
    assert check["variant_items"] == 50 and check["baseline_items"] == 10 and not check["pass"]
    assert "degenerate_increase" in loops["variants"]["q4"]["reason"]
    off = select(base, {"q4": _metrics([1.0] * 250 + [0.0] * 50)}, records,
                 GateConfig(max_latency_paired_ratio=None, max_memory_ratio=None, max_degenerate_increase=None))
    assert off["chosen"] == "q4"


def test_calibration_renders_conversations_through_the_template_per_source(tmp_path, chat_tokenizer):
    from quantbuild.calibration import compose_calibration, load_calibration
    from quantbuild.config import CalibrationConfig

    tokenizer, folder = chat_tokenizer
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    data = REPO / "data" / "calibration"
    sources = {"tool_calls": 1.0, "domain_text": 1.0}
    on = compose_calibration(CalibrationConfig(sources=sources, samples=8, seq_len=4096), data, folder, tmp_path / "on")
    rows = load_calibration(tmp_path / "on")
    assert on["composition"]["tool_calls"]["chat_template"] and not on["composition"]["domain_text"]["chat_template"]
    assert sum(im_start in row for row in rows) == 4
    off = compose_calibration(CalibrationConfig(sources=sources, samples=8, seq_len=4096, chat={"tool_calls": False}),
                              data, folder, tmp_path / "off")
    assert not off["composition"]["tool_calls"]["chat_template"]
    assert not any(im_start in row for row in load_calibration(tmp_path / "off"))
    (tmp_path / "plain.jsonl").write_text('{"text": "no conversation here"}\n')
    with pytest.raises(DataError, match="calibration.chat.plain is on, and a record has no 'messages'"):
        compose_calibration(CalibrationConfig(sources={"plain": 1.0}, samples=1, chat={"plain": True}), tmp_path,
                            folder, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_an_instruct_model_s_validation_texts_are_its_conversations_through_its_template(chat_tokenizer):
    """Issue #28: a plan is validated on what the deployed model reads. For an instruct model
    the eval-family items and the calibration conversations are rendered through its chat
    template with the perfect answer as the last assistant turn (scored with the template's
    special tokens parsed as tokens: tests/test_chat_pipeline.py); prose stays raw, and a base
    model's texts stay the raw prompt and answer they were."""
    from transformers import AutoTokenizer

    from quantbuild.plan_validation import TEXTS, validation_texts
    from quantbuild.prompts import tokenizer_template

    tokenizer, _ = chat_tokenizer
    template = tokenizer_template(tokenizer)
    assert template is not None and tokenizer_template(AutoTokenizer.from_pretrained(str(BASELINE))) is None
    count = lambda value: len(tokenizer(value, verbose=False)["input_ids"])  # noqa: E731
    chat, raw = validation_texts(3000, count, template=template), validation_texts(3000, count)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for kind in TEXTS:
        assert len(chat[kind][0]) == len(raw[kind][0]) and chat[kind][1] >= 1000, kind
    assert chat["prose"] == raw["prose"]
    # every eval item a conversation ending on its answer turn
    for conversation, plain in zip(chat["eval"][0], raw["eval"][0]):
        head, _, answer = conversation.rpartition("<|im_start|>assistant\n")
        assert head.startswith("<|im_start|>") and answer.endswith("<|im_end|>\n") and len(answer) > len("<|im_end|>\n")
        assert answer.removesuffix("<|im_end|>\n").strip() in plain or "<tool_call>" in answer, (answer, plain)
        assert im_start in tokenizer(conversation, verbose=False)["input_ids"]
    assert not any("<|im_start|>" in text for text in raw["eval"][0] + raw["calibration"][0])
    rendered = [text for text in chat["calibration"][0] if text.startswith("<|im_start|>")]
    assert 0 < len(rendered) < len(chat["calibration"][0])  # conversations rendered, domain prose raw


def test_an_instruct_model_s_planner_probes_score_its_answer_turns_through_its_template(chat_tokenizer):
    """The sensitivity stage chooses a plan on the positions that predict each family's
    answer; for an instruct model those are the assistant turn after its conversation through
    the template (the answer and the end of turn), not a raw prompt it never reads deployed."""
    from transformers import AutoTokenizer

    from quantbuild.config import SensitivityConfig
    from quantbuild.probes import FAMILIES, probe_sets

    tokenizer, _ = chat_tokenizer
    im_start, im_end = (tokenizer.convert_tokens_to_ids(token) for token in ("<|im_start|>", "<|im_end|>"))
    config = SensitivityConfig(samples=1, family_tokens=1536)
    chat, raw = probe_sets(tokenizer, [[1, 2, 3]], config), probe_sets(AutoTokenizer.from_pretrained(str(BASELINE)),
                                                                     [[1, 2, 3]], config)
    for family in FAMILIES:
        assert chat[family] and raw[family], family
        for probe in chat[family]:
            request, answer = probe.ids[:probe.first + 1], probe.ids[probe.first + 1:]
            assert im_start in request and tokenizer.decode(request).rstrip().endswith("assistant"), family
            assert tokenizer.decode(answer).endswith("<|im_end|>\n") and im_end in answer[-2:], family
            assert im_start not in answer
        assert not any(im_start in probe.ids for probe in raw[family])


class _GoJSON:
    """A value Ollama prints through its `String()` method: Go's compact JSON, map keys sorted."""

    def __init__(self, value) -> None:
        self.value = value

    def __str__(self) -> str:
        return json.dumps(self.value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _ollama_values(messages: list[dict], tools: list[dict] | None) -> dict:
    """What Ollama hands a chat template: .System (the system turns joined), .Messages (every
    turn, tool calls as .Function.Name/.Arguments), .Tools."""
    turns = [{"Role": message["role"], "Content": message.get("content") or "",
              "ToolCalls": [{"Function": {"Name": call["function"]["name"],
                                          "Arguments": _GoJSON(call["function"]["arguments"])}}
                            for call in message.get("tool_calls") or []]} for message in messages]
    system = "\n\n".join(message["content"] for message in messages if message["role"] == "system")
    return {"System": system, "Messages": turns, "Tools": [_GoJSON(tool) for tool in tools or []]}


def _canonical_json(text: str) -> str:
    """Every JSON object on a line of its own, re-encoded one way (key order and spacing)."""
    lines = []
    for line in text.split("\n"):
        try:
            lines.append(json.dumps(json.loads(line), sort_keys=True))
        except ValueError:
            lines.append(line)
    return "\n".join(lines)


def test_the_modelfile_template_renders_what_the_chat_template_renders(chat_tokenizer):
    """The bundle's Ollama TEMPLATE (Go) and the GGUF's chat template (Jinja) on the same
    conversations: the same tokens without tools; with tools and tool calls, the same text
    once each JSON object is written one way (Ollama writes Go's compact JSON)."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from gotemplate import render

    from quantbuild.prompts import ChatTemplate
    from quantbuild.release.packaging import CHATML_TOOLS_TEMPLATE

    tokenizer, _ = chat_tokenizer
    template = ChatTemplate(TEMPLATE)
    system = {"role": "system", "content": "You are terse."}
    plain = [
        [{"role": "user", "content": "What is 30 + 42?"}],
        [system, {"role": "user", "content": "What is 30 + 42?"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "What is 30 + 42?"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    ]
    for messages in plain:
        ours, ollama = template.render(messages), render(CHATML_TOOLS_TEMPLATE, _ollama_values(messages, None))
        assert ollama == ours
        assert tokenizer(ollama, add_special_tokens=False)["input_ids"] == \
            tokenizer(ours, add_special_tokens=False)["input_ids"]
    for item in [*GENERATORS["structured"](3, 11), *GENERATORS["retrieval"](3, 11)]:
        ours, ollama = template.render(item.messages, item.tools), render(CHATML_TOOLS_TEMPLATE,
                                                                           _ollama_values(item.messages, item.tools))
        assert _canonical_json(ollama) == _canonical_json(ours), item.id


def test_a_chat_bundles_modelfile_has_the_template_and_its_stops():
    from quantbuild.release.packaging import CHATML_TOOLS_TEMPLATE, modelfile
    from quantbuild.runtimes.protocol import ChatFormat

    manifest = {"bundle": "b", "evaluation": {"variant": {"memory": {"by_context": {"1024": {}}}}},
                "variant": {"parameters": {"kv_cache_type": "f16"}}}
    chat = modelfile(manifest, ChatFormat(TEMPLATE, "<|bos|>", "<|im_end|>"))
    assert f'TEMPLATE """{CHATML_TOOLS_TEMPLATE}"""' in chat and chat.count('PARAMETER stop "<|im_end|>"') == 1
    base = modelfile(manifest, ChatFormat(None), context_length=2048)
    assert 'TEMPLATE """{{ .Prompt }}"""' in base and "PARAMETER stop" not in base
    # decoded as evaluated: greedy, no repetition penalty (Ollama's default 1.1), the trained context
    assert "PARAMETER temperature 0\nPARAMETER repeat_penalty 1\nPARAMETER num_ctx 2048\n" in base
    other = modelfile(manifest, ChatFormat("{% for m in messages %}<|user|>{{ m.content }}<|end|>{% endfor %}", "", "<|end|>"))
    assert "TEMPLATE" not in other.replace("# TEMPLATE", "") and 'PARAMETER stop "<|end|>"' in other


BROKEN = {
    "does_not_parse": ("{% for m in messages %}{{ m.content }", None, None, "chat template does not parse"),
    "wrong_syntax": (TEMPLATE, "mistral", None, "model.tool_call_format is mistral, but the chat template writes hermes"),
    "no_tools": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}<|im_end|>\n{% endfor %}",
                 None, None, "needs tools, and the model's chat template renders none"),
    "messages_on_a_base_model": (None, None,
                                 '{"id": "g1", "family": "golden", "messages": [{"role": "user", "content": "hi"}], '
                                 '"expected": "hello", "scorer": "contains"}',
                                 "item g1: has only 'messages', and the model has no chat template"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_the_pipeline_stops_on_a_template_that_does_not_fit_before_any_work(tmp_path, params, case):
    """Bad instruct-model input (issue #25): the calibrate stage, the first to use the
    template, exits non-zero with one line before any work; earlier artifacts stay."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    template, declared, golden, message = BROKEN[case]
    baseline = tmp_path / "artifacts" / "baseline"
    shutil.copytree(BASELINE, baseline)
    if template is not None:
        (baseline / "chat_template.jinja").write_text(template)
    earlier = tmp_path / "artifacts" / "calibration"
    earlier.mkdir(parents=True)
    (earlier / "calibration_record.json").write_text("{}")
    params["paths"].update(eval_data=str(REPO / "data" / "eval"), calibration_data=str(REPO / "data" / "calibration"))
    params["model"]["tool_call_format"] = declared
    if golden is not None:
        (tmp_path / "data" / "golden").mkdir(parents=True)
        (tmp_path / "data" / "golden" / "mine.jsonl").write_text(golden + "\n")
        params["eval"]["golden"] = {"mine": "data/golden/mine.jsonl"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "stages.calibrate"], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("quantbuild: ") and message in lines[0], result.stderr
    assert sorted(path.name for path in earlier.iterdir()) == ["calibration_record.json"]
    assert (earlier / "calibration_record.json").read_text() == "{}"
