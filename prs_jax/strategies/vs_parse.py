"""Verbalised distributions: a parser of model output that never raises, and the weighting/selection steps.

Parsing (`parse_verbalized`) turns whatever the model wrote into `(text, weight)` items plus a report of what was
dropped and why. It accepts, in order of preference:

1. JSON-like data anywhere in the text: code fences and prose around it are ignored; a lenient reader accepts
   trailing or missing commas, single or curly quotes, unquoted keys, Python literals, percent numbers ("70%"),
   NaN/Infinity, and truncation (the items completed before the cut are kept, the cut one is dropped).
   The items may sit under `{"responses": [...]}` (or an alias: items, answers, candidates, ...), in a bare
   list, or in a `{"text": probability}` mapping. Item keys have aliases: text/response/content/answer/...
   for the text, probability/prob/p/confidence/weight/likelihood/... for the weight (`nll` and `perplexity`
   are converted to exp(-nll) and 1/perplexity). List elements may be objects, strings or [text, weight] pairs.
2. Otherwise a numbered or bulleted list ("1. ...", "2) ...", "- ...", "Response 3: ..."), with an optional
   trailing "(probability: 0.2)" / "(20%)" per line: the fallback for the Sequence method.

Weighting and selection are pure functions over the repaired weights: `repair_weights` (percent strings,
invalid/NaN -> 0, clamp to [0, 1]), `threshold` (post-hoc lower bound tau keeping at least `min_survivors`),
`normalize_weights` (elicited p / sum p, softmax, uniform), `verbalized_distribution` (all three, sorted by
probability, descending), then `sample_index` (explicit seed or np.random.Generator) or `argmax_index`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, Sequence

import numpy as np

WeightMode = Literal["elicited", "softmax", "uniform"]

TEXT_KEYS = ("text", "response", "content", "answer", "output", "completion", "sample", "candidate", "story",
             "joke", "poem", "idea", "option", "item", "value", "message", "reply", "name", "result")
WEIGHT_KEYS = ("probability", "prob", "p", "confidence", "weight", "likelihood", "chance", "percentage",
               "percent", "score", "probability_score", "verbalized_probability")
NLL_KEYS = ("nll", "negative_log_likelihood", "neg_log_likelihood")
PERPLEXITY_KEYS = ("perplexity", "ppl")
LIST_KEYS = ("responses", "items", "answers", "candidates", "outputs", "results", "samples", "distribution",
             "options", "completions", "generations", "choices", "texts", "list", "data", "response", "answer")
REASONING_KEYS = ("reasoning", "thinking", "thoughts", "thought", "rationale", "analysis", "explanation", "cot")

_MAX_DEPTH = 48
_MAX_STARTS = 200  # JSON start positions tried per text (each parse consumes what it reads: linear overall)
_EXCERPT = 60


# ----------------------------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class VerbalizedItem:
    """One parsed response: its text, the weight as written (`raw_weight`, None when absent), the repaired
    weight in [0, 1] (0 when absent or invalid) and the key the weight came from."""

    text: str
    raw_weight: Any = None
    weight: float = 0.0
    weight_key: str | None = None

    @property
    def has_weight(self) -> bool:
        return self.raw_weight is not None


@dataclasses.dataclass(frozen=True)
class Dropped:
    """Something the parser saw and did not keep: a short excerpt and the reason."""

    what: str
    reason: str


@dataclasses.dataclass
class ParseResult:
    """Items in the order written, what was dropped, the format found ("json", "list" or "none"), whether the
    JSON was cut off, and a reasoning field if the model wrote one."""

    items: list[VerbalizedItem]
    dropped: list[Dropped] = dataclasses.field(default_factory=list)
    format: Literal["json", "list", "none"] = "none"
    truncated: bool = False
    reasoning: str | None = None

    @property
    def texts(self) -> list[str]:
        return [it.text for it in self.items]

    @property
    def weights(self) -> np.ndarray:
        """Repaired weights [n] in [0, 1]."""
        return np.asarray([it.weight for it in self.items], np.float64)

    @property
    def has_weights(self) -> bool:
        """Whether any item carries a written weight."""
        return any(it.has_weight for it in self.items)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"format": self.format, "truncated": self.truncated, "reasoning": self.reasoning,
                "items": [{"text": it.text, "raw_weight": jsonable(it.raw_weight), "weight": it.weight}
                          for it in self.items],
                "dropped": [{"what": d.what, "reason": d.reason} for d in self.dropped]}


def jsonable(x: Any) -> Any:
    """x if JSON can hold it as is (None, bool, int, str, finite float), else its repr."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else repr(x)
    return repr(x)


def _excerpt(x: Any) -> str:
    s = x if isinstance(x, str) else repr(x)
    s = s.replace("\n", " ")
    return s if len(s) <= _EXCERPT else s[:_EXCERPT - 3] + "..."


# ----------------------------------------------------------------------------------------------- weights
_NUM_RE = re.compile(r"^[~≈<>=\s]*(?:about|approx\.?|approximately|roughly)?\s*"
                     r"([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(%|percent)?\s*$", re.IGNORECASE)
_FRAC_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def weight_value(raw: Any) -> tuple[float, bool]:
    """(value, was_percent) of a written weight before clamping; NaN when it is not a number."""
    if raw is None or isinstance(raw, bool):
        return math.nan, False
    if isinstance(raw, (int, float, np.integer, np.floating)):
        try:
            return float(raw), False
        except (OverflowError, ValueError):
            return math.nan, False
    if isinstance(raw, str):
        s = raw.strip().strip("\"'").strip()
        m = _NUM_RE.match(s)
        if m:
            try:
                x = float(m.group(1))
            except (OverflowError, ValueError):
                return math.nan, False
            return (x / 100.0, True) if m.group(2) else (x, False)
        m = _FRAC_RE.match(s)
        if m:
            den = float(m.group(2))
            return (float(m.group(1)) / den if den else math.nan), False
    return math.nan, False


def repair_weight(raw: Any) -> float:
    """One written weight as a number in [0, 1]: "70%" -> 0.7, "1/4" -> 0.25, NaN/inf/invalid/missing -> 0."""
    x, _ = weight_value(raw)
    if not math.isfinite(x):
        return 0.0
    return min(max(x, 0.0), 1.0)


def repair_weights(raws: Sequence[Any], percent_scale: bool | Literal["auto"] = "auto") -> np.ndarray:
    """Written weights -> float64 [n] in [0, 1].

    With `percent_scale="auto"`, plain numbers are read as percentages when some exceed 1, none exceeds 100 and
    they sum to more than 2 (probabilities cannot: a model writing 70, 20, 10); `True` always divides plain
    numbers by 100; `False` only clamps (the reference package's behaviour). Strings with "%" are percentages
    in every mode."""
    vals = [weight_value(r) for r in raws]
    plain = [x for x, pct in vals if not pct and math.isfinite(x)]
    scale = percent_scale is True or (percent_scale == "auto" and any(x > 1 for x in plain)
                                      and all(0 <= x <= 100 for x in plain) and sum(plain) > 2)
    out = np.zeros(len(vals), np.float64)
    for i, (x, pct) in enumerate(vals):
        if not math.isfinite(x):
            continue
        if scale and not pct:
            x = x / 100.0
        out[i] = min(max(x, 0.0), 1.0)
    return out


def threshold(weights: Sequence[float] | np.ndarray, tau: float = 0.0, min_survivors: int = 3) -> np.ndarray:
    """Indices (ascending) of weights >= tau; if fewer than `min_survivors` pass, the top `min_survivors` by
    weight (ties: earlier first), or all of them when there are fewer."""
    w = np.asarray(weights, np.float64).reshape(-1)
    keep = np.flatnonzero(w >= tau)
    if len(keep) >= min(min_survivors, len(w)):
        return keep
    order = np.lexsort((np.arange(len(w)), -w))  # by weight descending, then position
    return np.sort(order[:min(max(min_survivors, 0), len(w))])


def normalize_weights(weights: Sequence[float] | np.ndarray, mode: WeightMode = "elicited",
                      temperature: float = 1.0) -> np.ndarray:
    """Probabilities from repaired weights: elicited p_i / sum p (uniform when the sum is 0), softmax of
    p / temperature, or uniform."""
    w = np.asarray(weights, np.float64).reshape(-1)
    n = len(w)
    if n == 0:
        return w
    if mode == "uniform":
        return np.full(n, 1.0 / n)
    if mode == "elicited":
        s = w.sum()
        return w / s if s > 0 else np.full(n, 1.0 / n)
    if mode == "softmax":
        if temperature <= 0:
            raise ValueError(f"normalize_weights: softmax temperature must be > 0 (got {temperature}).")
        z = w / temperature
        e = np.exp(z - z.max())
        return e / e.sum()
    raise ValueError(f"normalize_weights: mode must be 'elicited', 'softmax' or 'uniform' (got {mode!r}).")


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A verbalised distribution after filtering: `indices` into the input items, sorted by `probs`
    descending (ties: larger weight, then earlier item); `filtered` are the indices tau removed."""

    indices: np.ndarray
    probs: np.ndarray
    weights: np.ndarray
    filtered: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def verbalized_distribution(weights: Sequence[float] | np.ndarray, *, tau: float = 0.0, min_survivors: int = 3,
                            mode: WeightMode = "elicited", temperature: float = 1.0) -> Distribution:
    """Threshold by tau, normalise by `mode`, sort descending: the distribution to sample or argmax from."""
    w = np.asarray(weights, np.float64).reshape(-1)
    w = np.where(np.isfinite(w), np.clip(w, 0.0, 1.0), 0.0)
    keep = threshold(w, tau, min_survivors)
    probs = normalize_weights(w[keep], mode, temperature)
    order = np.lexsort((keep, -w[keep], -probs)) if len(keep) else np.zeros(0, np.int64)
    filtered = np.setdiff1d(np.arange(len(w)), keep)
    return Distribution(indices=keep[order].astype(np.int64), probs=probs[order], weights=w[keep][order],
                        filtered=filtered.astype(np.int64))


def sample_index(dist: Distribution, rng: np.random.Generator | int | Sequence[int]) -> int:
    """An input index drawn from the distribution with an explicit generator or seed."""
    if len(dist) == 0:
        raise ValueError("sample_index: the distribution is empty (no parsed items).")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    p = dist.probs / dist.probs.sum()
    return int(dist.indices[int(gen.choice(len(p), p=p))])


def argmax_index(dist: Distribution) -> int:
    """The input index of the most probable item (the first in the sorted order)."""
    if len(dist) == 0:
        raise ValueError("argmax_index: the distribution is empty (no parsed items).")
    return int(dist.indices[0])


# ----------------------------------------------------------------------------------------------- lenient JSON
class _Partial:
    """Marks a value cut short by the end of the text or by a syntax error."""

    reason = "truncated"


class _PartialDict(dict, _Partial):
    pass


class _PartialList(list, _Partial):
    pass


class _PartialStr(str, _Partial):
    pass


class _Missing(_Partial):
    pass


_MISSING = _Missing()


class _SyntaxErr(Exception):
    pass


_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/", "\\": "\\", '"': '"', "'": "'"}
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(\s*%)?")
_HEX4 = re.compile(r"[0-9a-fA-F]{4}")
_WORD_RE = re.compile(r"[A-Za-z_][\w-]*")
_LITERALS = {"true": True, "false": False, "null": None, "none": None, "nan": math.nan, "infinity": math.inf,
             "inf": math.inf}


class _Reader:
    """A forgiving recursive-descent JSON reader. Values cut off by the end of the text come back as _Partial
    containers/strings holding what was complete; a syntax error inside a container ends it the same way."""

    def __init__(self, text: str, pos: int):
        self.s = text
        self.i = pos

    def ws(self) -> None:
        s, i = self.s, self.i
        while i < len(s) and (s[i].isspace() or s[i] == "\ufeff"):
            i += 1
        self.i = i

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def value(self, depth: int, in_object: bool = False) -> Any:
        if depth > _MAX_DEPTH:
            raise _SyntaxErr("nested too deeply")
        self.ws()
        c = self.peek()
        if not c:
            return _MISSING
        if c == "{":
            return self.obj(depth)
        if c == "[":
            return self.arr(depth)
        if c in _QUOTES:
            return self.string()
        if c.isdigit() or c in "+-.":
            m = _NUMBER_RE.match(self.s, self.i)
            if m:
                self.i = m.end()
                tok = m.group(0)
                if m.group(1):
                    return tok.replace(" ", "")
                try:
                    return int(tok) if re.fullmatch(r"[+-]?\d+", tok) else float(tok)
                except (OverflowError, ValueError):
                    return math.nan
            if c == "-" and self.s.startswith("-Infinity", self.i):
                self.i += len("-Infinity")
                return -math.inf
            raise _SyntaxErr(f"unexpected {c!r}")
        m = _WORD_RE.match(self.s, self.i)
        if m and m.group(0).lower() in _LITERALS:
            self.i = m.end()
            return _LITERALS[m.group(0).lower()]
        if in_object and c not in ",:}]":
            # an unquoted value: read to the end of the field
            j = self.i
            while j < len(self.s) and self.s[j] not in ",}]\n":
                j += 1
            word = self.s[self.i:j].strip()
            self.i = j
            return word if j < len(self.s) else _PartialStr(word)
        raise _SyntaxErr(f"unexpected {c!r}")

    def string(self) -> str:
        close = _QUOTES[self.s[self.i]]
        self.i += 1
        out: list[str] = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == close and self._closes(self.i):
                self.i += 1
                return "".join(out)
            if c == "\\":
                if self.i + 1 >= len(s):
                    break
                e = s[self.i + 1]
                if e == "u" and _HEX4.fullmatch(s, self.i + 2, self.i + 6):
                    code = int(s[self.i + 2:self.i + 6], 16)
                    self.i += 6
                    if 0xD800 <= code < 0xDC00 and s.startswith("\\u", self.i) and _HEX4.fullmatch(
                            s, self.i + 2, self.i + 6) and 0xDC00 <= int(s[self.i + 2:self.i + 6], 16) < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (int(s[self.i + 2:self.i + 6], 16) - 0xDC00)
                        self.i += 6
                    out.append("\ufffd" if 0xD800 <= code < 0xE000 else chr(code))  # no lone surrogates
                    continue
                out.append(_ESCAPES.get(e, e))
                self.i += 2
                continue
            out.append(c)
            self.i += 1
        self.i = len(s)
        return _PartialStr("".join(out))

    def _closes(self, j: int) -> bool:
        """Whether the quote at j ends the string: what follows must end a value (a quote followed by a letter,
        as in 'it's' or "said "hi" to", is part of the text)."""
        s, k = self.s, j + 1
        while k < len(s) and s[k] in " \t":
            k += 1
        if k >= len(s) or s[k] in ",}]:\n\r":
            return True
        return k > j + 1 and s[k] in _QUOTES

    def key(self) -> str:
        c = self.peek()
        if c in _QUOTES:
            k = self.string()
            if isinstance(k, _Partial):
                raise _Eof()
            return k
        m = _WORD_RE.match(self.s, self.i)
        if m:
            self.i = m.end()
            return m.group(0)
        if not c:
            raise _Eof()
        raise _SyntaxErr(f"unexpected {c!r} where a key should be")

    def obj(self, depth: int) -> dict:
        self.i += 1
        d: dict = {}
        while True:
            self.ws()
            c = self.peek()
            if not c:
                return _PartialDict(d)
            if c == "}":
                self.i += 1
                return d
            if c == ",":
                self.i += 1
                continue
            try:
                k = self.key()
                self.ws()
                if self.peek() in (":", "="):
                    self.i += 1
                elif not self.peek():
                    raise _Eof()
                else:
                    raise _SyntaxErr(f"expected ':' after key {k!r}")
                v = self.value(depth + 1, in_object=True)
            except _Eof:
                return _PartialDict(d)
            except _SyntaxErr as e:
                out = _PartialDict(d)
                out.reason = f"syntax error ({e}) at offset {self.i}"
                return out
            if v is _MISSING:
                return _PartialDict(d)
            d[k] = v
            if isinstance(v, _Partial):
                out = _PartialDict(d)
                out.reason = v.reason
                return out

    def arr(self, depth: int) -> list:
        self.i += 1
        a: list = []
        while True:
            self.ws()
            c = self.peek()
            if not c:
                return _PartialList(a)
            if c == "]":
                self.i += 1
                return a
            if c == ",":
                self.i += 1
                continue
            try:
                v = self.value(depth + 1)
            except _SyntaxErr as e:
                out = _PartialList(a)
                out.reason = f"syntax error ({e}) at offset {self.i}"
                return out
            if v is _MISSING:
                return _PartialList(a)
            a.append(v)
            if isinstance(v, _Partial):
                nxt = self.s.find("{", self.i)
                if isinstance(v, dict) and v.reason != "truncated" and nxt >= 0:
                    self.i = nxt  # skip the broken object, go on with the next one
                    continue
                out = _PartialList(a)
                out.reason = v.reason
                return out


class _Eof(Exception):
    pass


# ----------------------------------------------------------------------------------------------- extraction
def _norm_key(k: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(k).strip().lower())


def _lookup(d: dict, aliases: Sequence[str]) -> tuple[str, Any] | None:
    keys = {_norm_key(k): k for k in d}
    for a in aliases:
        if a in keys:
            return keys[a], d[keys[a]]
    return None


def _is_weightlike(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
        isinstance(v, str) and math.isfinite(weight_value(v)[0]))


def _item_from_dict(d: dict) -> tuple[VerbalizedItem | None, str]:
    """An item from an object with aliased keys, or (None, reason)."""
    text_hit = _lookup(d, TEXT_KEYS)
    if text_hit is None:  # fall back on a key that merely contains "text"/"response"
        for k, v in d.items():
            nk = _norm_key(k)
            if isinstance(v, str) and ("text" in nk or "response" in nk or "answer" in nk):
                text_hit = (k, v)
                break
    if text_hit is None:
        strings = [(k, v) for k, v in d.items() if isinstance(v, str) and _norm_key(k) not in
                   WEIGHT_KEYS + REASONING_KEYS and not _is_weightlike(v)]
        if len(strings) == 1:
            text_hit = strings[0]
    if text_hit is None:
        return None, "no text field"
    text = text_hit[1]
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        return None, f"text field {text_hit[0]!r} is not a string"
    raw, key = None, None
    hit = _lookup(d, WEIGHT_KEYS)
    if hit is None:
        for k, v in d.items():
            if "prob" in _norm_key(k) or "confidence" in _norm_key(k):
                hit = (k, v)
                break
    if hit is not None:
        key, raw = _norm_key(hit[0]), hit[1]
    else:
        nll = _lookup(d, NLL_KEYS)
        ppl = _lookup(d, PERPLEXITY_KEYS)
        if nll is not None:
            key, raw = "nll", nll[1]
        elif ppl is not None:
            key, raw = "perplexity", ppl[1]
    return VerbalizedItem(text=text.strip(), raw_weight=raw, weight_key=key), ""


def _converted(item: VerbalizedItem) -> Any:
    """The written weight on the probability scale (nll and perplexity converted)."""
    if item.weight_key in ("nll", "perplexity"):
        x, _ = weight_value(item.raw_weight)
        if not math.isfinite(x):
            return None
        if item.weight_key == "nll":
            return math.exp(-x) if x >= 0 else None
        return 1.0 / x if x >= 1 else None
    return item.raw_weight


class _Collector:
    def __init__(self) -> None:
        self.items: list[VerbalizedItem] = []
        self.dropped: list[Dropped] = []
        self.reasoning: str | None = None

    def from_list(self, seq: list) -> None:
        for el in seq:
            if isinstance(el, _Partial):
                self.dropped.append(Dropped(_excerpt(el), el.reason))
                continue
            if isinstance(el, dict):
                item, why = _item_from_dict(el)
            elif isinstance(el, str):
                item, why = VerbalizedItem(text=el.strip()), ""
            elif isinstance(el, list) and len(el) == 2 and isinstance(el[0], str) and not isinstance(el[1], list):
                item, why = VerbalizedItem(text=el[0].strip(), raw_weight=el[1], weight_key="probability"), ""
            else:
                item, why = None, "not a response (expected an object, a string or a [text, weight] pair)"
            self.add(item, why, el)

    def add(self, item: VerbalizedItem | None, why: str, source: Any) -> None:
        if item is not None and not item.text:
            item, why = None, "empty text"
        if item is None:
            self.dropped.append(Dropped(_excerpt(source), why))
        else:
            self.items.append(item)

    def from_value(self, v: Any, depth: int = 0) -> None:
        if depth > 4:
            return
        if isinstance(v, list):
            self.from_list(v)
            return
        if not isinstance(v, dict):
            return
        r = _lookup(v, REASONING_KEYS)
        if r is not None and isinstance(r[1], str) and self.reasoning is None:
            self.reasoning = r[1]
        hit = _lookup(v, LIST_KEYS)
        if hit is not None and isinstance(hit[1], (list, dict)):
            self.from_value(hit[1], depth + 1)
            return
        if isinstance(v, _Partial) and _lookup(v, TEXT_KEYS) is not None:
            self.dropped.append(Dropped(_excerpt(dict(v)), v.reason))
            return
        if _lookup(v, TEXT_KEYS) is not None:
            self.add(*_item_from_dict(v), v)
            return
        named = {_norm_key(k) for k in v}
        if v and all(_is_weightlike(x) for x in v.values()) and not named & set(WEIGHT_KEYS + TEXT_KEYS):
            for k, x in v.items():  # {"response text": probability, ...}
                self.add(VerbalizedItem(text=str(k).strip(), raw_weight=x, weight_key="probability"), "", k)
            return
        for x in v.values():
            if isinstance(x, (list, dict)):
                before = len(self.items)
                self.from_value(x, depth + 1)
                if len(self.items) > before:
                    return


_START_RE = re.compile(r"[\[{]")


def _json_candidates(text: str) -> list[tuple[_Collector, bool]]:
    """Parse from each '{' / '[' not inside an earlier parsed value; each with its items and truncation flag."""
    out = []
    pos = 0
    tries = 0
    while tries < _MAX_STARTS:
        m = _START_RE.search(text, pos)
        if m is None:
            break
        tries += 1
        reader = _Reader(text, m.start())
        try:
            v = reader.value(0)
        except (_SyntaxErr, _Eof, RecursionError):
            pos = m.start() + 1
            continue
        col = _Collector()
        col.from_value(v)
        truncated = isinstance(v, _Partial) and v.reason == "truncated"
        if col.items or col.reasoning is not None:
            out.append((col, truncated))
        pos = max(reader.i, m.start() + 1)
    return out


_MARKER_RE = re.compile(
    r"^\s*(?:\*\*)?(?:\d{1,3}\s*[.):\]]|\(\d{1,3}\)|[-*\u2022+]|(?:response|answer|option|item|sample|idea)"
    r"\s*#?\s*\d{1,3}\s*[:.)\-])(?:\*\*)?(?:\s+(.*\S))?\s*$", re.IGNORECASE)
_TRAIL_LABELLED_RE = re.compile(
    r"[\s,;:\u2013\u2014-]*[(\[]?\s*\b(?:probability|prob|p|confidence|weight|likelihood)\s*[:=]\s*"
    r"((?:\d+(?:\.\d*)?|\.\d+)\s*%?)\s*[)\]]?\s*$", re.IGNORECASE)
_TRAIL_BARE_RE = re.compile(r"[\s,;:\u2013\u2014-]*[(\[]\s*((?:\d+(?:\.\d*)?|\.\d+)\s*%|0?\.\d+|1\.0*)\s*[)\]]\s*$")


def _list_items(text: str) -> _Collector:
    """Items of a numbered or bulleted list; lines after a marker continue its item until the next marker."""
    col = _Collector()
    current: list[str] | None = None
    blocks: list[list[str]] = []
    for line in text.splitlines():
        m = _MARKER_RE.match(line)
        if m:
            current = [m.group(1) or ""]
            blocks.append(current)
        elif current is not None:
            if line.strip():
                current.append(line.strip())
            elif current[-1] != "":
                current.append("")  # a blank line; trailing ones are stripped below
    for block in blocks:
        body = "\n".join(block).strip()
        raw = None
        for rx in (_TRAIL_LABELLED_RE, _TRAIL_BARE_RE):
            m = rx.search(body)
            if m and m.start() > 0:
                raw, body = m.group(1).replace(" ", ""), body[:m.start()].rstrip()
                break
        body = body.strip()
        if len(body) >= 2 and body[0] == body[-1] and body[0] in "\"'":
            body = body[1:-1].strip()
        col.add(VerbalizedItem(text=body, raw_weight=raw, weight_key="probability" if raw is not None else None),
                "", "\n".join(block))
    return col


# Fence lines only (and a fence opening or closing the whole output): "```" inside a JSON string is content.
_FENCE_RE = re.compile(r"^[ \t]*```[A-Za-z0-9_+-]*[ \t]*$|\A\s*```[A-Za-z0-9_+-]*|```\s*\Z", re.M)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)


def parse_verbalized(output: Any, *, allow_list: bool = True, max_items: int | None = None,
                     percent_scale: bool | Literal["auto"] = "auto") -> ParseResult:
    """Parse model output into a verbalised distribution; never raises (failures land in `dropped`).

    JSON items win when there are any; otherwise (with `allow_list`) a numbered/bulleted list. `max_items`
    keeps the first items written (the rest are reported as dropped). Weights are repaired with
    `repair_weights(percent_scale)` over the kept items."""
    try:
        return _parse(output, allow_list, max_items, percent_scale)
    except Exception as e:  # a parser bug must not take a sampling run down; report it instead
        return ParseResult(items=[], dropped=[Dropped(_excerpt(str(output)[:200] if output is not None else ""),
                                                      f"parser error: {type(e).__name__}: {e}")])


def _parse(output: Any, allow_list: bool, max_items: int | None,
           percent_scale: bool | Literal["auto"]) -> ParseResult:
    text = output if isinstance(output, str) else ("" if output is None else str(output))
    reasoning = None
    thinks = _THINK_RE.findall(text)
    if thinks:
        reasoning = "\n".join(t.strip() for t in thinks)
        text = _THINK_RE.sub("", text)
    text = _FENCE_RE.sub("", text)
    fmt: Literal["json", "list", "none"] = "none"
    truncated = False
    cands = _json_candidates(text)
    col = None
    if cands:
        best = max(range(len(cands)), key=lambda i: (len(cands[i][0].items), -i))
        col, truncated = cands[best]
        if col.items:
            fmt = "json"
        if col.reasoning is not None:
            reasoning = col.reasoning if reasoning is None else reasoning + "\n" + col.reasoning
    if fmt == "none" and allow_list:
        lst = _list_items(text)
        if lst.items:
            col, fmt, truncated = lst, "list", False
    if col is None or fmt == "none":
        why = "no JSON items and no list found" if allow_list else "no JSON items found"
        dropped = list(col.dropped) if col is not None else []
        return ParseResult(items=[], dropped=dropped + [Dropped(_excerpt(text.strip()), why)], format="none",
                           reasoning=reasoning)
    items, dropped = list(col.items), list(col.dropped)
    if max_items is not None and len(items) > max_items:
        dropped += [Dropped(_excerpt(it.text), f"beyond the {max_items} items asked for") for it in
                    items[max_items:]]
        items = items[:max_items]
    weights = repair_weights([_converted(it) for it in items], percent_scale)
    items = [dataclasses.replace(it, weight=float(w)) for it, w in zip(items, weights)]
    return ParseResult(items=items, dropped=dropped, format=fmt, truncated=truncated, reasoning=reasoning)


_ANSWER_RE = re.compile(r"(?:^|\n)\s*(?:\*\*)?(?:final\s+(?:response|answer)|response|answer)(?:\*\*)?\s*[:\-]"
                        r"(?:\*\*)?\s*", re.IGNORECASE)


def split_reasoning(output: str, marker: str | None = None) -> tuple[str, str]:
    """(reasoning, answer) of a chain-of-thought output: the answer follows the last `marker` (or, without a
    marker, the last line starting "Final response:", "Final answer:", "Answer:" or "Response:"); the whole
    text is the answer when there is no marker. Never raises."""
    text = output if isinstance(output, str) else str(output)
    text = _THINK_RE.sub("", text) if _THINK_RE.search(text) else text
    if marker:
        pos = text.lower().rfind(marker.lower())
        if pos >= 0:
            return text[:pos].strip(), text[pos + len(marker):].strip()
    hits = list(_ANSWER_RE.finditer(text))
    if hits:
        m = hits[-1]
        answer = text[m.end():].strip()
        if answer:
            return text[:m.start()].strip(), answer
    return "", text.strip()
