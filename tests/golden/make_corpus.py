"""Write tests/golden/corpus.jsonl: the fixed training text of the golden loss test.

The text is generated, not collected, so it is ours to ship (no licence to track) and the same
on every machine: a seeded Mersenne Twister (``random.Random(seed).random()`` only, whose output
Python keeps stable across versions) picks words from small lists into six kinds of documents
(field notes, a ledger, arithmetic, recipes, short Python functions, letters), each a line
``{"text": ...}``. It has real structure for a small model to learn (grammar, number facts,
indentation) and enough variety that the loss does not collapse at once.

    python tests/golden/make_corpus.py            # rewrites tests/golden/corpus.jsonl

The file is committed; the test reads it and never this script. Regenerating it changes the
golden curve: do it only on purpose, then regenerate tests/golden/tiny_loss.json (see
tests/integration/test_train_golden.py).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "corpus.jsonl"
SEED = 20261202
DOCS = 700

ANIMALS = [
    "fox",
    "heron",
    "badger",
    "otter",
    "wren",
    "hare",
    "stoat",
    "owl",
    "vole",
    "deer",
    "crow",
    "lynx",
    "mole",
    "newt",
    "kite",
    "moth",
    "toad",
    "finch",
    "marten",
    "beetle",
]
PLACES = [
    "river",
    "meadow",
    "orchard",
    "ridge",
    "marsh",
    "hedge",
    "quarry",
    "harbour",
    "forest",
    "valley",
    "garden",
    "bridge",
    "mill",
    "lake",
    "field",
    "wood",
]
ADJS = [
    "small",
    "grey",
    "quiet",
    "quick",
    "old",
    "young",
    "brown",
    "pale",
    "tired",
    "bold",
    "shy",
    "wet",
    "hungry",
    "careful",
    "restless",
    "sleepy",
]
VERBS = [
    "crossed",
    "watched",
    "followed",
    "circled",
    "left",
    "reached",
    "searched",
    "guarded",
    "avoided",
    "visited",
    "climbed",
    "ignored",
]
TIMES = [
    "at dawn",
    "before noon",
    "after the rain",
    "at dusk",
    "late at night",
    "in the fog",
    "on Monday",
    "on Friday",
    "in early spring",
    "in the first frost",
]
WEATHER = ["clear", "windy", "cold", "warm", "cloudy", "wet", "still", "bright"]
OBSERVERS = ["Ada", "Bram", "Cora", "Dev", "Elin", "Farid", "Greta", "Hugo", "Ines", "Jonah"]
ITEMS = [
    "rope",
    "lamp",
    "nails",
    "flour",
    "candles",
    "salt",
    "oil",
    "cloth",
    "seed",
    "wire",
    "paper",
    "soap",
    "beans",
    "thread",
    "glue",
    "tea",
]
UNITS = ["boxes", "jars", "bags", "rolls", "crates", "packets"]
INGREDIENTS = [
    "onion",
    "carrot",
    "barley",
    "lentils",
    "butter",
    "apple",
    "leek",
    "potato",
    "honey",
    "oats",
    "garlic",
    "pepper",
    "milk",
    "egg",
    "cheese",
    "parsley",
]
STEPS = [
    "chop the {a}",
    "warm the {a} in a pan",
    "stir in the {a}",
    "add the {a} and the {b}",
    "simmer for {n} minutes",
    "season with {a}",
    "bake for {n} minutes",
    "let it rest",
    "mash the {a} with the {b}",
    "serve with {a}",
]
NAMES = ["total", "count", "width", "height", "price", "score", "limit", "offset", "index", "size"]
OPS = [("add", "+"), ("sub", "-"), ("mul", "*")]
NUMBER_WORDS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]


class Picker:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi], from random() alone."""
        return lo + int(self.rng.random() * (hi - lo + 1))

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p


def field_notes(r: Picker) -> str:
    who = r.pick(OBSERVERS)
    lines = [f"Field notes of {who}, day {r.int(1, 90)}. The weather was {r.pick(WEATHER)}."]
    for _ in range(r.int(5, 10)):
        a, b = r.pick(ANIMALS), r.pick(ANIMALS)
        s = (
            f"The {r.pick(ADJS)} {a} {r.pick(VERBS)} the {r.pick(PLACES)} {r.pick(TIMES)}"
            + (f", and the {b} {r.pick(VERBS)} it" if r.chance(0.4) else "")
            + "."
        )
        if r.chance(0.3):
            s += f" {who} counted {NUMBER_WORDS[r.int(2, 12)]} of them near the {r.pick(PLACES)}."
        lines.append(s)
    return " ".join(lines)


def ledger(r: Picker) -> str:
    rows = [f"Ledger of the {r.pick(PLACES)} store, week {r.int(1, 52)}."]
    total = 0
    for _ in range(r.int(6, 12)):
        n, price = r.int(1, 20), r.int(2, 40)
        total += n * price
        rows.append(
            f"item: {r.pick(ITEMS)}; amount: {n} {r.pick(UNITS)}; price: {price}; cost: {n * price}"
        )
    rows.append(f"total cost: {total}")
    return "\n".join(rows)


def arithmetic(r: Picker) -> str:
    lines = ["Exercises with answers."]
    for _ in range(r.int(8, 16)):
        a, b = r.int(0, 50), r.int(0, 50)
        kind = r.int(0, 2)
        if kind == 0:
            lines.append(f"{a} plus {b} equals {a + b}.")
        elif kind == 1:
            lines.append(f"{max(a, b)} minus {min(a, b)} equals {max(a, b) - min(a, b)}.")
        else:
            a, b = a % 13, b % 13
            lines.append(f"{a} times {b} equals {a * b}.")
    return "\n".join(lines)


def recipe(r: Picker) -> str:
    a = r.pick(INGREDIENTS)
    title = f"Recipe: {a} and {r.pick(INGREDIENTS)} soup for {NUMBER_WORDS[r.int(2, 8)]}."
    needs = sorted({r.pick(INGREDIENTS) for _ in range(r.int(3, 6))})
    lines = [title, "You need: " + ", ".join(needs) + "."]
    for i in range(r.int(4, 7)):
        step = r.pick(STEPS).format(a=r.pick(INGREDIENTS), b=r.pick(INGREDIENTS), n=r.int(2, 45))
        lines.append(f"Step {i + 1}: {step}.")
    return "\n".join(lines)


def code(r: Picker) -> str:
    out = [f'"""Helpers for the {r.pick(PLACES)} inventory."""', ""]
    for _ in range(r.int(3, 6)):
        name, (op, sym) = r.pick(NAMES), r.pick(OPS)
        x, y = r.pick(NAMES), r.pick(NAMES)
        if x == y:
            y = "other"
        out += [
            f"def {op}_{name}({x}, {y}):",
            f'    """Return {x} {sym} {y}."""',
            f"    result = {x} {sym} {y}",
        ]
        if r.chance(0.5):
            limit = r.int(10, 999)
            out += [f"    if result > {limit}:", f"        result = {limit}"]
        out += ["    return result", ""]
    return "\n".join(out)


def letter(r: Picker) -> str:
    to, frm = r.pick(OBSERVERS), r.pick(OBSERVERS)
    body = [
        f"Dear {to},",
        "",
        f"the {r.pick(ADJS)} {r.pick(ANIMALS)} is back at the {r.pick(PLACES)}. "
        f"I saw it {r.pick(TIMES)} while the sky was {r.pick(WEATHER)}.",
    ]
    for _ in range(r.int(2, 5)):
        body.append(
            f"Please bring {NUMBER_WORDS[r.int(1, 9)]} {r.pick(UNITS)} of {r.pick(ITEMS)} "
            f"to the {r.pick(PLACES)} {r.pick(TIMES)}."
        )
    body += ["", "Yours,", frm]
    return "\n".join(body)


KINDS = [field_notes, ledger, arithmetic, recipe, code, letter]


def documents(seed: int = SEED, n: int = DOCS) -> list[str]:
    r = Picker(seed)
    return [r.pick(KINDS)(r) for _ in range(n)]


def render(seed: int = SEED, n: int = DOCS) -> str:
    return "".join(json.dumps({"text": d}) + "\n" for d in documents(seed, n))


if __name__ == "__main__":
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)", file=sys.stderr)
