"""The eval-item format (one JSON object per line) shared by the generators, the committed
data files and users' own golden-prompt files. `data/README.md` documents it for users.

An item is `{id, family, prompt?, messages?, tools?, expected, scorer, schema?, meta?}`:
`prompt` is the raw text a base model is given; `messages` (system / user / assistant /
tool turns) and `tools` (function definitions) are the same request in the OpenAI chat
shape, rendered through an instruct model's chat template (`quantbuild.prompts`). An item
has at least one of the two. `render_target` turns `expected` into the exact text a base
model should produce after the prompt; training and scoring both go through it, so they
cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantbuild.errors import DataError

FAMILIES = ("language_modelling", "structured", "retrieval", "long_context", "reasoning", "golden")
SCORERS = ("exact", "json_tool_call", "cited_answer", "contains")
REQUIRED = ("id", "family", "expected", "scorer")
OPTIONAL = ("prompt", "messages", "tools", "schema", "meta")
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Item:
    id: str
    family: str
    prompt: str | None
    expected: Any
    scorer: str
    schema: dict | None = None
    meta: dict = field(default_factory=dict)
    messages: list | None = None
    tools: list | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {"id": self.id, "family": self.family}
        if self.prompt is not None:
            record["prompt"] = self.prompt
        if self.messages is not None:
            record["messages"] = self.messages
        if self.tools is not None:
            record["tools"] = self.tools
        record.update({"expected": self.expected, "scorer": self.scorer})
        if self.schema is not None:
            record["schema"] = self.schema
        if self.meta:
            record["meta"] = self.meta
        return json.dumps(record, ensure_ascii=False, sort_keys=False)


def render_target(item: Item) -> str:
    """The completion a perfect model writes after `item.prompt` (before end-of-sequence)."""
    if item.scorer == "json_tool_call":
        return " " + json.dumps(item.expected, ensure_ascii=False)
    if item.scorer == "cited_answer":
        # Citation first: a model that copies the answer and then looks for "the id after
        # this text" finds the *next* document's id; reading the id first avoids that trap.
        return f" [{item.expected['citation']}] {item.expected['answer']}"
    return " " + str(item.expected) if item.expected != "" else ""


def parse_item(record: Any, where: str) -> Item:
    """Validate one decoded JSON value as an item; errors name `where` (file:line)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(record) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}")
    for key in ("id", "family", "scorer") + (("prompt",) if "prompt" in record else ()):
        if not isinstance(record[key], str) or not record[key]:
            raise DataError(f"{where}: field '{key}' must be a non-empty string")
    if "prompt" not in record and "messages" not in record:
        raise DataError(f"{where}: needs 'prompt' (a base model's raw text) or 'messages' (a conversation), or both")
    if "messages" in record:
        _check_messages(record["messages"], where)
    if "tools" in record:
        _check_tools(record["tools"], where)
    if record["scorer"] not in SCORERS:
        raise DataError(f"{where}: unknown scorer '{record['scorer']}' (allowed: {', '.join(SCORERS)})")
    if record["family"] not in FAMILIES:
        raise DataError(f"{where}: unknown family '{record['family']}' (allowed: {', '.join(FAMILIES)})")
    _check_expected(record, where)
    return Item(
        id=record["id"],
        family=record["family"],
        prompt=record.get("prompt"),
        expected=record["expected"],
        scorer=record["scorer"],
        schema=record.get("schema"),
        meta=record.get("meta") or {},
        messages=record.get("messages"),
        tools=record.get("tools"),
    )


def _check_messages(messages: Any, where: str) -> None:
    """A non-empty list of turns in the OpenAI chat shape, ending with a turn the model answers."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for number, message in enumerate(messages):
        at = f"{where}: messages[{number}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{at}: needs a 'role' of {', '.join(ROLES)}")
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            raise DataError(f"{at}: 'content' must be a string (or null beside 'tool_calls')")
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise DataError(f"{at}: each tool call needs {{\"function\": {{\"name\", \"arguments\"}}}}")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last message is the assistant's: the model has nothing to answer")


def _check_tools(tools: Any, where: str) -> None:
    """Function definitions `{type: function, function: {name, description?, parameters}}`,
    each `parameters` a valid JSON Schema."""
    if not isinstance(tools, list) or not tools:
        raise DataError(f"{where}: 'tools' must be a non-empty list of function definitions")
    for number, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{where}: tools[{number}]: expected {{\"type\": \"function\", \"function\": "
                            f"{{\"name\", \"parameters\"}}}}")
        _check_schema(function.get("parameters", {}), f"{where}: tools[{number}] ({function['name']}) parameters",
                      "'parameters'")


def _check_expected(record: dict, where: str) -> None:
    scorer, expected = record["scorer"], record["expected"]
    if scorer == "json_tool_call":
        if not isinstance(expected, dict) or "schema" not in record:
            raise DataError(f"{where}: scorer json_tool_call needs an object 'expected' and a 'schema'")
        _check_schema(record["schema"], where)
    elif scorer == "cited_answer":
        if not isinstance(expected, dict) or not {"answer", "citation"} <= set(expected):
            raise DataError(f"{where}: scorer cited_answer needs 'expected' = {{answer, citation}}")
    elif not isinstance(expected, str):
        raise DataError(f"{where}: scorer {scorer} needs a string 'expected'")


def _check_schema(schema: Any, where: str, what: str = "'schema'") -> None:
    """A valid JSON Schema, or a DataError naming `where`. Each distinct schema is checked once
    a process: the eval file's 1,200 items share a few tool lists, and checking each copy
    against the metaschema took 3.6 s of a 54 s evaluation."""
    import jsonschema

    key = json.dumps(schema, sort_keys=True, default=repr)
    if key in _VALID_SCHEMAS:
        return
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise DataError(f"{where}: {what} is not a valid JSON Schema: {err.message}") from None
    _VALID_SCHEMAS.add(key)


_VALID_SCHEMAS: set[str] = set()


def read_text_lines(path: Path) -> list[str]:
    """The file's lines; bytes that are not UTF-8 are a DataError naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def load_items(path: Path) -> list[Item]:
    """Read and validate a JSONL file; any bad line is a DataError naming file and line."""
    if not path.is_file():
        raise DataError(f"{path}: eval file not found")
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from None
        item = parse_item(record, where)
        if item.id in seen:
            raise DataError(f"{where}: duplicate id '{item.id}'")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items (the file is empty)")
    return items


def write_items(path: Path, items: list[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(item.to_json() + "\n" for item in items), encoding="utf-8")
