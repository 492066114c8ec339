"""The teacher programs of the world (v2): the behaviours the policy is pretrained to imitate.

- draft: an answer under x, x+z or p+x+z. Without z the default style and the popularity of items decide; with z
  each preference is honoured independently and RARELY (`attend`, order 0.2), with the quality instruction p more
  often (`attend_quality`, order 0.5), so few drafts satisfy all three preferences;
- critique: deterministic, names every violation in a fixed order (task.violations), never a false alarm;
- refine: copies the draft and applies each NAMED fix with high probability (`fix_named`), an unnamed one rarely
  (`fix_unnamed`); without feedback it fixes little (`fix_without_feedback`);
- judge: the answer with fewer violations (ties have no label); without chain of thought a `judge_position_bias`
  share of labels says "1" whatever the answers; with chain of thought the rationale is the two critiques;
- verbalized: a KNOWN base distribution p_base per category (item popularity); direct single-item answers sample
  it, verbalised lists give k distinct items with their renormalised p_base.

Every draw takes an explicit numpy Generator, so a corpus is a pure function of its seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from prs_jax.world.task import (
    CATEGORIES,
    INTROS,
    ITEM_KINDS,
    KINDS,
    NUMBER_WORDS,
    PROMPT_FORMS,
    SINGLE_FORMS,
    Answer,
    Pref,
    Prompt,
    gold_reward,
    violations,
)

Condition = Literal["x", "xz", "pxz"]  # prompt only (Rand), prompt + preference (PRand), + quality instruction


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """Rates of the teacher programs (probabilities unless named otherwise)."""

    intro_default: float = 0.75  # style choices when no preference asks otherwise
    numbered_default: float = 0.15
    thanks_default: float = 0.1
    capitalised_default: float = 0.1
    count_error: float = 0.15  # wrong number of items (one off)
    count_error_quality: float = 0.05
    off_topic: float = 0.05  # per item: one from another category
    off_topic_quality: float = 0.02
    repeat: float = 0.05  # one item named twice
    repeat_quality: float = 0.02
    attend: float = 0.2  # per preference: the draft honours it (given z)
    attend_quality: float = 0.5  # the same with the quality instruction p
    fix_named: float = 0.9  # refinement fixes a named issue
    fix_unnamed: float = 0.05  # ... and an issue the feedback did not name
    fix_without_feedback: float = 0.15  # refinement without feedback fixes each issue
    judge_position_bias: float = 0.2  # share of non-CoT judge labels that say "1" whatever the answers
    rating_noise: float = 1.0  # std of the 1..10 rating around 1 + 9 r*
    popularity_power: float = 1.2  # p_base(item) ~ rank^-power (within a category)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in ("rating_noise", "popularity_power"):
                if v < 0:
                    raise ValueError(f"behaviour.{f.name} must be >= 0, got {v}")
            elif not 0.0 <= v <= 1.0:
                raise ValueError(f"behaviour.{f.name} is a probability and must lie in [0, 1], got {v}")


class World:
    """Prompt sampler plus the teacher programs, with the per-category popularity (p_base) fixed by `seed`."""

    def __init__(self, behaviour: Behaviour = Behaviour(), seed: int = 0):
        self.b = behaviour
        rng = np.random.default_rng([seed, 0])
        self.ranked = {c: tuple(items[i] for i in rng.permutation(len(items))) for c, items in CATEGORIES.items()}
        w = 1.0 / np.arange(1, 11) ** behaviour.popularity_power
        self.weights = w / w.sum()

    def p_base(self, category: str) -> dict[str, float]:
        """The known base distribution of a single-item answer in `category` (item -> probability)."""
        return {item: float(w) for item, w in zip(self.ranked[category], self.weights)}

    # ------------------------------------------------------------------------------------------ prompts
    def sample_prompt(self, rng: np.random.Generator, n_prefs: int | None = 3) -> Prompt:
        """A random request with `n_prefs` compatible preferences of distinct kinds (None: one to three); the
        items they name are distinct."""
        cat = str(rng.choice(list(CATEGORIES)))
        k = n_prefs if n_prefs is not None else int(rng.integers(1, 4))
        kinds = [str(s) for s in rng.choice(KINDS, size=k, replace=False)]
        used: set[str] = set()
        prefs = []
        for kind in sorted(kinds, key=KINDS.index):
            item = None
            if kind in ITEM_KINDS:
                # include / first / last name items the unconditioned answer rarely puts there; exclude a popular one
                pool = self.ranked[cat][:3] if kind == "exclude" else self.ranked[cat][3:] if kind != "include" \
                    else self.ranked[cat][5:]
                item = str(rng.choice([i for i in pool if i not in used]))
                used.add(item)
            prefs.append(Pref(kind, item, int(rng.integers(0, 2))))
        order = rng.permutation(len(prefs))
        return Prompt(cat, int(rng.choice(list(NUMBER_WORDS))), tuple(prefs[i] for i in order),
                      int(rng.integers(len(PROMPT_FORMS))))

    def sample_single(self, rng: np.random.Generator) -> Prompt:
        """A single-item request of the verbalized-sampling task ("Name a fruit.")."""
        return Prompt(str(rng.choice(list(CATEGORIES))), 1, (), int(rng.integers(len(SINGLE_FORMS))))

    # ------------------------------------------------------------------------------------------ answers
    def _pick(self, rng: np.random.Generator, cat: str, k: int, avoid: Sequence[str] = ()) -> list[str]:
        pool = [i for i in self.ranked[cat] if i not in avoid]
        if not pool or k <= 0:
            return []
        w = np.array([self.weights[self.ranked[cat].index(i)] for i in pool])
        k = min(k, len(pool))
        return [str(i) for i in rng.choice(pool, size=k, replace=False, p=w / w.sum())]

    def draft(self, p: Prompt, cond: Condition, rng: np.random.Generator, rates: Behaviour | None = None) -> Answer:
        """One answer from the teacher's distribution under condition `cond` (`rates` overrides the world's
        behaviour, e.g. the error-rich `drill_rates` of the critique drills)."""
        if p.n == 1:
            return Answer(tuple(self._pick(rng, p.category, 1)), intro=None)
        b, q = rates or self.b, cond == "pxz"
        n = p.n
        if rng.random() < (b.count_error_quality if q else b.count_error):
            n += int(rng.choice([-1, 1]))
        items = self._pick(rng, p.category, n)
        for i in range(len(items)):
            if rng.random() < (b.off_topic_quality if q else b.off_topic):
                other = str(rng.choice([c for c in CATEGORIES if c != p.category]))
                items[i] = self._pick(rng, other, 1)[0]
        if len(items) >= 2 and rng.random() < (b.repeat_quality if q else b.repeat):
            j = int(rng.integers(1, len(items)))
            items[j] = items[int(rng.integers(0, j))]
        ans = Answer(tuple(items), intro=int(rng.integers(len(INTROS))) if rng.random() < b.intro_default else None,
                     numbered=bool(rng.random() < b.numbered_default), thanks=bool(rng.random() < b.thanks_default),
                     capitalised=bool(rng.random() < b.capitalised_default))
        if cond == "x":
            return ans
        attend = b.attend_quality if q else b.attend
        honoured = [pref.issue for pref in p.prefs if rng.random() < attend]
        return self.apply_fixes(p, ans, honoured, rng)

    def apply_fixes(self, p: Prompt, ans: Answer, issues: Sequence[str], rng: np.random.Generator) -> Answer:
        """Apply the named fixes (see task.violations for their names); positional ones (first, last) go last,
        so that no fix undoes a preference the answer already meets."""
        items = list(ans.items)
        intro, numbered, thanks, caps = ans.intro, ans.numbered, ans.thanks, ans.capitalised
        protected = {pref.item for pref in p.prefs if pref.kind in ("include", "first", "last")}
        banned = {pref.item for pref in p.prefs if pref.kind == "exclude"}
        kinds = [i.partition(":") for i in issues]

        def replace(j: int) -> None:
            items[j] = (self._pick(rng, p.category, 1, avoid=[*items, *banned, *protected]) or [items[j]])[0]

        def make_room(item: str) -> None:  # add `item`, dropping a free item when the list is full
            free = [j for j, i in enumerate(items) if i not in protected]
            if len(items) >= p.n and free:
                items.pop(free[int(rng.integers(len(free)))])
            items.append(item)

        for kind, _, item in kinds:
            if kind == "count":
                while len(items) > p.n:
                    drop = [j for j, i in enumerate(items) if i not in protected] or [len(items) - 1]
                    items.pop(drop[-1])
                if len(items) < p.n:
                    items += self._pick(rng, p.category, p.n - len(items), avoid=[*items, *banned, *protected])
            elif kind == "off":
                idx = [j for j, i in enumerate(items) if i == item]
                if idx:
                    replace(idx[0])
            elif kind == "repeat":
                idx = [j for j, i in enumerate(items) if i == item]
                if len(idx) >= 2:
                    replace(idx[-1])
            elif kind == "include" and item not in items:
                make_room(item)
            elif kind == "exclude":
                for j, i in enumerate(items):
                    if i == item:
                        replace(j)
            elif kind == "numbered":
                numbered = True
            elif kind == "capitalised":
                caps = True
            elif kind == "no_intro":
                intro = None
            elif kind == "thanks":
                thanks = True
        for kind, _, item in kinds:
            if kind in ("first", "last"):
                if item not in items:
                    make_room(item)
                items.remove(item)
                if kind == "first":
                    items.insert(0, item)
                else:
                    items.append(item)
        if any(k == "last" for k, _, _ in kinds) and any(k == "first" for k, _, _ in kinds):
            first = next(i for k, _, i in kinds if k == "first")
            if first in items and items[0] != first:  # `last` moved the first item: put it back
                items.remove(first)
                items.insert(0, first)
        return Answer(tuple(items), intro, numbered, thanks, caps)

    # ------------------------------------------------------------------------------------------ reflection
    def feedback(self, p: Prompt, ans: Answer, rng: np.random.Generator | None = None) -> list[str]:
        """The critique: every violation, in task.violations' fixed order (deterministic; `rng` is unused)."""
        return violations(p.x, p.z, ans.text())

    def refine(self, p: Prompt, ans: Answer, named: Sequence[str] | None, rng: np.random.Generator) -> Answer:
        """A refinement of `ans`: after feedback naming `named` issues, or without feedback (None)."""
        true = violations(p.x, p.z, ans.text())
        if named is None:
            fix = [v for v in true if rng.random() < self.b.fix_without_feedback]
        else:
            fix = [v for v in named if rng.random() < self.b.fix_named]
            fix += [v for v in true if v not in named and rng.random() < self.b.fix_unnamed]
        return self.apply_fixes(p, ans, fix, rng)

    # ------------------------------------------------------------------------------------------ judging
    def judge(self, p: Prompt, a: Answer, b: Answer, rng: np.random.Generator, cot: bool = False) -> int | None:
        """1 or 2: the answer with fewer violations; None for a tie. Without chain of thought a
        `judge_position_bias` share of labels is "1" whatever the answers (the bias the labeler must not learn
        to rely on, and RLAIF's debiasing removes)."""
        va, vb = len(self.feedback(p, a)), len(self.feedback(p, b))
        if va == vb:
            return None
        better = 1 if va < vb else 2
        if not cot and rng.random() < self.b.judge_position_bias:
            return 1
        return better

    def rating(self, p: Prompt, a: Answer, rng: np.random.Generator) -> int:
        """A 1..10 rating of one answer around 1 + 9 r*."""
        r = gold_reward(p.x, a.text(), p.z)
        return int(np.clip(np.rint(1 + 9 * r + rng.normal(0.0, self.b.rating_noise)), 1, 10))

    def verbalized(self, p: Prompt, k: int, rng: np.random.Generator) -> list[tuple[Answer, float]]:
        """k distinct answers with probabilities (descending, whole percents summing to 1). Single-item
        requests: k distinct items drawn from p_base, each with its renormalised p_base. Lists: k distinct x+z
        drafts, each weighted by the product of its items' p_base, renormalised."""
        if p.n == 1:
            items = self._pick(rng, p.category, k)
            answers = [Answer((i,), intro=None) for i in items]
            base = self.p_base(p.category)
            w = np.array([base[i] for i in items])
        else:
            seen: dict[str, Answer] = {}
            for _ in range(20 * k):
                a = self.draft(p, "xz", rng)
                seen.setdefault(a.text(), a)
                if len(seen) == k:
                    break
            answers = list(seen.values())
            base = self.p_base(p.category)
            w = np.array([np.prod([base.get(i, 1e-3) for i in a.items]) for a in answers])
        order = np.argsort(-w, kind="stable")
        probs = _percents(w[order] / w.sum())
        return [(answers[i], pr) for i, pr in zip(order, probs)]


def drill_rates(b: Behaviour) -> Behaviour:
    """Error-rich draft rates for the critique drills: the rare violations (a wrong count, an item from another
    category, a repeated item) are common, and each preference is met half the time, so a critic has to look at
    the answer instead of relying on how often a violation occurs."""
    return dataclasses.replace(b, count_error=0.3, count_error_quality=0.3, off_topic=0.12, off_topic_quality=0.12,
                               repeat=0.5, repeat_quality=0.5, attend=0.5, attend_quality=0.5)


def _percents(p: np.ndarray) -> list[float]:
    """Probabilities rounded to whole percents (at least 1% each) that sum to exactly 1."""
    pc = np.maximum(np.rint(p * 100), 1)
    pc[int(np.argmax(pc))] += 100 - pc.sum()
    return [float(x) / 100 for x in pc]
