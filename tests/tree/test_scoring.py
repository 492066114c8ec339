"""Batched reward scoring with shared prompt prefixes equals scoring each full input alone."""

from __future__ import annotations

import numpy as np
import pytest

from prs_jax.models import load_reward_model, load_tokenizer
from prs_jax.tree.scoring import RewardFormatter, RewardScorer


@pytest.fixture(scope="module")
def rm_tok(make_checkpoint):
    path = make_checkpoint("llama", task="reward")
    return load_reward_model(path), load_tokenizer(path)


PAIRS = [("What is two plus two?", "Four."), ("What is two plus two?", "It is 4, of course."),
         ("Name a fruit", "apple"), ("What is two plus two?", "five"), ("Name a fruit", "A banana is a fruit.")]


@pytest.mark.parametrize("formatter", [RewardFormatter("chat"), RewardFormatter("chat", system="Be kind."),
                                       RewardFormatter("template", "Human: {prompt}\n\nAssistant: {response}")])
def test_shared_prefix_scores_equal_whole_inputs(rm_tok, formatter, run_padded):
    rm, tok = rm_tok
    scorer = RewardScorer(rm, tok, formatter)
    scores = scorer.score_pairs(PAIRS)
    for (prompt, response), s in zip(PAIRS, scores):
        head, tail = formatter.split(tok, prompt, response)
        np.testing.assert_allclose(s, float(run_padded(rm, head + tail)), atol=1e-4)
    # two prompts of shared prefixes -> groups with up to 3 candidates; prefixes actually shared
    assert formatter.split(tok, *PAIRS[0])[0] == formatter.split(tok, *PAIRS[1])[0] != []


def test_chunking_and_order(rm_tok):
    rm, tok = rm_tok
    scorer = RewardScorer(rm, tok)
    pairs = [(f"prompt {i % 3}", f"response number {i}") for i in range(11)]
    from prs_jax.tree.scoring import ScorerConfig

    small = RewardScorer(rm, tok, config=ScorerConfig(max_rows=4))
    np.testing.assert_allclose(small.score_pairs(pairs), scorer.score_pairs(pairs), atol=1e-5)


def test_template_validation():
    with pytest.raises(ValueError, match="exactly one"):
        RewardFormatter("template", "Q: {prompt}")
