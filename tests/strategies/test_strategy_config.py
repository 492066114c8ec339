"""StrategyConfig.of / build: the studies build their strategies through it, and get exactly the objects they
used to assemble by hand (same widths, sampling, budgets, templates)."""

import pytest

from prs_jax.errors import ConfigError
from prs_jax.strategies.generate import StrategyConfig
from prs_jax.strategies.prs import PRS, BestOfN
from prs_jax.strategies.templates import PRSTemplates
from prs_jax.strategies.verbalized import VerbalizedSampling
from prs_jax.tree.sampling import SamplingParams

S = SamplingParams(temperature=0.9, top_k=7, top_p=0.95, presence_penalty=0.1)
TPL = PRSTemplates(feedback_turn="Critique it.")


def test_of_copies_the_sampling():
    assert StrategyConfig.of("rand", 4, S).sampling() == S
    assert StrategyConfig.of("prand", 4, SamplingParams()).sampling() == SamplingParams()
    with pytest.raises(ConfigError, match="greedy"):
        StrategyConfig.of("rand", 4, SamplingParams(greedy=True))


@pytest.mark.parametrize("n,split,depth,feedback,mode", [(8, 0.25, 2, True, "conversation"),
                                                         (16, 1 / 3, 3, True, "template"),
                                                         (4, 0.5, 2, False, "conversation")])
def test_prs_is_the_hand_built_one(n, split, depth, feedback, mode):
    hand = PRS.with_budget(n, split, depth, feedback=feedback, mode=mode, sampling=S, max_new_tokens=24,
                           feedback_max_new_tokens=16, templates=TPL)
    built = StrategyConfig.of("prs", n, S, split=split, depth=depth, feedback=feedback, mode=mode,
                              max_new_tokens=24, feedback_max_new_tokens=16).build(templates=TPL)
    assert built == hand and built.templates == TPL
    assert StrategyConfig.of("prs", n, S, split=split, depth=depth).build().templates == PRSTemplates()


@pytest.mark.parametrize("variant", ["rand", "prand", "greedy"])
def test_best_of_n_is_the_hand_built_one(variant):
    hand = BestOfN(n=4, variant=variant, sampling=S, max_new_tokens=24)
    assert StrategyConfig.of(variant, 4, S, max_new_tokens=24).build(templates=TPL) == hand
    with pytest.raises(ConfigError, match="unexpected settings"):
        StrategyConfig.of(variant, 4, S).build(seed=3)


def test_vs_is_the_hand_built_one():
    tpl = {"vs_standard": "Give {k} answers to: {query}"}
    hand = VerbalizedSampling(method="vs_multi", k=3, n=6, sampling=SamplingParams(temperature=0.7, top_p=0.9),
                              max_new_tokens=64, min_survivors=2, select="probability", seed=5, templates=tpl)
    built = StrategyConfig.of("vs", 6, SamplingParams(temperature=0.7, top_p=0.9), vs_method="vs_multi", k=3,
                              max_new_tokens=64).build(templates=tpl, min_survivors=2, select="probability", seed=5)
    assert built == hand and dict(built.templates) == tpl
