"""Prompt formats: how an item reaches a model as deployed.

A base model is prompted raw (`item.prompt`, today's behaviour). An instruct model carries a
chat template (`chat_template` in `tokenizer_config.json`, `tokenizer.chat_template` in a
GGUF), and every prompt a user sends it is a conversation rendered through that template
with its special tokens parsed as tokens. `PromptFormat` is that choice for one model: it
renders an item's `messages` and `tools` (the OpenAI chat shape) through the template the
deployed artifact carries, and names the syntax its tool calls come back in.

The renderer is Jinja2 in a sandbox with the globals and filters chat templates rely on
(`raise_exception`, `tojson` as transformers defines it, `strftime_now`): the template text
is the deployed artifact's own, and a test checks the rendered tokens against transformers'
`apply_chat_template` on every bundled item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

from quantbuild.errors import DataError
from quantbuild.tasks import tool_calls
from quantbuild.tasks.items import Item

# Conversations a usable chat template must render: system, user and assistant turns; and,
# where it renders tool definitions, an assistant tool call, its result and the answer.
_PLAIN = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
          {"role": "user", "content": "v"}]
_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "a probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "probe", "arguments": {}}}]},
    {"role": "tool", "name": "probe", "content": "r"},
    {"role": "assistant", "content": "a"},
]


class TemplateError(DataError):
    """A chat template that does not render, or does not fit the items or the config."""


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators=None,
            sort_keys: bool = False) -> str:
    # the filter as transformers defines it for chat templates (not Jinja's HTML-safe one)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


@lru_cache(maxsize=8)
def _compiled(source: str) -> Any:
    from datetime import datetime

    from jinja2 import TemplateError as JinjaError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(source)
    except JinjaError as err:
        raise TemplateError(f"chat template does not parse: {err}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special-token strings it may refer to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None,
               add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError as JinjaError

        try:
            return _compiled(self.source).render(messages=messages, tools=tools or None,
                                                 add_generation_prompt=add_generation_prompt,
                                                 bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except (JinjaError, TypeError, KeyError, AttributeError, ValueError) as err:
            raise TemplateError(f"chat template does not render: {type(err).__name__}: {err}") from None

    def supports_tools(self) -> bool:
        """Whether the template renders tool definitions at all."""
        return self.render(_PROBE[:2], [_PROBE_TOOL]) != self.render(_PROBE[:2])


@dataclass(frozen=True)
class PromptFormat:
    """Raw prompts (`template` None) or conversations through a chat template; the syntax
    tool calls come back in."""

    template: Optional[ChatTemplate]
    tool_call_format: str = tool_calls.RAW_JSON

    @property
    def chat(self) -> bool:
        return self.template is not None

    def describe(self) -> dict[str, Any]:
        """What an evaluation record says of how prompts were formed (no template text:
        its digest; the artifact carries the template itself)."""
        if self.template is None:
            return {"prompt_format": "raw", "tool_call_format": self.tool_call_format}
        from quantbuild.hashing import sha256_bytes

        return {"prompt_format": "chat", "tool_call_format": self.tool_call_format,
                "chat_template_sha256": sha256_bytes(self.template.source.encode("utf-8"))}

    def render(self, item: Item) -> str:
        """The text the deployed model is given for `item` (before its tokenizer)."""
        if self.template is None:
            if item.prompt is None:
                raise TemplateError(f"item {item.id}: has only 'messages', and the model has no chat template "
                                    f"(a base model is prompted with 'prompt')")
            return item.prompt
        return self.template.render(item_messages(item), item.tools)

    def check(self, items: list[Item]) -> None:
        """Every item renders, and items that need tools meet a template that has them:
        one TemplateError naming the first item that does not."""
        tools = self.template.supports_tools() if self.template is not None else False
        for item in items:
            if item.tools and self.template is not None and not tools:
                raise TemplateError(f"item {item.id}: needs tools, and the model's chat template renders none")
            try:
                self.render(item)
            except TemplateError as err:
                message = str(err)
                raise TemplateError(message if message.startswith("item ") else f"item {item.id}: {message}") from None


def item_messages(item: Item) -> list[dict]:
    """The conversation an instruct model is given for `item`: its messages, or its raw
    prompt as one user turn."""
    return item.messages if item.messages is not None else [{"role": "user", "content": item.prompt}]


def tokenizer_template(tokenizer: Any) -> Optional[ChatTemplate]:
    """An instruct model's chat template from its (transformers) tokenizer, with its special
    tokens' strings; None for a base model."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    return ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")


def conversation_pair(item: Item, template: ChatTemplate) -> tuple[str, str]:
    """(the request, the answer) of `item` as an instruct model reads them: its conversation
    through `template` up to the assistant's turn, then that turn with the perfect answer
    and the end of turn (where a template renders the two differently, the request is their
    common prefix)."""
    from os.path import commonprefix

    from quantbuild.tasks.chat_forms import answer_message

    messages = item_messages(item)
    request = template.render(messages, item.tools)
    whole = template.render([*messages, answer_message(item)], item.tools, add_generation_prompt=False)
    shared = request if whole.startswith(request) else commonprefix([request, whole])
    return shared, whole[len(shared):]


def prompt_format(template: Optional[str], bos_token: str = "", eos_token: str = "",
                  declared: Optional[str] = None) -> PromptFormat:
    """The format of a model whose artifact carries `template` (None: a base model), with the
    tool-call syntax `declared` in the model config or else detected from the template.

    A template that does not render a plain conversation (nor, where it has tools, a tool
    call and its result), or whose tool-call syntax contradicts the declared one, is a
    TemplateError."""
    if declared is not None:
        tool_calls.check_format(declared)
    if template is None:
        return PromptFormat(None, declared or tool_calls.RAW_JSON)
    chat = ChatTemplate(template, bos_token, eos_token)
    chat.render(_PLAIN)
    if chat.supports_tools():
        chat.render(_PROBE, [_PROBE_TOOL], add_generation_prompt=False)
    detected = tool_calls.detect(template)
    if declared is not None and detected is not None and declared != detected:
        raise TemplateError(f"model.tool_call_format is {declared}, but the chat template writes {detected} tool calls")
    return PromptFormat(chat, declared or detected or tool_calls.RAW_JSON)


def for_artifact(spec: Any, declared: Optional[str] = None) -> PromptFormat:
    """The prompt format of the artifact `spec` loads: its own chat template (read from the
    file, before any model is loaded), or raw prompts for a base model."""
    from quantbuild.runtimes.protocol import chat_format

    found = chat_format(spec)
    try:
        return prompt_format(found.template, found.bos_token, found.eos_token, declared)
    except TemplateError as err:
        raise TemplateError(f"{spec.artifact}: {err}") from None


def check_baseline(folder: Any, items: list[Item], declared: Optional[str] = None) -> PromptFormat:
    """The pinned baseline's prompt format, checked against every eval item before any work:
    its template renders, its tool-call syntax fits the declared one, and every item renders
    (items that need tools meet a template with tools). One TemplateError otherwise."""
    from quantbuild.runtimes.protocol import TORCH, LoadSpec

    prompt_format = for_artifact(LoadSpec(TORCH, folder), declared)
    prompt_format.check(items)
    return prompt_format
