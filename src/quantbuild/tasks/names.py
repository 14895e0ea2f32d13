"""Vocabulary the task generators draw from: invented names built from syllables, plus small
closed word lists. Invented names force the model to copy from its context instead of
recalling memorised facts, which is what retrieval and long-context tests must measure."""

import random

ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "l", "r", "s", "th", "m", "k", "rn", "nd"]

FIRST_NAMES = [
    "Ada", "Bram", "Cora", "Dov", "Elin", "Fenn", "Gita", "Hugo", "Ines", "Jory", "Kira", "Lev",
    "Mira", "Noor", "Otto", "Pia", "Quin", "Rhea", "Sami", "Tove", "Uma", "Vik", "Wren", "Yara",
]
CITIES = [
    "Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Quito", "Tokyo", "Seoul", "Dakar", "Accra",
    "Dublin", "Vienna", "Prague", "Athens", "Madrid", "Rome", "Berlin", "Warsaw", "Riga", "Tallinn",
    "Nairobi", "Delhi", "Hanoi", "Manila", "Sydney", "Perth", "Boston", "Denver", "Austin", "Toronto",
]
COLORS = ["red", "blue", "green", "black", "white", "amber", "silver", "violet", "grey", "golden"]
OBJECTS = ["door", "vault", "gate", "locker", "chest", "box", "safe", "cabinet", "drawer", "hatch"]
CROPS = ["barley", "rye", "apples", "grapes", "olives", "flax", "beans", "plums", "oats", "hops"]
GOODS = ["copper", "wool", "salt", "timber", "glass", "silk", "tin", "leather", "honey", "iron"]
EXPORTS = GOODS + [
    "cotton", "marble", "coffee", "rice", "paper", "wine", "cheese", "amber", "pearls", "rubber",
    "tea", "cocoa", "sugar", "steel", "nickel", "zinc", "lumber", "spices", "furs", "coal",
]
SEASONS = ["spring", "summer", "autumn", "winter"]
DIRECTIONS = ["north", "south", "east", "west"]
NOUNS = [
    "budget", "roadmap", "launch", "review", "design", "hiring", "security", "release", "audit",
    "planning", "onboarding", "pricing", "support", "research", "migration", "training",
]
EVENT_KINDS = ["meeting", "sync", "workshop", "call", "retro", "demo"]
FRUITS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach"]


def invented_name(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable, capitalised name that is unlikely to be a real word."""
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(CODAS)).capitalize()


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {invented_name(rng)}"
