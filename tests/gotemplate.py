"""A small interpreter for the part of Go's text/template that Ollama chat templates use, so a
test can render a Modelfile's TEMPLATE here (no Go, no Ollama on this machine).

Supported: text and `{{ }}` actions with `{{-`/`-}}` trimming; `if`/`else if`/`else`/`end`;
`range PIPE` and `range $i, $x := PIPE`; `$v := PIPE`; fields (`.A.B`, `$.A`, `$v.A`);
functions `eq ne and or not len slice`; string and integer literals; parentheses. Truth is
Go's: false, 0, "", nil and empty collections are false. A value prints as Go prints it,
through `str()` (give objects a `__str__` to print like Ollama's `String()` methods).
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|:=|,|[^\s(),]+)')


def _lex(source: str) -> list[tuple[str, str]]:
    """[("text", ...) | ("action", ...)] with the trim markers applied."""
    nodes: list[tuple[str, str]] = []
    at = 0
    for match in _ACTION.finditer(source):
        text = source[at:match.start()]
        if match.group(1):
            text = text.rstrip()
        nodes.append(("text", text))
        nodes.append(("action", match.group(2).strip()))
        at = match.end()
        if match.group(3):
            rest = source[at:]
            at += len(rest) - len(rest.lstrip())
    nodes.append(("text", source[at:]))
    return nodes


def _parse(nodes: list[tuple[str, str]], at: int = 0, stop: tuple[str, ...] = ()) -> tuple[list, int, str]:
    """A tree of ("text", s) | ("print", expr) | ("if", [(cond, body)...], else) |
    ("range", vars, expr, body) | ("set", var, expr), up to a word in `stop`."""
    tree: list = []
    while at < len(nodes):
        kind, value = nodes[at]
        at += 1
        if kind == "text":
            tree.append(("text", value))
            continue
        word = value.split(None, 1)[0] if value else ""
        if word in stop or value.startswith("else"):
            return tree, at, value
        if word == "if":
            branches, otherwise, condition = [], [], value[2:].strip()
            while True:
                body, at, ended = _parse(nodes, at, ("end",))
                branches.append((condition, body))
                if ended.startswith("else if"):
                    condition = ended[len("else if"):].strip()
                    continue
                if ended == "else":
                    otherwise, at, _ = _parse(nodes, at, ("end",))
                break
            tree.append(("if", branches, otherwise))
        elif word == "range":
            spec = value[len("range"):].strip()
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = [name.strip() for name in left.split(",")]
            body, at, _ = _parse(nodes, at, ("end",))
            tree.append(("range", names, spec.strip(), body))
        elif re.match(r"^\$\w+\s*:=", value):
            name, expr = value.split(":=", 1)
            tree.append(("set", name.strip(), expr.strip()))
        else:
            tree.append(("print", value))
    return tree, at, ""


def _truth(value: Any) -> bool:
    return bool(value) if value is not None else False


def _field(value: Any, path: list[str]) -> Any:
    for name in path:
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


class _Evaluator:
    def __init__(self, root: Any) -> None:
        self.root, self.variables = root, [{"$": root}]

    def lookup(self, name: str) -> Any:
        for scope in reversed(self.variables):
            if name in scope:
                return scope[name]
        raise KeyError(f"undefined variable {name}")

    def term(self, token: str, dot: Any) -> Any:
        if token.startswith('"'):
            return bytes(token[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", token):
            return int(token)
        if token == ".":
            return dot
        if token.startswith("."):
            return _field(dot, token[1:].split("."))
        if token.startswith("$"):
            name, *path = token.split(".")
            return _field(self.lookup(name), path)
        raise ValueError(f"unknown term {token!r}")

    def expression(self, tokens: list[str], dot: Any) -> Any:
        """A command: a function applied to its arguments, or one term."""
        items, at = [], 0
        while at < len(tokens):
            if tokens[at] == "(":
                depth, end = 1, at + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(tokens[end], 0)
                    end += 1
                items.append(("value", self.expression(tokens[at + 1:end - 1], dot)))
                at = end
            else:
                items.append(("token", tokens[at]))
                at += 1
        head = items[0]
        args = [value if kind == "value" else self.term(value, dot) for kind, value in items[1:]]
        if head[0] == "token" and head[1] in _FUNCTIONS:
            return _FUNCTIONS[head[1]](*args)
        return head[1] if head[0] == "value" else self.term(head[1], dot)

    def evaluate(self, source: str, dot: Any) -> Any:
        return self.expression([token for token in _TOKEN.findall(source) if token], dot)

    def run(self, tree: list, dot: Any, out: list[str]) -> None:
        for node in tree:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "print":
                value = self.evaluate(node[1], dot)
                out.append("" if value is None else str(value))
            elif kind == "set":
                self.variables[-1][node[1]] = self.evaluate(node[2], dot)
            elif kind == "if":
                for condition, body in node[1]:
                    if _truth(self.evaluate(condition, dot)):
                        self.run(body, dot, out)
                        break
                else:
                    self.run(node[2], dot, out)
            elif kind == "range":
                _, names, expr, body = node
                for index, element in enumerate(self.evaluate(expr, dot) or []):
                    scope = {}
                    if len(names) == 2:
                        scope = {names[0]: index, names[1]: element}
                    elif len(names) == 1:
                        scope = {names[0]: element}
                    self.variables.append(scope)
                    self.run(body, element, out)
                    self.variables.pop()


_FUNCTIONS = {
    "eq": lambda a, *others: any(a == other for other in others),
    "ne": lambda a, b: a != b,
    "and": lambda *values: next((value for value in values if not _truth(value)), values[-1]),
    "or": lambda *values: next((value for value in values if _truth(value)), values[-1]),
    "not": lambda value: not _truth(value),
    "len": lambda value: len(value),
    "slice": lambda value, start=0, end=None: value[start:end],
}


def render(source: str, data: Any) -> str:
    tree, _, _ = _parse(_lex(source))
    out: list[str] = []
    _Evaluator(data).run(tree, data, out)
    return "".join(out)
