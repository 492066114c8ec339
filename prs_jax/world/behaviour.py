"""The noisy behaviours the world's policy is pretrained to imitate (the "teacher" programs behind the corpus).

Each behaviour is a sampler over structured answers with named noise rates (`Behaviour`), so that the
pretrained policy's samples vary in gold reward, feedback is informative but imperfect, refinement fixes part
of what the feedback names, a quality instruction p lowers the noise, and the judge is position-biased when
the two answers are close. The rates are the world's knobs; the tests measure what the trained policy actually
learned from them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from prs_jax.world.task import (
    CATEGORIES,
    INTROS,
    KINDS,
    NUMBER_WORDS,
    PROMPT_FORMS,
    Answer,
    Pref,
    Prompt,
    gold_reward,
    violations,
)

Condition = Literal["x", "xz", "pxz"]  # prompt only (Rand), prompt + preference (PRand), + quality instruction


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """Noise rates of the teacher programs (probabilities unless named otherwise)."""

    intro_default: float = 0.6  # style choices when no preference asks otherwise
    numbered_default: float = 0.25
    thanks_default: float = 0.15
    count_error: float = 0.15  # wrong number of items (one off)
    count_error_quality: float = 0.05
    off_topic: float = 0.06  # per item: one from another category
    off_topic_quality: float = 0.02
    repeat: float = 0.05  # one item named twice
    repeat_quality: float = 0.02
    attend: float = 0.5  # per preference: the draft honours it (given z)
    attend_quality: float = 0.85  # the same with the quality instruction p
    feedback_recall: float = 0.85  # a true violation is named
    feedback_false_alarm: float = 0.05  # a satisfied preference is named anyway
    fix_named: float = 0.8  # refinement fixes a named issue
    fix_unnamed: float = 0.1  # ... and an issue the feedback missed
    fix_without_feedback: float = 0.35  # refinement without feedback fixes each issue
    judge_margin: float = 0.15  # |gold difference| below this: the judge is unsure
    judge_accuracy: float = 0.9  # sure: picks the better answer
    judge_position_bias: float = 0.8  # unsure: picks position 1
    judge_cot_accuracy: float = 0.95  # after writing a rationale that lists each answer's problems
    rating_noise: float = 1.0  # std of the 1..10 rating around 1 + 9 r*
    popularity_power: float = 1.2  # item popularity ~ rank^-power (within a category)


class World:
    """Prompt sampler plus the teacher behaviours, with the per-category popularity fixed by `seed`."""

    def __init__(self, behaviour: Behaviour = Behaviour(), seed: int = 0):
        self.b = behaviour
        rng = np.random.default_rng(seed)
        self.ranked = {c: tuple(items[i] for i in rng.permutation(len(items))) for c, items in CATEGORIES.items()}
        w = 1.0 / np.arange(1, 11) ** behaviour.popularity_power
        self.weights = w / w.sum()

    # ------------------------------------------------------------------------------------------ prompts
    def sample_prompt(self, rng: np.random.Generator, n_prefs: int | None = None) -> Prompt:
        """A random request with one to three compatible preferences."""
        cat = str(rng.choice(list(CATEGORIES)))
        k = n_prefs if n_prefs is not None else int(rng.integers(1, 4))
        kinds = list(rng.choice(KINDS, size=k, replace=False))
        prefs = []
        for kind in kinds:
            item = None
            if kind == "include":
                item = str(rng.choice(self.ranked[cat][5:]))  # rarely named without being asked
            elif kind == "exclude":
                item = str(rng.choice(self.ranked[cat][:3]))  # usually named without being asked
            prefs.append(Pref(str(kind), item, int(rng.integers(0, 2))))
        return Prompt(cat, int(rng.choice(list(NUMBER_WORDS))), tuple(prefs), int(rng.integers(len(PROMPT_FORMS))))

    # ------------------------------------------------------------------------------------------ answers
    def _pick(self, rng: np.random.Generator, cat: str, k: int, avoid: Sequence[str] = ()) -> list[str]:
        pool = [i for i in self.ranked[cat] if i not in avoid]
        w = np.array([self.weights[self.ranked[cat].index(i)] for i in pool])
        k = min(k, len(pool))
        return [str(i) for i in rng.choice(pool, size=k, replace=False, p=w / w.sum())]

    def draft(self, p: Prompt, cond: Condition, rng: np.random.Generator) -> Answer:
        """One answer from the policy's teacher distribution under condition `cond`."""
        b, q = self.b, cond == "pxz"
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
                     numbered=bool(rng.random() < b.numbered_default), thanks=bool(rng.random() < b.thanks_default))
        if cond == "x":
            return ans
        attend = b.attend_quality if q else b.attend
        honoured = [pref for pref in p.prefs if rng.random() < attend]
        return self.apply_fixes(p, ans, [_issue(pref) for pref in honoured], rng)

    def apply_fixes(self, p: Prompt, ans: Answer, issues: Sequence[str], rng: np.random.Generator) -> Answer:
        """Fix the named issues (see task.violations for their names); sorting goes last."""
        items = list(ans.items)
        intro, numbered, thanks = ans.intro, ans.numbered, ans.thanks
        protected = {pref.item for pref in p.prefs if pref.kind == "include"}
        banned = {pref.item for pref in p.prefs if pref.kind == "exclude"}
        for issue in issues:
            kind, _, item = issue.partition(":")
            if kind == "count":
                while len(items) > p.n:
                    drop = [j for j, i in enumerate(items) if i not in protected] or [len(items) - 1]
                    items.pop(drop[-1])
                if len(items) < p.n:
                    items += self._pick(rng, p.category, p.n - len(items), avoid=[*items, *banned])
            elif kind in ("off", "repeat"):
                idx = [j for j, i in enumerate(items) if i == item]
                j = idx[-1] if kind == "repeat" else idx[0] if idx else None
                if j is not None:
                    items[j] = (self._pick(rng, p.category, 1, avoid=[*items, *banned]) or [items[j]])[0]
            elif kind == "include" and item not in items:
                free = [j for j, i in enumerate(items) if i not in protected]
                if len(items) < p.n or not free:
                    items.append(item)
                else:
                    items[int(rng.choice(free))] = item
            elif kind == "exclude":
                for j, i in enumerate(items):
                    if i == item:
                        items[j] = (self._pick(rng, p.category, 1, avoid=[*items, *banned]) or [i])[0]
            elif kind == "numbered":
                numbered = True
            elif kind == "no_intro":
                intro = None
            elif kind == "thanks":
                thanks = True
        if "sorted" in issues:
            items = sorted(items)
        return Answer(tuple(items), intro, numbered, thanks)

    # ------------------------------------------------------------------------------------------ reflection
    def feedback(self, p: Prompt, ans: Answer, rng: np.random.Generator) -> list[str]:
        """Issues named by the self-feedback: most true violations, now and then a false alarm."""
        true = violations(p.x, p.z, ans.text())
        named = [v for v in true if rng.random() < self.b.feedback_recall]
        kinds_wrong = {v.split(":")[0] for v in true}
        for pref in p.prefs:
            if pref.kind not in kinds_wrong and rng.random() < self.b.feedback_false_alarm:
                named.append(_issue(pref))
        return named

    def refine(self, p: Prompt, ans: Answer, named: Sequence[str] | None, rng: np.random.Generator) -> Answer:
        """A refinement of `ans`: with feedback (named issues) or without (None)."""
        true = violations(p.x, p.z, ans.text())
        if named is None:
            fix = [v for v in true if rng.random() < self.b.fix_without_feedback]
        else:
            fix = [v for v in named if rng.random() < self.b.fix_named]
            fix += [v for v in true if v not in named and rng.random() < self.b.fix_unnamed]
        return self.apply_fixes(p, ans, fix, rng)

    # ------------------------------------------------------------------------------------------ judging
    def judge(self, p: Prompt, a: Answer, b: Answer, rng: np.random.Generator, cot: bool = False) -> int:
        """1 or 2: which answer the (noisy, position-biased) judge prefers."""
        ra, rb = gold_reward(p.x, a.text(), p.z), gold_reward(p.x, b.text(), p.z)
        better = 1 if ra >= rb else 2
        if cot:
            return better if ra != rb and rng.random() < self.b.judge_cot_accuracy else (
                1 if ra == rb else 3 - better)
        if abs(ra - rb) < self.b.judge_margin:
            return 1 if rng.random() < self.b.judge_position_bias else 2
        return better if rng.random() < self.b.judge_accuracy else 3 - better

    def rating(self, p: Prompt, a: Answer, rng: np.random.Generator) -> int:
        """A 1..10 rating of one answer around 1 + 9 r*."""
        r = gold_reward(p.x, a.text(), p.z)
        return int(np.clip(np.rint(1 + 9 * r + rng.normal(0.0, self.b.rating_noise)), 1, 10))

    def verbalized(self, p: Prompt, k: int, rng: np.random.Generator) -> list[tuple[Answer, float]]:
        """k distinct answers with probabilities (descending, multiples of 0.05, summing to 1)."""
        seen: dict[str, Answer] = {}
        for _ in range(20 * k):
            a = self.draft(p, "xz", rng)
            seen.setdefault(a.text(), a)
            if len(seen) == k:
                break
        answers = list(seen.values())
        probs = np.sort(rng.dirichlet(np.full(len(answers), 2.0)))[::-1]
        probs = np.maximum(np.round(probs * 20) / 20, 0.05)
        probs[0] += 1.0 - probs.sum()
        return list(zip(answers, [float(round(x, 2)) for x in probs]))


def _issue(pref: Pref) -> str:
    return pref.kind + (f":{pref.item}" if pref.item else "")
