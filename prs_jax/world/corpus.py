"""Texts of the world (our wording) and its programmatic corpora (v2): the policy's SFT conversations, the
labelers' judge and critique rows, and the proxy reward model's pairs.

The SFT conversations are chat messages in TRL's `messages` format, so the world's policy is pretrained through
the same data path (chat template, assistant-only loss) as any real checkpoint. The reflection turns use
`world_templates()`, which is what PRS is given when it runs in the world, so the policy has seen exactly the
turns PRS appends on the tree. Each row carries a `kind` (its skill) for the loss-share report.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from prs_jax.data.pairs import augment_prompt
from prs_jax.feedback.prompts import PromptBuilder, PromptConfig
from prs_jax.strategies.base import join_preference
from prs_jax.strategies.templates import PRSTemplates
from prs_jax.world.behaviour import Condition, World, drill_rates
from prs_jax.world.task import CATEGORIES, NUMBER_WORDS, Answer, Prompt, gold_reward, violations

# Quality instruction p of the world (Sr-DPO's prompt augmentation): drafts under it honour preferences more often.
QUALITY_INSTRUCTION = "Give your best answer."
# The preference is already in the conversation, so the reflection turns do not repeat it (shorter sequences).
FEEDBACK_TURN = "Check your answer against my preference. What should change?"
REFINE_TURN = "Now write the improved answer."
REFINE_TURN_NO_FEEDBACK = "Improve your answer for my preference."
CRITIQUE_REQUEST = "Request: {query}\nAnswer: {answer}\nWhat should change in the answer?"
# The AI labeler's prompts (RLAIF): rendered by prs_jax.feedback.prompts, so `prs-jax label` with these configs
# asks a world model exactly what it was trained to judge.
JUDGE_PROMPT = PromptConfig(
    task="helpful", preamble="Two answers to one request follow. Say which one fits the request and its preference "
    "better: 1 or 2.", ending="Better answer=", context_name="Request", candidate_name="Answer", chat=True)
RATING_PROMPT = PromptConfig(
    task="helpful", preamble="Rate how well the answer fits the request and its preference, from 1 (poor) to 10 "
    "(perfect).", ending="Rating=", context_name="Request", candidate_name="Answer", chat=True)
VS_SUFFIX = "\n\nGive {k} possible answers with probabilities."
VS_MORE = "Give {k} more possible answers with probabilities."
SEQUENCE_SUFFIX = "\n\nGive {k} different answers."
ONE_MORE = "Give me one more, different answer."
NOTHING = "- nothing to change"


def world_templates() -> PRSTemplates:
    """PRS templates matching the reflection turns the world's policy was trained on (conversation mode)."""
    return PRSTemplates(default_preference="", feedback_turn=FEEDBACK_TURN, refine_turn=REFINE_TURN,
                        refine_turn_no_feedback=REFINE_TURN_NO_FEEDBACK)


def world_vs_templates() -> dict[str, str]:
    """Verbalized-sampling templates in the world's trained wording (prs_jax.strategies.verbalized keys). The
    world trains direct, sequence, multi_turn, vs_standard and vs_multi; not cot / vs_cot or probability bounds."""
    return {"sequence": "{prompt}" + SEQUENCE_SUFFIX, "multi_turn_next": ONE_MORE,
            "vs_standard": "{prompt}" + VS_SUFFIX, "vs_multi": "{prompt}" + VS_SUFFIX, "vs_multi_next": VS_MORE}


def _vs_list(items: Sequence[tuple[Answer, float]]) -> str:
    return "\n".join(f"- {a.text()} ({round(100 * w)}%)" for a, w in items)


_ISSUE_TEXT = {
    "count": "- give exactly {n} items",
    "off": "- {item} is not one of the {cat}",
    "repeat": "- {item} is named twice",
    "include": "- add {item}",
    "exclude": "- remove {item}",
    "first": "- put {item} first",
    "last": "- end the list with {item}",
    "numbered": "- number the items",
    "capitalised": "- capitalise the items",
    "no_intro": "- drop the introduction",
    "thanks": "- end with a thank you",
}
_ISSUE_RES = [(kind, re.compile("^" + re.escape(t).replace(r"\{item\}", r"(?P<item>[a-z]+)")
                                .replace(r"\{n\}", r"\w+").replace(r"\{cat\}", r"\w+") + "$"))
              for kind, t in _ISSUE_TEXT.items()]


def issue_text(p: Prompt, issue: str) -> str:
    """One feedback bullet for a named issue (see task.violations for the names)."""
    kind, _, item = issue.partition(":")
    return _ISSUE_TEXT[kind].format(n=NUMBER_WORDS.get(p.n, p.n), item=item, cat=p.category)


def feedback_text(p: Prompt, issues: Sequence[str]) -> str:
    """The feedback message: one bullet per named issue."""
    return "\n".join(issue_text(p, i) for i in issues) or NOTHING


def parse_feedback(text: str) -> tuple[list[str], int]:
    """The issues a feedback text names (task.violations' names) and the number of lines that are not a
    feedback bullet (0 for a well-formed critique)."""
    issues, bad = [], 0
    for line in (s.strip() for s in text.strip().splitlines()):
        if not line or line == NOTHING:
            continue
        for kind, rx in _ISSUE_RES:
            m = rx.match(line)
            if m:
                item = m.groupdict().get("item")
                issues.append(kind + (f":{item}" if item else ""))
                break
        else:
            bad += 1
    return issues, bad


def rationale_text(p: Prompt, a: Answer, b: Answer) -> str:
    """The judge's chain of thought: the two critiques."""
    def problems(ans: Answer) -> str:
        issues = violations(p.x, p.z, ans.text())
        return "; ".join(issue_text(p, i)[2:] for i in issues) if issues else "fits"
    return f"Answer 1: {problems(a)}. Answer 2: {problems(b)}."


def query(p: Prompt, with_preference: bool = True) -> str:
    """The policy input text: x, or x and z joined as the strategies join them."""
    return join_preference(p.x, p.z) if with_preference else p.x


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Shares of each conversation kind in the SFT corpus (normalised)."""

    answer_x: float = 0.04
    answer_xz: float = 0.10
    answer_pxz: float = 0.05
    critique: float = 0.12  # own draft -> critique (the PRS conversation, stopped after the critique)
    critique_given: float = 0.06  # critique of an answer quoted in the user turn
    critique_drill: float = 0.16  # the same on error-rich answers (behaviour.drill_rates): rare violations
    reflect: float = 0.20  # own draft -> critique -> refinement
    reflect_no_feedback: float = 0.04
    judge: float = 0.03  # the policy keeps a little judging (the separate labelers are trained on much more)
    judge_cot: float = 0.02
    rating: float = 0.01
    vs_direct: float = 0.04  # single-item requests answered from p_base
    vs_list: float = 0.05  # single-item requests, k items with their renormalised p_base
    verbalized: float = 0.02  # list requests, k answers with probabilities
    verbalized_more: float = 0.01
    sequence: float = 0.0025
    multi_turn: float = 0.0025

    def __post_init__(self) -> None:
        vals = [getattr(self, f.name) for f in dataclasses.fields(self)]
        if any(v < 0 for v in vals) or sum(vals) <= 0:
            raise ValueError(f"mixture shares must be >= 0 with a positive sum, got {dataclasses.asdict(self)}")


SKILL_OF_KIND = {"answer_x": "answer", "answer_xz": "answer", "answer_pxz": "answer", "critique": "critique",
                 "critique_given": "critique", "critique_drill": "critique", "reflect": "refine",
                 "reflect_no_feedback": "refine", "judge": "judge", "judge_cot": "judge", "rating": "judge", "vs_direct": "verbalized",
                 "vs_list": "verbalized", "verbalized": "verbalized", "verbalized_more": "verbalized",
                 "sequence": "verbalized", "multi_turn": "verbalized"}


def _judge_pair(world: World, p: Prompt, rng: np.random.Generator, cot: bool) -> tuple[Answer, Answer, int]:
    for _ in range(50):  # ties have no label: draw again
        a = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
        b = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
        if rng.random() < 0.5:
            b = world.refine(p, a, world.feedback(p, a), rng)
            if rng.random() < 0.5:
                a, b = b, a
        label = world.judge(p, a, b, rng, cot=cot)
        if label is not None:
            return a, b, label
    raise RuntimeError(f"no judge pair without a tie for prompt {p.id}")


def conversation(world: World, kind: str, p: Prompt, rng: np.random.Generator) -> dict[str, Any]:
    """One SFT row of `kind` for prompt `p` (messages + a `kind` column for the data report)."""
    msgs: list[dict[str, str]]
    if kind in ("answer_x", "answer_xz", "answer_pxz"):
        cond: Condition = {"answer_x": "x", "answer_xz": "xz", "answer_pxz": "pxz"}[kind]  # type: ignore[assignment]
        user = [_user(query(p, cond != "x"))]
        if cond == "pxz":
            user = augment_prompt(user, QUALITY_INSTRUCTION, "user_turn_start")  # type: ignore[assignment]
        msgs = [*user, _assistant(world.draft(p, cond, rng).text())]
    elif kind in ("critique", "reflect"):
        d = world.draft(p, "xz", rng)
        named = world.feedback(p, d)
        msgs = [_user(query(p)), _assistant(d.text()), _user(FEEDBACK_TURN), _assistant(feedback_text(p, named))]
        if kind == "reflect":
            msgs += [_user(REFINE_TURN), _assistant(world.refine(p, d, named, rng).text())]
    elif kind in ("critique_given", "critique_drill"):
        rates = drill_rates(world.b) if kind == "critique_drill" else None
        d = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng, rates)  # type: ignore[arg-type]
        msgs = [_user(CRITIQUE_REQUEST.format(query=query(p), answer=d.text())),
                _assistant(feedback_text(p, world.feedback(p, d)))]
    elif kind == "reflect_no_feedback":
        d = world.draft(p, "xz", rng)
        msgs = [_user(query(p)), _assistant(d.text()), _user(REFINE_TURN_NO_FEEDBACK),
                _assistant(world.refine(p, d, None, rng).text())]
    elif kind in ("judge", "judge_cot"):
        cot = kind == "judge_cot"
        a, b, label = _judge_pair(world, p, rng, cot)
        judge = PromptBuilder.build(dataclasses.replace(JUDGE_PROMPT, chat=False), "pair")
        if cot:  # chain of thought: the rationale is the two critiques, then the label
            reply = (f"{judge.config.cot_start} {rationale_text(p, a, b)}{judge.config.cot_separator}"
                     f"{judge.ending}{label}")
            msgs = [_user(judge.body(query(p), [a.text(), b.text()], cot=True)), _assistant(reply)]
        else:
            msgs = [_user(judge.body(query(p), [a.text(), b.text()])), _assistant(f"{judge.ending}{label}")]
    elif kind == "rating":
        a = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
        rater = PromptBuilder.build(dataclasses.replace(RATING_PROMPT, chat=False), "direct")
        msgs = [_user(rater.body(query(p), [a.text()])), _assistant(f"{rater.ending}{world.rating(p, a, rng)}")]
    elif kind == "vs_direct":
        s = world.sample_single(rng)
        msgs, p = [_user(s.x), _assistant(world.draft(s, "x", rng).text())], s
    elif kind == "vs_list":
        s = world.sample_single(rng)
        k = int(rng.integers(2, 6))
        msgs, p = [_user(s.x + VS_SUFFIX.format(k=k)), _assistant(_vs_list(world.verbalized(s, k, rng)))], s
    elif kind == "verbalized":
        k = int(rng.integers(2, 5))
        msgs = [_user(query(p) + VS_SUFFIX.format(k=k)), _assistant(_vs_list(world.verbalized(p, k, rng)))]
    elif kind == "verbalized_more":  # VS-Multi: a first list, then k more answers not listed before
        k = int(rng.integers(2, 4))
        items = world.verbalized(p, 2 * k, rng)
        if len(items) < 2 * k:
            items = world.verbalized(p, k, rng) * 2
        first, more = items[:k], items[k:2 * k]
        msgs = [_user(query(p) + VS_SUFFIX.format(k=k)), _assistant(_vs_list(_renorm(first))),
                _user(VS_MORE.format(k=k)), _assistant(_vs_list(_renorm(more)))]
    elif kind == "sequence":
        k = int(rng.integers(2, 5))
        answers = [a for a, _ in world.verbalized(p, k, rng)]
        msgs = [_user(query(p) + SEQUENCE_SUFFIX.format(k=k)), _assistant("\n".join(f"- {a.text()}" for a in answers))]
    elif kind == "multi_turn":
        answers = [a for a, _ in world.verbalized(p, int(rng.integers(2, 4)), rng)]
        msgs = [_user(query(p)), _assistant(answers[0].text())]
        for a in answers[1:]:
            msgs += [_user(ONE_MORE), _assistant(a.text())]
    else:
        raise ValueError(f"unknown conversation kind {kind!r}; known: {[f.name for f in dataclasses.fields(Mixture)]}")
    return {"messages": msgs, "kind": kind, "id": p.id}


def _renorm(items):
    """Probabilities of a sub-list rescaled to sum to 1 (whole percents, at least 1% each)."""
    from prs_jax.world.behaviour import _percents

    w = np.array([x for _, x in items], dtype=float)
    return [(a, x) for (a, _), x in zip(items, _percents(w / w.sum()))]


def sft_corpus(world: World, prompts: list[Prompt], n: int, rng: np.random.Generator,
               mixture: Mixture = Mixture()) -> Iterator[dict[str, Any]]:
    """`n` SFT conversations over `prompts`, kinds drawn by `mixture`."""
    kinds = [f.name for f in dataclasses.fields(mixture)]
    w = np.array([getattr(mixture, k) for k in kinds], dtype=float)
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        yield conversation(world, kind, prompts[int(rng.integers(len(prompts)))], rng)


def _pair_row(p: Prompt, a: str, b: str, source: str) -> dict[str, Any] | None:
    ra, rb = gold_reward(p.x, a, p.z), gold_reward(p.x, b, p.z)
    if ra == rb:
        return None
    chosen, rejected = (a, b) if ra > rb else (b, a)
    # conversational rows: the RM is trained on the chat template, as RewardFormatter(kind="chat") scores
    return {"prompt": [_user(query(p))], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)],
            "gold_margin": abs(ra - rb), "id": p.id, "source": source}


def minimal_pair(world: World, p: Prompt, rng: np.random.Generator) -> dict[str, Any] | None:
    """One answer with and without one fix (the RM learns what each preference is worth, one at a time)."""
    d = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
    issues = world.feedback(p, d)
    if not issues:
        return None
    fixed = world.apply_fixes(p, d, [issues[int(rng.integers(len(issues)))]], rng)
    return _pair_row(p, fixed.text(), d.text(), "minimal")


def preference_pairs(world: World, prompts: list[Prompt], n: int, rng: np.random.Generator,
                     minimal_share: float = 0.4) -> Iterator[dict[str, Any]]:
    """`n` pairs ranked by the gold reward (ties skipped): a `minimal_share` of minimal pairs, the rest two
    answers drawn from every condition and from refinements, so the proxy RM sees what the strategies show it."""
    made = 0
    while made < n:
        p = prompts[int(rng.integers(len(prompts)))]
        if rng.random() < minimal_share:
            row = minimal_pair(world, p, rng)
        else:
            answers = []
            for _ in range(2):
                a = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
                if rng.random() < 0.3:
                    a = world.refine(p, a, world.feedback(p, a), rng)
                answers.append(a.text())
            row = _pair_row(p, answers[0], answers[1], "teacher")
        if row is not None:
            made += 1
            yield row


def sample_pairs(p: Prompt, samples: Sequence[str], rng: np.random.Generator, k: int) -> list[dict[str, Any]]:
    """Up to `k` gold-ranked pairs among one prompt's policy samples (the proxy RM must rank the policy's own
    answers)."""
    out: list[dict[str, Any]] = []
    idx = [i for i, s in enumerate(samples) if s.strip()]  # an empty sample is no answer to rank
    for _ in range(4 * k):
        if len(out) >= k or len(idx) < 2:
            break
        i, j = rng.choice(idx, size=2, replace=False)
        row = _pair_row(p, samples[int(i)], samples[int(j)], "policy")
        if row is not None:
            out.append(row)
    return out


def split_prompts(world: World, n_train: int, n_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint train and held-out prompt sets of three-preference prompts (held-out (x, z) never appear in
    training)."""
    rng = np.random.default_rng([seed, 1])
    train: dict[str, Prompt] = {}
    for _ in range(100 * max(n_train, 1)):
        if len(train) >= n_train:
            break
        p = world.sample_prompt(rng)
        train.setdefault(p.id, p)
    held: dict[str, Prompt] = {}
    rng = np.random.default_rng([seed, 2])
    for _ in range(100 * max(n_eval, 1)):
        if len(held) >= n_eval:
            break
        p = world.sample_prompt(rng)
        if p.id not in train:
            held.setdefault(p.id, p)
    return list(train.values()), list(held.values())


def curriculum_prompts(world: World, n: int, seed: int, exclude: set[str]) -> list[Prompt]:
    """`n` one-preference training prompts (the curriculum's first phase), none of them in `exclude`."""
    rng = np.random.default_rng([seed, 4])
    out: dict[str, Prompt] = {}
    for _ in range(100 * max(n, 1)):
        if len(out) >= n:
            break
        p = world.sample_prompt(rng, n_prefs=1)
        if p.id not in exclude:
            out.setdefault(p.id, p)
    return list(out.values())


def vocabulary_text() -> list[str]:
    """Documents that hold every word of the world's language (items plain and capitalised, at a line start and
    after a space, every phrasing, feedback bullet, number and percent), so a word-level tokenizer trained on a
    small corpus still has them all."""
    from prs_jax.world.task import INTROS, PHRASES, PROMPT_FORMS, SINGLE_FORMS, SINGULAR, THANKS

    items = [i for its in CATEGORIES.values() for i in its]
    docs = [" ".join(items), " ".join(i.capitalize() for i in items), *items, *(i.capitalize() for i in items)]
    docs += [f"{k}. {i}, {i.capitalize()}." for k, i in enumerate(items, start=1)]
    docs += [f"- {i}. ({k}%)\n- {i.capitalize()}. ({k}%)" for k, i in zip(range(1, 101), items * 2)]
    docs += [f.format(n=w, cat=c, one=SINGULAR[c]) for f in (*PROMPT_FORMS, *SINGLE_FORMS) for c in CATEGORIES
             for w in NUMBER_WORDS.values()]
    docs += [t.format(item=i) for forms in PHRASES.values() for t in forms for i in items]
    docs += [*INTROS, THANKS, NOTHING, FEEDBACK_TURN, REFINE_TURN, REFINE_TURN_NO_FEEDBACK, QUALITY_INSTRUCTION]
    docs += [_ISSUE_TEXT[k].format(n=w, item=i, cat=c) for k in _ISSUE_TEXT for c, its in CATEGORIES.items()
             for i in its[:2] + (its[-1],) for w in NUMBER_WORDS.values()]
    return docs


def single_requests() -> list[Prompt]:
    """Every single-item request of the verbalized-sampling task (category x wording)."""
    from prs_jax.world.task import SINGLE_FORMS

    return [Prompt(c, 1, (), f) for c in CATEGORIES for f in range(len(SINGLE_FORMS))]


