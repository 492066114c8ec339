"""The teacher ceiling: the design property that makes PRS testable in the world."""

import numpy as np

from prs_jax.world.behaviour import World
from prs_jax.world.ceiling import prompt_rng, teacher_best_of_n
from prs_jax.world.corpus import split_prompts


def test_teacher_prs_beats_prand_by_design():
    """With the teacher as the policy and gold selection, PRS - PRand >= +0.1 at N = 4 on 1000 prompts; without
    a critique the refinements are worth much less."""
    world = World(seed=0)
    _, prompts = split_prompts(world, 1, 1000, seed=0)
    assert len(prompts) == 1000
    r = teacher_best_of_n(world, prompts, [1, 4], seed=0)
    assert float((r["prs"][4] - r["prand"][4]).mean()) >= 0.1
    assert float((r["prs"][1] - r["prand"][1]).mean()) == 0.0
    assert float(r["prand"][4].mean()) > float(r["rand"][4].mean())
    nofb = teacher_best_of_n(world, prompts[:300], [4], seed=0, feedback=False)
    assert float((r["prs"][4][:300] - nofb["prs"][4]).mean()) > 0.1


def test_ceiling_draws_are_keyed_by_prompt_not_order():
    world = World(seed=1)
    _, prompts = split_prompts(world, 1, 20, seed=1)
    a = teacher_best_of_n(world, prompts, [2, 4], seed=3)
    b = teacher_best_of_n(world, prompts[::-1], [2, 4], seed=3)
    for m in a:
        np.testing.assert_array_equal(a[m][4], b[m][4][::-1])
    assert prompt_rng(0, "x", 1).random() == prompt_rng(0, "x", 1).random()
