"""Tool calls in the syntax each model family writes them, parsed back into `{name, arguments}`.

A chat model answers a request for a tool in its own wrapper, and a deployed runtime parses
that wrapper (llama-server `--jinja`, Ollama). The structured family scores what such a
parser gets out of the model's text:

| format | what the model writes |
|---|---|
| `hermes` | `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen 2.5/3, Hermes) |
| `llama3_json` | `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>` (Llama 3.1-3.3) |
| `mistral` | `[TOOL_CALLS][{"name": ..., "arguments": {...}}]` (Mistral v3 tokenizers) |
| `raw_json` | `{"name": ..., "arguments": {...}}` and nothing else (quantbuild's base models) |

`parse` tells a malformed wrapper (the tags or the list around the call are missing, unclosed
or followed by other text) apart from a well-formed wrapper holding JSON that does not parse:
the first is a failure of the format itself, which a quantized model shows first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from quantbuild.errors import ConfigError

HERMES, LLAMA3_JSON, MISTRAL, RAW_JSON = "hermes", "llama3_json", "mistral", "raw_json"
FORMATS = (HERMES, LLAMA3_JSON, MISTRAL, RAW_JSON)
_HERMES_CALL = re.compile(r"<tool_call>\s*(?P<body>.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"


@dataclass(frozen=True)
class ParsedCall:
    """What a runtime's parser gets from one completion: `wrapper` (the format's wrapper is
    present and well formed), `call` ({name, arguments} or None when nothing parses)."""

    wrapper: bool
    call: Optional[dict]


def check_format(name: str) -> str:
    if name not in FORMATS:
        raise ConfigError(f"tool_call_format {name!r}: unknown (one of {', '.join(FORMATS)})")
    return name


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _call(value: Any, arguments_key: str = "arguments") -> Optional[dict]:
    """{name, arguments} from a decoded call object, or None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or arguments_key not in value:
        return None
    arguments = value[arguments_key]
    if isinstance(arguments, str):  # some templates and models pass the arguments JSON-encoded
        arguments = _json(arguments)
    if not isinstance(arguments, dict):
        return None
    extra = set(value) - {"name", arguments_key, "type", "id"}
    return None if extra else {"name": value["name"], "arguments": arguments}


def parse(format_name: str, text: str) -> ParsedCall:
    """The first tool call of `text` in `format_name`'s syntax."""
    stripped = text.strip()
    if format_name == HERMES:
        match = _HERMES_CALL.search(stripped)
        if match is None:
            return ParsedCall(False, None)
        # one or more whole calls and nothing else around them
        rest = _HERMES_CALL.sub("", stripped).strip()
        return ParsedCall(not rest, _call(_json(match.group("body"))))
    if format_name == MISTRAL:
        if not stripped.startswith(_MISTRAL_TAG):
            return ParsedCall(False, None)
        calls = _json(stripped[len(_MISTRAL_TAG):].strip())
        if not isinstance(calls, list) or not calls:
            return ParsedCall(False, None)
        return ParsedCall(True, _call(calls[0]))
    if format_name == LLAMA3_JSON:
        body = stripped[len(_PYTHON_TAG):].strip() if stripped.startswith(_PYTHON_TAG) else stripped
        value = _json(body)
        return ParsedCall(isinstance(value, dict), _call(value, "parameters"))
    check_format(format_name)
    value = _json(stripped)
    return ParsedCall(isinstance(value, dict), _call(value))


def write(format_name: str, call: dict) -> str:
    """`call` as a model of `format_name` writes it (what a perfect answer looks like)."""
    body = {"name": call["name"], "arguments": call["arguments"]}
    if format_name == HERMES:
        return "<tool_call>\n" + json.dumps(body, ensure_ascii=False) + "\n</tool_call>"
    if format_name == MISTRAL:
        return _MISTRAL_TAG + json.dumps([body], ensure_ascii=False)
    if format_name == LLAMA3_JSON:
        return json.dumps({"name": call["name"], "parameters": call["arguments"]}, ensure_ascii=False)
    check_format(format_name)
    return json.dumps(body, ensure_ascii=False)


# Markers a chat template writes when it renders tool calls in each syntax, strongest first.
_MARKERS = ((HERMES, ("<tool_call>",)), (MISTRAL, ("[TOOL_CALLS]",)), (LLAMA3_JSON, ("<|python_tag|>", "ipython")))


def detect(template: str) -> Optional[str]:
    """The tool-call syntax a chat template renders, or None when it shows no known one."""
    for name, markers in _MARKERS:
        if any(marker in template for marker in markers):
            return name
    return None
