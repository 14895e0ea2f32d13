"""Structured output / tool use: a natural-language request becomes one JSON tool call.

Seven tools with typed arguments (strings, integers, enums, booleans, arrays, nested objects,
optional fields), each with a JSON Schema that the generated call must validate against.
"""

import random
from typing import Any, Callable

from quantbuild.tasks import names as n
from quantbuild.tasks.chat_forms import question_turns
from quantbuild.tasks.items import Item

_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer"}


def _enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


UNITS = ("celsius", "fahrenheit")
PRIORITIES = ("low", "normal", "high")
EXTENSIONS = ("pdf", "docx", "csv", "txt", "png")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF")

ARGUMENT_SCHEMAS: dict[str, dict] = {
    "get_weather": {
        "properties": {"city": _STR, "unit": _enum(*UNITS), "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["city", "unit"],
    },
    "create_event": {
        "properties": {
            "title": _STR,
            "date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
            "duration_minutes": {"type": "integer", "minimum": 5},
            "attendees": {"type": "array", "items": _STR},
        },
        "required": ["title", "date", "duration_minutes"],
    },
    "send_email": {
        "properties": {"to": {"type": "string", "pattern": "@"}, "subject": _STR, "priority": _enum(*PRIORITIES)},
        "required": ["to", "subject", "priority"],
    },
    "search_files": {
        "properties": {
            "query": _STR,
            "max_results": {"type": "integer", "minimum": 1, "maximum": 100},
            "filters": {
                "type": "object",
                "properties": {"extension": _enum(*EXTENSIONS), "modified_after": {"type": "string"}},
                "required": ["extension"],
                "additionalProperties": False,
            },
        },
        "required": ["query", "max_results"],
    },
    "set_reminder": {
        "properties": {"text": _STR, "minutes": {"type": "integer", "minimum": 1}},
        "required": ["text", "minutes"],
    },
    "convert_currency": {
        "properties": {"amount": {"type": "integer", "minimum": 0}, "source": _enum(*CURRENCIES), "target": _enum(*CURRENCIES)},
        "required": ["amount", "source", "target"],
    },
    "book_table": {
        "properties": {
            "restaurant": _STR,
            "party_size": {"type": "integer", "minimum": 1, "maximum": 20},
            "time": {"type": "string", "pattern": r"^\d{2}:\d{2}$"},
            "options": {
                "type": "object",
                "properties": {"outdoor": {"type": "boolean"}, "note": {"type": "string"}},
                "required": ["outdoor"],
                "additionalProperties": False,
            },
        },
        "required": ["restaurant", "party_size", "time"],
    },
}
TOOL_NAMES = tuple(ARGUMENT_SCHEMAS)
DESCRIPTIONS = {
    "get_weather": "Weather forecast for a city.",
    "create_event": "Create a calendar event.",
    "send_email": "Send an email.",
    "search_files": "Search the user's files.",
    "set_reminder": "Set a reminder.",
    "convert_currency": "Convert an amount between currencies.",
    "book_table": "Book a restaurant table.",
}
# tools offered in a structured item's conversation: its own and this many others
OFFERED = 2


def tool_definition(tool: str) -> dict:
    """The function definition a chat request carries for `tool` (OpenAI's `tools` entry)."""
    parameters = {"type": "object", **ARGUMENT_SCHEMAS[tool]}
    return {"type": "function", "function": {"name": tool, "description": DESCRIPTIONS[tool], "parameters": parameters}}


def offered_tools(tool: str, request: str) -> list[dict]:
    """`tool` among distractors, in an order fixed by the request (no draw from the item's rng,
    so the raw items stay what they were)."""
    rng = random.Random(f"offered:{request}")
    names = rng.sample([name for name in TOOL_NAMES if name != tool], OFFERED - 1) + [tool]
    rng.shuffle(names)
    return [tool_definition(name) for name in names]


def call_schema(tool: str) -> dict:
    """JSON Schema of a whole call `{"name": tool, "arguments": {...}}` for one tool."""
    arguments = {"type": "object", "additionalProperties": False, **ARGUMENT_SCHEMAS[tool]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"name": {"const": tool}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _topic(rng: random.Random) -> str:
    return f"{rng.choice(n.NOUNS)} {rng.choice(n.EVENT_KINDS)}"


def _weather(rng: random.Random) -> tuple[str, dict]:
    args: dict[str, Any] = {"city": rng.choice(n.CITIES), "unit": rng.choice(UNITS)}
    if rng.random() < 0.5:
        args["days"] = rng.randint(1, 14)
        text = rng.choice([
            "What's the weather in {city} for the next {days} days, in {unit}?",
            "Give me a {days}-day forecast for {city} in {unit}.",
        ])
    else:
        text = rng.choice(["What's the weather in {city} in {unit}?", "How warm is it in {city}? Use {unit}."])
    return text.format(**args), args


def _event(rng: random.Random) -> tuple[str, dict]:
    args: dict[str, Any] = {
        "title": _topic(rng),
        "date": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "duration_minutes": rng.choice([15, 30, 45, 60, 90, 120]),
    }
    if rng.random() < 0.5:
        args["attendees"] = rng.sample(n.FIRST_NAMES, rng.randint(1, 3))
        who = " and ".join(args["attendees"])
        text = "Schedule a {duration_minutes} minute {title} on {date} with " + who + "."
    else:
        text = rng.choice(["Create an event called {title} on {date} for {duration_minutes} minutes.",
                           "Put a {duration_minutes} minute {title} in my calendar on {date}."])
    return text.format(**args), args


def _email(rng: random.Random) -> tuple[str, dict]:
    name = rng.choice(n.FIRST_NAMES)
    args = {"to": f"{name.lower()}@example.org", "subject": _topic(rng), "priority": rng.choice(PRIORITIES)}
    text = rng.choice([
        "Email {to} about the {subject}, priority {priority}.",
        "Send a {priority} priority email to {to} with the subject {subject}.",
    ])
    return text.format(**args), args


def _search(rng: random.Random) -> tuple[str, dict]:
    args: dict[str, Any] = {"query": f"{rng.choice(n.NOUNS)} {rng.choice(n.NOUNS)}", "max_results": rng.randint(1, 50)}
    text = "Find up to {max_results} files about {query}"
    if rng.random() < 0.6:
        filters: dict[str, Any] = {"extension": rng.choice(EXTENSIONS)}
        text += ", only {ext} files"
        if rng.random() < 0.5:
            filters["modified_after"] = f"2026-{rng.randint(1, 12):02d}-01"
            text += " changed after {after}"
        args["filters"] = filters
    text += "."
    filters = args.get("filters", {})
    return text.format(**args, ext=filters.get("extension"), after=filters.get("modified_after")), args


def _reminder(rng: random.Random) -> tuple[str, dict]:
    args = {"text": f"{rng.choice(['call', 'email', 'pay', 'visit'])} {rng.choice(n.FIRST_NAMES)}", "minutes": rng.randint(1, 240)}
    text = rng.choice(["Remind me to {text} in {minutes} minutes.", "In {minutes} minutes, remind me to {text}."])
    return text.format(**args), args


def _currency(rng: random.Random) -> tuple[str, dict]:
    source, target = rng.sample(CURRENCIES, 2)
    args = {"amount": rng.randint(1, 9999), "source": source, "target": target}
    text = rng.choice(["Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?"])
    return text.format(**args), args


def _table(rng: random.Random) -> tuple[str, dict]:
    args: dict[str, Any] = {
        "restaurant": f"{n.invented_name(rng)} {rng.choice(['Grill', 'Kitchen', 'Bistro', 'House'])}",
        "party_size": rng.randint(1, 12),
        "time": f"{rng.randint(11, 22):02d}:{rng.choice([0, 15, 30, 45]):02d}",
    }
    text = "Book a table for {party_size} at {restaurant} at {time}"
    if rng.random() < 0.6:
        options: dict[str, Any] = {"outdoor": rng.random() < 0.5}
        text += ", outside" if options["outdoor"] else ", inside"
        if rng.random() < 0.5:
            options["note"] = rng.choice(["birthday", "window seat", "quiet corner", "high chair"])
            text += ", note: " + options["note"]
        args["options"] = options
    return (text + ".").format(**args), args


_BUILDERS: dict[str, Callable[[random.Random], tuple[str, dict]]] = {
    "get_weather": _weather,
    "create_event": _event,
    "send_email": _email,
    "search_files": _search,
    "set_reminder": _reminder,
    "convert_currency": _currency,
    "book_table": _table,
}
PROMPT_HEADER = "Tools: " + ", ".join(TOOL_NAMES)


def make_item(rng: random.Random, item_id: str) -> Item:
    tool = rng.choice(TOOL_NAMES)
    request, arguments = _BUILDERS[tool](rng)
    return Item(
        id=item_id,
        family="structured",
        prompt=f"{PROMPT_HEADER}\nRequest: {request}\nCall:",
        messages=question_turns(request),
        tools=offered_tools(tool, request),
        expected={"name": tool, "arguments": arguments},
        scorer="json_tool_call",
        schema=call_schema(tool),
        meta={"tool": tool},
    )


def generate(count: int, seed: int) -> list[Item]:
    rng = random.Random(f"structured:{seed}")
    return [make_item(rng, f"structured-{seed}-{index:05d}") for index in range(count)]
