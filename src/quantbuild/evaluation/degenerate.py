"""Degenerate output: the failures a quantized model shows before its scores drop.

Perplexity and KL divergence average over tokens; a model that loops on every prompt, never
reaches its end-of-turn token or drifts into another script can still look close to its
baseline on both (GGUF-Tool-Suite #74: a 2.1 bpw recipe looped on every prompt). Each
generated item is checked for three kinds:

- `loop`: one piece of text (up to 80 characters) repeated at least `LOOP_REPEATS` times in
  a row, the run covering at least `LOOP_CHARS` characters (one word said three times is
  not a loop; a clause said over and over is);
- `no_stop`: generation reached the token budget (or the context) without an end-of-turn or
  end-of-sequence token;
- `script`: letters of a writing system that neither the prompt nor the expected answer uses
  (Unicode script by character name), or U+FFFD (bytes that are not UTF-8).

The gate pairs each variant's degenerate items with the baseline's on the same items.
"""

from __future__ import annotations

import re
import unicodedata

KINDS = ("loop", "no_stop", "script")
LOOP_REPEATS = 3
LOOP_CHARS = 24
# short units (a run must reach LOOP_CHARS) and long ones (three repeats always do)
_SHORT_RUN = re.compile(r"(.{1,7})\1{%d,}" % (LOOP_REPEATS - 1), re.DOTALL)
_LONG_RUN = re.compile(r"(.{%d,80})\1{%d,}" % (-(-LOOP_CHARS // LOOP_REPEATS), LOOP_REPEATS - 1), re.DOTALL)


def _script(character: str) -> str:
    if character == "\ufffd":
        return "INVALID"
    name = unicodedata.name(character, "")
    return name.split(" ")[0] if name else "UNKNOWN"


def scripts(text: str) -> set[str]:
    """The writing systems of the letters in `text`."""
    return {_script(character) for character in text if character.isalpha() or character == "\ufffd"}


def is_loop(output: str) -> bool:
    if _LONG_RUN.search(output):
        return True
    return any(len(match.group(0)) >= LOOP_CHARS for match in _SHORT_RUN.finditer(output))


def kinds(output: str, stopped: bool, context: str) -> list[str]:
    """The degenerate kinds of one completion; `context` is the prompt and expected answer
    as text (the scripts a right answer may use)."""
    found = []
    if is_loop(output):
        found.append("loop")
    if not stopped:
        found.append("no_stop")
    if scripts(output) - scripts(context):
        found.append("script")
    return found
