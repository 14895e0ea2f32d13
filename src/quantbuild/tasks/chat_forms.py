"""The task families as conversations: the same requests in the OpenAI chat shape that an
instruct model is deployed with (system / user / assistant / tool turns, tool definitions).

A structured item offers its tool among distractors and expects a tool call; a retrieval item
is a search turn: the user asks, the assistant calls `search_documents`, the tool turn holds
the documents, and the answer cites the one it used; reasoning and long-context items are a
user turn. `answer_message` is the assistant turn a perfect model writes, the training target
of an instruct model (rendered through its template, as scoring parses it).
"""

from __future__ import annotations

from typing import Any

SYSTEM = ("You are a workflow assistant. Call a tool when a request needs one; otherwise answer in a few words, "
          "citing the document an answer comes from.")
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search_documents", "description": "Search the document store; returns numbered documents.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "minLength": 1}},
                   "required": ["query"]}}}


def question_turns(content: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def search_turns(question: str, documents: str) -> list[dict[str, Any]]:
    """A question answered from documents a search tool returned."""
    call = {"type": "function", "function": {"name": "search_documents", "arguments": {"query": question}}}
    return [*question_turns(question), {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "name": "search_documents", "content": documents}]


def answer_message(item: Any) -> dict[str, Any]:
    """The assistant turn that answers `item` perfectly."""
    if item.scorer == "json_tool_call":
        call = {"type": "function", "function": {"name": item.expected["name"], "arguments": item.expected["arguments"]}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if item.scorer == "cited_answer":
        return {"role": "assistant", "content": f"[{item.expected['citation']}] {item.expected['answer']}"}
    return {"role": "assistant", "content": str(item.expected)}
