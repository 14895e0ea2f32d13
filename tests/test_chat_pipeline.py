"""The bundled instruct model through the whole pipeline (issue #25): every item, probe and
conversational calibration source through its chat template, tool calls parsed in its own
syntax, degenerate output gated, a bundle that carries the template. A file of its own, so it
runs on another core than the shared project's tests."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import BIN, QUANTIZED, REPO, dvc, run, small_project, stages_run
from quantbuild.config import compose

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
CHAT = REPO / "data" / "baseline" / "workflow-chat-33m"


def test_the_chat_model_runs_the_pipeline_through_its_template(tmp_path):
    """`model=workflow-chat-33m`: `dvc repro` through package on the shared repo's small
    settings and ladder (three timed rounds: one round of two tokens on this larger model is
    all noise), then `quantbuild verify --behaviour` on the bundle."""
    from transformers import AutoTokenizer

    from quantbuild.plan_validation import _positions, validation_texts
    from quantbuild.prompts import for_artifact, tokenizer_template
    from quantbuild.runtimes.gguf_file import metadata
    from quantbuild.runtimes.llama_cpp import LlamaCppModel
    from quantbuild.runtimes.protocol import LoadSpec
    from quantbuild.tasks import tool_calls
    from quantbuild.tasks.items import load_items

    root = small_project(tmp_path / "chat")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"] = compose(REPO / "conf", ["model=workflow-chat-33m"])["model"]
    params["eval"]["latency"].update(repeats=3)
    params["eval"]["store_generations"] = True
    params["gate"]["max_latency_paired_ratio"] = 100.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {"fetch", "gguf_base", f"quantize@{QUANTIZED}", "evaluate_baseline@llama.cpp-cpu", "select", "package"} <= \
        stages_run(result.stdout)
    assert "fetched workflow-chat-33m: 12 files match their pins" in result.stdout

    # calibration and the importance matrix read the conversational sources through the template
    calibration = json.loads((root / "artifacts" / "calibration" / "calibration_record.json").read_text())
    chat_sources = {name for name, source in calibration["composition"].items() if source["chat_template"]}
    assert chat_sources == {"workflow_prompts", "tool_calls", "long_context"}

    # the baseline was prompted through the GGUF's own template, with calls parsed as hermes
    evaluation = root / "artifacts" / "eval" / "llama.cpp-cpu" / "baseline"
    measured = json.loads((evaluation / "measurements.json").read_text())
    assert measured["prompts"]["prompt_format"] == "chat" and measured["prompts"]["tool_call_format"] == "hermes"
    assert measured["families"]["structured"]["wrapper"] == 1.0 and measured["families"]["structured"]["score"] == 1.0
    # no false positives of the degenerate check on the baseline's own outputs
    assert measured["families"]["degenerate"]["items"] == 0 and measured["families"]["degenerate"]["n"] == 16
    generations = [json.loads(line) for line in (evaluation / "generations.jsonl").read_text().splitlines()]
    calls = [record["output"] for record in generations if record["id"].startswith("structured")]
    assert calls and all(tool_calls.parse("hermes", output).wrapper for output in calls)
    assert all(record["output"].startswith("[D") for record in generations if record["id"].startswith("retrieval"))

    # llama.cpp's tokens of the rendering equal transformers' apply_chat_template, every item
    base = root / "artifacts" / "gguf" / "base.gguf"
    fmt = for_artifact(LoadSpec("llama.cpp", base))
    tokenizer = AutoTokenizer.from_pretrained(str(CHAT))
    items = [item for family in ("structured", "retrieval", "long_context", "reasoning")
             for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")]
    with LlamaCppModel(base, n_ctx=2048, threads=1) as model:
        for item in items:
            theirs = tokenizer.apply_chat_template(item.messages, tools=item.tools, add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
            assert model.tokenize(fmt.render(item), special=True) == list(theirs), item.id
        # a plan's validation scores the model's conversations as the model reads them: the
        # template's markers are tokens, not text (issue #28)
        drawn = validation_texts(1, lambda value: 1, template=tokenizer_template(tokenizer))
        conversation = drawn["eval"][0][0]
        im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        (_, special), (_, plain) = (next(_positions(model, [conversation], parse)) for parse in (True, False))
        assert list(special) == model.tokenize(conversation, special=True)[1:] and im_start in list(special)
        assert im_start not in list(plain) and len(plain) > len(special)

    decision = json.loads((root / "artifacts" / "release" / "decision.json").read_text())
    assert decision["chosen"] in decision["variants"]
    for entry in decision["variants"].values():
        degenerate = next(check for check in entry["checks"] if check["budget"] == "degenerate_increase")
        assert degenerate["n"] == 16 and degenerate["baseline_items"] == 0

    # the bundle: the GGUF carries the template and end of turn; the Modelfile renders the same
    bundle = root / "artifacts" / "package" / f"workflow-chat-33m-{decision['chosen']}"
    values = metadata(bundle / "model.gguf")
    assert values["tokenizer.chat_template"] == (CHAT / "chat_template.jinja").read_text()
    assert values["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    modelfile = (bundle / "Modelfile").read_text()
    assert "<|im_start|>assistant" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    verify = run(root, str(BIN / "quantbuild"), "verify", str(bundle.relative_to(root)), "--behaviour")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    behaviour = json.loads((bundle / "targets" / "llama.cpp-cpu" / "behaviour.json").read_text())
    assert behaviour["prompt_format"] == "chat" and behaviour["tool_call_format"] == "hermes"

    # llama-server --jinja on the released file: its own rendering of the GGUF's template is
    # quantbuild's, item for item; it answers a chat and parses the model's tool call
    sample = [item for family in ("structured", "retrieval", "long_context", "reasoning")
              for item in load_items(REPO / "data" / "eval" / f"{family}.jsonl")[:25]]
    with llama_server(bundle / "model.gguf", tmp_path / "server.log") as server:
        for item in sample:
            rendered = server("/apply-template", {"messages": openai_messages(item.messages), "tools": item.tools})
            assert rendered["prompt"] == fmt.render(item), item.id
        answer = server("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is 30 + 42?"}],
                                                 "temperature": 0, "max_tokens": 16})
        assert answer["choices"][0]["message"]["content"].strip() == "72"
        assert answer["choices"][0]["finish_reason"] == "stop"
        tool = next(item for item in sample if item.family == "structured")
        called = server("/v1/chat/completions", {"messages": openai_messages(tool.messages), "tools": tool.tools,
                                                 "temperature": 0, "max_tokens": 96})
        message = called["choices"][0]["message"]
        assert called["choices"][0]["finish_reason"] == "tool_calls" and len(message["tool_calls"]) == 1
        function = message["tool_calls"][0]["function"]
        assert {"name": function["name"], "arguments": json.loads(function["arguments"])} == tool.expected


def openai_messages(messages: list[dict]) -> list[dict]:
    """The turns as an OpenAI client sends them: tool-call arguments JSON-encoded."""
    sent = []
    for message in messages:
        calls = [{**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
                 for call in message.get("tool_calls") or []]
        sent.append({**message, "tool_calls": calls} if calls else message)
    return sent


@contextmanager
def llama_server(model: Path, log: Path):
    """llama-server (built by `make install` from the pinned tree) on 127.0.0.1 serving
    `model` with its chat template (`--jinja`); yields `post(path, body) -> JSON`."""
    from quantbuild.fingerprint import cpu_info
    from quantbuild.runtimes.llama_build import repack_allowed, tool

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [str(tool("llama-server")), "-m", str(model), "--jinja", "--host", "127.0.0.1", "--port", str(port),
            "-c", "2048", "-np", "1", "-t", "2"]
    if not repack_allowed(cpu_info()["isa"]):
        args.append("--no-repack")
    url = f"http://127.0.0.1:{port}"

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())

    with log.open("w") as output:
        server = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
            yield post
        finally:
            server.terminate()
            server.wait(timeout=30)
