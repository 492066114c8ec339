"""The teacher ceiling: the world's teacher programs run AS the policy (NumPy, seconds).

Every quantity the quickstart and the skill gates report can be computed here with the teacher in place of the
learned policy, which gives each effect's ceiling: what a perfect imitator of the corpus would achieve. Draws
are keyed by (seed, prompt id, role), never by order, and the methods share their random numbers the way the
quickstart does (PRS's first layer is PRand's first N/2 samples).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from prs_jax.world.behaviour import World
from prs_jax.world.task import Answer, Prompt, gold_reward

METHODS = ("rand", "prand", "prs")


def prompt_rng(seed: int, prompt_id: str, *role: int) -> np.random.Generator:
    """A generator keyed by the seed, the prompt's id and a role path (stable under reordering)."""
    return np.random.default_rng([seed, zlib.crc32(prompt_id.encode()), *role])


def prs_widths(n: int) -> tuple[int, int]:
    """The quickstart's PRS split of a budget n >= 2: n // 2 drafts, then n - n // 2 refinements."""
    return n // 2, n - n // 2


def _gold(p: Prompt, a: Answer) -> float:
    return gold_reward(p.x, a.text(), p.z)


def first_width(n: int, split: float | None = None) -> int:
    """PRS's first-layer width at budget n >= 2: n // 2 (split None), else the two-layer PRS.with_budget rule."""
    from prs_jax.strategies.prs import PRS

    return n // 2 if split is None else PRS.with_budget(n, split, 2).widths[0]


def teacher_selected(world: World, p: Prompt, budgets: Sequence[int], seed: int = 0, feedback: bool = True,
                     split: float | None = None) -> dict[str, dict[int, Answer]]:
    """The gold-selected answer per method and budget for one prompt, teacher as policy. Rand / PRand take the
    best of the first n of one stream of max(budgets) drafts; PRS refines the gold-best of PRand's first
    first_width(n, split) drafts (after the teacher's critique; `feedback=False`: without one) and keeps the best
    of drafts and refinements (earlier answers win ties)."""
    top = max(budgets)
    streams = {"rand": [world.draft(p, "x", prompt_rng(seed, p.id, 0, j)) for j in range(top)],
               "prand": [world.draft(p, "xz", prompt_rng(seed, p.id, 1, j)) for j in range(top)]}
    golds = {m: [_gold(p, a) for a in v] for m, v in streams.items()}
    out: dict[str, dict[int, Answer]] = {m: {} for m in METHODS}
    for n in budgets:
        for m in ("rand", "prand"):
            out[m][n] = streams[m][int(np.argmax(golds[m][:n]))]
        if n < 2:
            out["prs"][n] = out["prand"][n]
            continue
        first = first_width(n, split)
        second = n - first
        best = streams["prand"][int(np.argmax(golds["prand"][:first]))]
        named = world.feedback(p, best) if feedback else None
        refs = [world.refine(p, best, named, prompt_rng(seed, p.id, 2, n, j)) for j in range(second)]
        cands = [best, *refs]
        out["prs"][n] = cands[int(np.argmax([_gold(p, a) for a in cands]))]
    return out


def teacher_best_of_n(world: World, prompts: Sequence[Prompt], budgets: Sequence[int], seed: int = 0,
                      feedback: bool = True) -> dict[str, dict[int, np.ndarray]]:
    """Gold reward of the gold-selected answer per method and budget ([prompts] arrays), teacher as policy
    (teacher_selected). `feedback=False` runs PRS's refinements without a critique (the no-feedback ablation)."""
    out: dict[str, dict[int, np.ndarray]] = {m: {n: np.zeros(len(prompts)) for n in budgets} for m in METHODS}
    for i, p in enumerate(prompts):
        for m, by_n in teacher_selected(world, p, budgets, seed, feedback).items():
            for n, a in by_n.items():
                out[m][n][i] = _gold(p, a)
    return out
