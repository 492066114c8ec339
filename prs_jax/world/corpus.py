"""Texts of the world (our wording) and the programmatic corpora: the policy's SFT conversations and the gold-ranked
preference pairs of the proxy reward model.

The SFT conversations are chat messages in TRL's `messages` format, so the world's policy is pretrained through
the same data path (chat template, assistant-only loss) as any real checkpoint. The reflection turns use
`world_templates()`, which is what PRS is given when it runs in the world, so the pretrained policy has seen
exactly the turns PRS appends on the tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from prs_jax.data.pairs import augment_prompt
from prs_jax.feedback.prompts import PromptBuilder, PromptConfig
from prs_jax.strategies.base import join_preference
from prs_jax.strategies.templates import PRSTemplates
from prs_jax.world.behaviour import Condition, World
from prs_jax.world.task import NUMBER_WORDS, Answer, Prompt, violations

# Quality instruction p of the world (Sr-DPO's prompt augmentation): drafts under it are less noisy.
QUALITY_INSTRUCTION = "Give your best answer."
# The preference is already in the conversation, so the reflection turns do not repeat it (shorter sequences).
FEEDBACK_TURN = "Check your answer against my preference. What should change?"
REFINE_TURN = "Now write the improved answer."
REFINE_TURN_NO_FEEDBACK = "Improve your answer for my preference."
# The AI labeler's prompts (RLAIF): rendered by prs_jax.feedback.prompts, so `prs-jax label` with these configs
# asks the world's policy exactly what it was trained to judge.
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


def _vs_list(items) -> str:
    return "\n".join(f"- {a.text()} ({round(100 * w)}%)" for a, w in items)


def issue_text(p: Prompt, issue: str) -> str:
    """One feedback bullet for a named issue (see task.violations for the names)."""
    kind, _, item = issue.partition(":")
    return {
        "count": f"- give exactly {NUMBER_WORDS[p.n]} items",
        "off": f"- {item} is not one of the {p.category}",
        "repeat": f"- {item} is named twice",
        "include": f"- add {item}",
        "exclude": f"- remove {item}",
        "sorted": "- sort the items from A to Z",
        "numbered": "- number the items",
        "no_intro": "- drop the introduction",
        "thanks": "- end with a thank you",
    }[kind]


def feedback_text(p: Prompt, issues: list[str]) -> str:
    """The feedback message: one bullet per named issue."""
    return "\n".join(issue_text(p, i) for i in issues) or NOTHING


def rationale_text(p: Prompt, a: Answer, b: Answer) -> str:
    """What each answer gets wrong (the judge's chain of thought)."""
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

    answer_x: float = 0.12
    answer_xz: float = 0.14
    answer_pxz: float = 0.10
    reflect: float = 0.30
    reflect_no_feedback: float = 0.10
    judge: float = 0.08
    rating: float = 0.05
    verbalized: float = 0.07
    verbalized_more: float = 0.02
    sequence: float = 0.02
    multi_turn: float = 0.02


def conversation(world: World, kind: str, p: Prompt, rng: np.random.Generator) -> dict[str, Any]:
    """One SFT row of `kind` for prompt `p` (messages + a `kind` column for the data report)."""
    msgs: list[dict[str, str]]
    if kind in ("answer_x", "answer_xz", "answer_pxz"):
        cond: Condition = {"answer_x": "x", "answer_xz": "xz", "answer_pxz": "pxz"}[kind]  # type: ignore[assignment]
        user = [_user(query(p, cond != "x"))]
        if cond == "pxz":
            user = augment_prompt(user, QUALITY_INSTRUCTION, "user_turn_start")  # type: ignore[assignment]
        msgs = [*user, _assistant(world.draft(p, cond, rng).text())]
    elif kind == "reflect":
        d = world.draft(p, "xz", rng)
        named = world.feedback(p, d, rng)
        r = world.refine(p, d, named, rng)
        msgs = [_user(query(p)), _assistant(d.text()), _user(FEEDBACK_TURN.format(preference=p.z)),
                _assistant(feedback_text(p, named)), _user(REFINE_TURN), _assistant(r.text())]
    elif kind == "reflect_no_feedback":
        d = world.draft(p, "xz", rng)
        r = world.refine(p, d, None, rng)
        msgs = [_user(query(p)), _assistant(d.text()), _user(REFINE_TURN_NO_FEEDBACK.format(preference=p.z)),
                _assistant(r.text())]
    elif kind == "judge":
        a, b = world.draft(p, "xz", rng), world.draft(p, str(rng.choice(["x", "xz"])), rng)  # type: ignore[arg-type]
        if rng.random() < 0.5:
            a, b = b, a
        judge = PromptBuilder.build(dataclasses.replace(JUDGE_PROMPT, chat=False), "pair")
        if rng.random() < 0.5:  # chain of thought: the rationale lists each answer's problems, then the label
            label = world.judge(p, a, b, rng, cot=True)
            reply = (f"{judge.config.cot_start} {rationale_text(p, a, b)}{judge.config.cot_separator}"
                     f"{judge.ending}{label}")
            msgs = [_user(judge.body(query(p), [a.text(), b.text()], cot=True)), _assistant(reply)]
        else:
            msgs = [_user(judge.body(query(p), [a.text(), b.text()])),
                    _assistant(f"{judge.ending}{world.judge(p, a, b, rng)}")]
    elif kind == "rating":
        a = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
        rater = PromptBuilder.build(dataclasses.replace(RATING_PROMPT, chat=False), "direct")
        msgs = [_user(rater.body(query(p), [a.text()])), _assistant(f"{rater.ending}{world.rating(p, a, rng)}")]
    elif kind == "verbalized":
        k = int(rng.integers(2, 5))
        items = world.verbalized(p, k, rng)
        msgs = [_user(query(p) + VS_SUFFIX.format(k=k)), _assistant(_vs_list(items))]
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
    """Probabilities of a sub-list rescaled to sum to 1 (multiples of 0.05, at least 0.05 each)."""
    w = np.array([x for _, x in items], dtype=float)
    w = np.maximum(np.round(w / w.sum() * 20) / 20, 0.05)
    w[0] += 1.0 - w.sum()
    return [(a, float(round(x, 2))) for (a, _), x in zip(items, w)]


def sft_corpus(world: World, prompts: list[Prompt], n: int, rng: np.random.Generator,
               mixture: Mixture = Mixture()) -> Iterator[dict[str, Any]]:
    """`n` SFT conversations over `prompts`, kinds drawn by `mixture`."""
    kinds = [f.name for f in dataclasses.fields(mixture)]
    w = np.array([getattr(mixture, k) for k in kinds], dtype=float)
    for _ in range(n):
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        yield conversation(world, kind, prompts[int(rng.integers(len(prompts)))], rng)


def preference_pairs(world: World, prompts: list[Prompt], n: int, rng: np.random.Generator
                     ) -> Iterator[dict[str, Any]]:
    """`n` pairs ranked by the gold reward (ties skipped): answers drawn from every condition and from
    refinements, so the proxy RM sees what the strategies will show it."""
    from prs_jax.world.task import gold_reward

    made = 0
    while made < n:
        p = prompts[int(rng.integers(len(prompts)))]
        answers = []
        for _ in range(2):
            a = world.draft(p, str(rng.choice(["x", "xz", "pxz"])), rng)  # type: ignore[arg-type]
            if rng.random() < 0.3:
                a = world.refine(p, a, world.feedback(p, a, rng), rng)
            answers.append(a.text())
        ra, rb = (gold_reward(p.x, t, p.z) for t in answers)
        if ra == rb:
            continue
        chosen, rejected = (answers[0], answers[1]) if ra > rb else (answers[1], answers[0])
        made += 1
        # conversational rows: the RM is trained on the chat template, as RewardFormatter(kind="chat") scores
        yield {"prompt": [_user(query(p))], "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)],
               "gold_margin": abs(ra - rb), "id": p.id}


def split_prompts(world: World, n_train: int, n_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint train and held-out prompt sets (held-out (x, z) never appear in training)."""
    rng = np.random.default_rng([seed, 1])
    train: dict[str, Prompt] = {}
    while len(train) < n_train:
        p = world.sample_prompt(rng)
        train.setdefault(p.id, p)
    held: dict[str, Prompt] = {}
    rng = np.random.default_rng([seed, 2])
    while len(held) < n_eval:
        p = world.sample_prompt(rng)
        if p.id not in train:
            held.setdefault(p.id, p)
    return list(train.values()), list(held.values())
