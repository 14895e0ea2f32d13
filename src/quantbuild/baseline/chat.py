"""The bundled instruct model's chat format: a ChatML-style template with tool calls in
`<tool_call>` tags (the Hermes / Qwen convention that llama-server, Ollama and LM Studio
parse), and the tokenizer that goes with it.

    python -m quantbuild.baseline.chat --from data/baseline/workflow-llama-33m --out /tmp/chat-tokenizer

adds `<|im_start|>` and `<|im_end|>` as special tokens to the bundled tokenizer, makes
`<|im_end|>` the end-of-turn (EOS) token, drops the BOS the base tokenizer prepends (a
conversation starts with `<|im_start|>`, so transformers' `apply_chat_template` and
llama.cpp tokenize it alike), and stores the template in `tokenizer_config.json`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantbuild.prompts import ChatTemplate

IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# Every piece of text is an explicit string, so that whitespace does not depend on the
# engine's block trimming (Jinja2 in transformers, minja in llama.cpp).
TEMPLATE = r"""{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] -%}
{%- else -%}
  {%- set system = '' -%}
{%- endif -%}
{%- if system or tools -%}
  {{- '<|im_start|>system\n' + system -}}
  {%- if tools -%}
    {%- if system -%}{{- '\n\n' -}}{%- endif -%}
    {{- 'Tools you may call, one signature per line:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\n</tools>\nCall one as <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>' -}}
  {%- endif -%}
  {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if not loop.first -%}{{- raise_exception('only the first message may be the system message') -}}{%- endif -%}
  {%- elif message['role'] == 'user' -%}
    {{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<|im_start|>assistant' -}}
    {%- if message['content'] -%}{{- '\n' + message['content'] -}}{%- endif -%}
    {%- if message['tool_calls'] is defined and message['tool_calls'] -%}
      {%- for call in message['tool_calls'] -%}
        {%- set function = call['function'] -%}
        {{- '\n<tool_call>\n{"name": ' + (function['name'] | tojson) + ', "arguments": ' -}}
        {%- if function['arguments'] is string -%}
          {{- function['arguments'] -}}
        {%- else -%}
          {{- function['arguments'] | tojson -}}
        {%- endif -%}
        {{- '}\n</tool_call>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
  {%- elif message['role'] == 'tool' -%}
    {{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' -}}
  {%- else -%}
    {{- raise_exception('unknown role: ' + message['role']) -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


CONTEXT = 2048  # the instruct model's context: a system prompt with tool definitions is long


def make_chat_tokenizer(source: Path, out: Path) -> None:
    """The base tokenizer of `source` with the chat tokens, no BOS and the template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer.from_file(str(source / "tokenizer.json"))
    base.post_processor = None
    base.add_special_tokens([AddedToken(IM_START, special=True, normalized=False),
                             AddedToken(IM_END, special=True, normalized=False)])
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    fast = PreTrainedTokenizerFast(tokenizer_object=base, bos_token=config["bos_token"], eos_token=IM_END,
                                   pad_token=config["pad_token"], model_max_length=CONTEXT)
    fast.chat_template = TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # explicit, so llama.cpp's converter writes tokenizer.ggml.add_bos_token = false too
    saved = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    saved = {key: value for key, value in saved.items() if key not in ("is_local", "local_files_only")}
    (out / "tokenizer_config.json").write_text(json.dumps({**saved, "add_bos_token": False}, indent=2) + "\n",
                                               encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a folder with the base tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    make_chat_tokenizer(args.source, args.out)


if __name__ == "__main__":
    main()


def conversation_pieces(template: ChatTemplate, rng: random.Random, mix: dict[str, float]) -> list[tuple[str, bool]]:
    """One training example for an instruct model as (text, is_answer) pieces: prose as it
    is (language modelling), or a conversation of one to three task exchanges rendered
    through `template`, every assistant turn (tool calls, searches, answers) an answer."""
    from quantbuild.tasks import sample_training_item
    from quantbuild.tasks.chat_forms import answer_message

    item = sample_training_item(rng, mix)
    if item.messages is None:
        return [(item.prompt, False)]
    items = [item]
    while item.family != "long_context" and len(items) < 3 and rng.random() < 0.3:
        follow = sample_training_item(rng, {family: weight for family, weight in mix.items()
                                            if family in ("structured", "retrieval", "reasoning")})
        items.append(follow)
    turns: list[dict] = []
    tools: list[dict] = []
    for index, each in enumerate(items):
        turns += each.messages if index == 0 else [turn for turn in each.messages if turn["role"] != "system"]
        turns.append(answer_message(each))
        for tool in each.tools or []:
            if tool not in tools:
                tools.append(tool)
    if rng.random() < 0.25:  # deployments without a system prompt
        turns = [turn for turn in turns if turn["role"] != "system"]
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for end, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = template.render(turns[:end], tools, add_generation_prompt=True)
        full = template.render(turns[: end + 1], tools, add_generation_prompt=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations as growing prefixes")
        pieces += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    return pieces
