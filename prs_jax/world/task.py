"""The task family of the synthetic preference world (v2): prompts x, preferences z, answers y, the gold reward.

A prompt asks for k items of one category ("Name four fruits."). A preference z is three sentences (one to three
in the curriculum), each of a kind whose satisfaction a program can check locally: include an item, leave an
item out, put an item first, end with an item, number the items, capitalise the items, skip the introduction,
close with thanks. The gold reward r*(x, z, y) in [0, 1] is

    r* = W_VALID * validity(x, y) + (1 - W_VALID) * mean_i satisfied(z_i, y)

where validity averages three checks: the right number of items (partial credit for one off), items from the
asked category, no repeats. Preferences change what the best answer is: the items they name are ones the
unconditioned answer rarely puts there, and the default style (introduction, plain lower-case list, no thanks)
violates four of the kinds. Each preference is a local edit of an answer, so a critique that names the unmet
ones lets a refinement fix them all at once, which resampling cannot do when each is honoured rarely.

A second, single-item request ("Name a fruit.") is the verbalized-sampling task: its answers have a KNOWN base
distribution per category (World.p_base), so calibration and mode collapse are measurable exactly.

Everything here is plain Python over strings, so the gold reward runs on any text a model writes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach", "pear", "plum"),
    "animals": ("bear", "cat", "deer", "dog", "fox", "goat", "horse", "lion", "owl", "wolf"),
    "colors": ("black", "blue", "brown", "gold", "green", "pink", "purple", "red", "silver", "white"),
    "tools": ("axe", "drill", "file", "hammer", "knife", "ladder", "rake", "saw", "shovel", "wrench"),
    "cities": ("berlin", "cairo", "delhi", "lima", "london", "madrid", "paris", "rome", "seoul", "tokyo"),
    "sports": ("boxing", "cricket", "golf", "hockey", "judo", "rowing", "rugby", "soccer", "surfing", "tennis"),
    "instruments": ("banjo", "cello", "drum", "flute", "guitar", "harp", "organ", "piano", "trumpet", "violin"),
    "vegetables": ("bean", "beet", "cabbage", "carrot", "corn", "garlic", "kale", "leek", "onion", "potato"),
}
SINGULAR = {"fruits": "fruit", "animals": "animal", "colors": "color", "tools": "tool", "cities": "city",
            "sports": "sport", "instruments": "instrument", "vegetables": "vegetable"}
CATEGORY_OF: dict[str, str] = {item: cat for cat, items in CATEGORIES.items() for item in items}
NUMBER_WORDS = {3: "three", 4: "four", 5: "five"}
WORD_NUMBERS = {v: k for k, v in NUMBER_WORDS.items()}

PROMPT_FORMS = ("Name {n} {cat}.", "List {n} {cat}.", "Give me {n} {cat}.", "Which {n} {cat} come to mind?")
SINGLE_FORMS = ("Name a {one}.", "Give me one {one}.")
INTROS = ("Sure, here they are:", "Here you go:", "Happy to help:")
THANKS = "Thanks for asking!"

KINDS = ("include", "exclude", "first", "last", "numbered", "capitalised", "no_intro", "thanks")
ITEM_KINDS = ("include", "exclude", "first", "last")
# Two phrasings per kind, so the policy has to read the preference rather than match one string.
PHRASES: dict[str, tuple[str, ...]] = {
    "include": ("Please include {item}.", "Make sure {item} is on the list."),
    "exclude": ("Please leave out {item}.", "I do not want {item}."),
    "first": ("Put {item} first.", "Start the list with {item}."),
    "last": ("End the list with {item}.", "Put {item} last."),
    "numbered": ("Number the items.", "Please use a numbered list."),
    "capitalised": ("Capitalise the items.", "Write each item with a capital letter."),
    "no_intro": ("Skip any introduction.", "Start directly with the items."),
    "thanks": ("End with a thank you.", "Close with thanks."),
}
W_VALID = 0.4


@dataclasses.dataclass(frozen=True)
class Pref:
    """One preference sentence: its kind, the item it names (item kinds) and the phrasing index."""

    kind: str
    item: str | None = None
    form: int = 0

    def text(self) -> str:
        """The sentence as the user writes it."""
        return PHRASES[self.kind][self.form].format(item=self.item)

    @property
    def issue(self) -> str:
        """The name of this preference's violation (see `violations`)."""
        return self.kind + (f":{self.item}" if self.item else "")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A request for `n` items of `category` (`form` picks the wording) with preferences `prefs`; n = 1 is the
    single-item request of the verbalized-sampling task (no preferences)."""

    category: str
    n: int
    prefs: tuple[Pref, ...]
    form: int = 0

    @property
    def x(self) -> str:
        if self.n == 1:
            return SINGLE_FORMS[self.form].format(one=SINGULAR[self.category])
        return PROMPT_FORMS[self.form].format(n=NUMBER_WORDS[self.n], cat=self.category)

    @property
    def z(self) -> str:
        return " ".join(p.text() for p in self.prefs)

    @property
    def id(self) -> str:
        return f"{self.category}-{self.n}-{self.form}-" + "-".join(f"{p.kind}:{p.item or ''}:{p.form}"
                                                                  for p in self.prefs)


@dataclasses.dataclass(frozen=True)
class Answer:
    """A structured answer: the listed items and the four style choices."""

    items: tuple[str, ...]
    intro: int | None = 0  # index into INTROS, None for no introduction
    numbered: bool = False
    thanks: bool = False
    capitalised: bool = False

    def text(self) -> str:
        """Render the answer as the policy writes it."""
        words = [i.capitalize() if self.capitalised else i for i in self.items]
        if self.numbered:
            body = " ".join(f"{k + 1}. {w}" for k, w in enumerate(words)) + "."
        else:
            body = ", ".join(words) + "."
        parts = ([INTROS[self.intro]] if self.intro is not None else []) + [body] + ([THANKS] if self.thanks else [])
        return " ".join(parts)


# ------------------------------------------------------------------------------------------------ parsing
_PROMPT_RES = [re.compile("^" + re.escape(f).replace(r"\{n\}", r"(?P<n>\w+)").replace(r"\{cat\}", r"(?P<cat>\w+)")
                          + "$") for f in PROMPT_FORMS]
_SINGLE_RES = [re.compile("^" + re.escape(f).replace(r"\{one\}", r"(?P<one>\w+)") + "$") for f in SINGLE_FORMS]
_PLURAL = {v: k for k, v in SINGULAR.items()}
_PHRASE_RES = [(kind, i, re.compile("^" + re.escape(p).replace(r"\{item\}", r"(?P<item>\w+)") + "$"))
               for kind, forms in PHRASES.items() for i, p in enumerate(forms)]
_SENTENCE = re.compile(r"[^.?!]+[.?!]")
_WORD = re.compile(r"[A-Za-z]+")


class WorldParseError(ValueError):
    """A prompt or preference that is not in the world's language."""


def parse_prompt(x: str) -> tuple[str, int, int]:
    """(category, n, form) of a world prompt (n = 1 for a single-item request); WorldParseError otherwise."""
    x = x.strip()
    for form, rx in enumerate(_PROMPT_RES):
        m = rx.match(x)
        if m and m.group("cat") in CATEGORIES and m.group("n") in WORD_NUMBERS:
            return m.group("cat"), WORD_NUMBERS[m.group("n")], form
    for form, rx in enumerate(_SINGLE_RES):
        m = rx.match(x)
        if m and m.group("one") in _PLURAL:
            return _PLURAL[m.group("one")], 1, form
    raise WorldParseError(f"not a synthetic-world prompt: {x!r} (expected e.g. {PROMPT_FORMS[0].format(n='four', cat='fruits')!r})")


def parse_preference(z: str | None) -> tuple[Pref, ...]:
    """The preferences in z (empty for None or ''); raises WorldParseError on an unknown sentence."""
    if not z:
        return ()
    out = []
    for sentence in _SENTENCE.findall(z.strip()):
        sentence = sentence.strip()
        for kind, form, rx in _PHRASE_RES:
            m = rx.match(sentence)
            if m:
                out.append(Pref(kind, m.groupdict().get("item"), form))
                break
        else:
            raise WorldParseError(f"not a synthetic-world preference sentence: {sentence!r}")
    return tuple(out)


def split_query(text: str) -> tuple[str, str | None]:
    """Split a policy input 'x' or 'x\\n\\nz' (see strategies.base.join_preference) into x and z."""
    x, _, z = text.strip().partition("\n\n")
    return x.strip(), (z.strip() or None)


def _item_words(y: str) -> list[str]:
    return [w for w in _WORD.findall(y) if w.lower() in CATEGORY_OF]


def answer_items(y: str) -> list[str]:
    """The known item words of y (lower case), in order (anything else is ignored)."""
    return [w.lower() for w in _item_words(y)]


def has_intro(y: str) -> bool:
    """Whether y starts with anything other than its first item (or a list number)."""
    s = y.strip()
    if not s:
        return False
    m = _WORD.search(s)
    head = s[: m.start()] if m else s
    return not (m and m.group(0).lower() in CATEGORY_OF and re.fullmatch(r"(1\.\s*)?", head))


def is_numbered(y: str, items: Sequence[str]) -> bool:
    """Whether every item is preceded by its list number ("1. a 2. b")."""
    if not items:
        return False
    found = re.findall(r"(\d+)\.\s*([A-Za-z]+)", y)
    return [int(i) for i, _ in found] == list(range(1, len(items) + 1)) and [w.lower() for _, w in found] == list(items)


def is_capitalised(y: str) -> bool:
    """Whether every item word is written with a capital first letter (and there is at least one)."""
    words = _item_words(y)
    return bool(words) and all(w[0].isupper() for w in words)


def ends_with_thanks(y: str) -> bool:
    """Whether the last sentence thanks the user."""
    sentences = _SENTENCE.findall(y.strip()) or [y]
    return "thank" in sentences[-1].lower()


# ------------------------------------------------------------------------------------------------ gold reward
def satisfied(pref: Pref, y: str, items: Sequence[str] | None = None) -> bool:
    """Whether answer y satisfies one preference."""
    items = list(items) if items is not None else answer_items(y)
    if pref.kind == "include":
        return pref.item in items
    if pref.kind == "exclude":
        return pref.item not in items
    if pref.kind == "first":
        return bool(items) and items[0] == pref.item
    if pref.kind == "last":
        return bool(items) and items[-1] == pref.item
    if pref.kind == "numbered":
        return is_numbered(y, items)
    if pref.kind == "capitalised":
        return is_capitalised(y)
    if pref.kind == "no_intro":
        return bool(items) and not has_intro(y)
    if pref.kind == "thanks":
        return ends_with_thanks(y)
    raise WorldParseError(f"unknown preference kind {pref.kind!r}; known: {KINDS}")


def validity(category: str, n: int, items: Sequence[str]) -> float:
    """Mean of: right count (0.5 for one off), items of the category, no repeats; 0 without items."""
    if not items:
        return 0.0
    count = max(0.0, 1.0 - 0.5 * abs(len(items) - n))
    on_topic = sum(CATEGORY_OF[i] == category for i in items) / len(items)
    unique = len(set(items)) / len(items)
    return (count + on_topic + unique) / 3.0


def gold_reward(x: str, y: str, z: str | None = None) -> float:
    """r*(x, z, y) in [0, 1]. `x` may carry z after a blank line (the policy's input) when z is None."""
    if z is None:
        x, z = split_query(x)
    category, n, _ = parse_prompt(x)
    prefs = parse_preference(z)
    items = answer_items(y)
    v = validity(category, n, items)
    if not prefs:
        return v
    sat = float(np.mean([satisfied(p, y, items) for p in prefs]))
    return W_VALID * v + (1.0 - W_VALID) * sat


def violations(x: str, z: str | None, y: str) -> list[str]:
    """What y gets wrong, in a fixed order: 'count', 'off:<item>', 'repeat:<item>', then the unsatisfied
    preferences in the order z states them ('include:<item>', 'first:<item>', 'numbered', ...)."""
    category, n, _ = parse_prompt(x)
    items = answer_items(y)
    out = []
    if len(items) != n:
        out.append("count")
    seen: set[str] = set()
    for i in items:
        if CATEGORY_OF[i] != category and f"off:{i}" not in out:
            out.append(f"off:{i}")
        if i in seen and f"repeat:{i}" not in out:
            out.append(f"repeat:{i}")
        seen.add(i)
    for p in parse_preference(z):
        if not satisfied(p, y, items):
            out.append(p.issue)
    return out
