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


def test_long_inputs_are_split_by_token_budget_and_score_the_same(make_checkpoint):
    """Chunks are sized by rows x padded length (and an activation budget), not a row count: long inputs
    run in several programs and score as in one big program."""
    from prs_jax.tree.scoring import ScorerConfig

    path = make_checkpoint("llama", task="reward", max_position_embeddings=1024)
    rm, tok = load_reward_model(path), load_tokenizer(path)
    long_prompt = " ".join(f"word{i}" for i in range(60))
    pairs = ([(f"{long_prompt} question {i}", f"answer {i} " * (3 + i)) for i in range(6)]
             + [("short", "yes"), ("short", "no")])
    big = RewardScorer(rm, tok, config=ScorerConfig(token_budget=1 << 20))
    want = big.score_pairs(pairs)
    assert sum(g * n for g, n, _, _ in big.last_chunks) >= len(pairs) and len(big.last_chunks) <= 3
    budget = 512
    small = RewardScorer(rm, tok, config=ScorerConfig(token_budget=budget))
    np.testing.assert_allclose(small.score_pairs(pairs), want, atol=1e-5)
    assert len(small.last_chunks) > len(big.last_chunks)
    long_chunks = [c for c in small.last_chunks if c[2] + c[3] > 64]
    assert long_chunks and all(g * n * (p + t) <= budget or g * n == 1 for g, n, p, t in small.last_chunks)
    # the activation budget alone also splits: one group of attention scores per program
    heads = rm.config.num_attention_heads
    tight = RewardScorer(rm, tok, config=ScorerConfig(activation_budget_bytes=8 * heads * 2 * 32 * 256))
    np.testing.assert_allclose(tight.score_pairs(pairs), want, atol=1e-5)
    assert all(g * max(8 * heads * n * t * (p + t), 8 * heads * p * p) <= 8 * heads * 2 * 32 * 256 or g * n == 1
               for g, n, p, t in tight.last_chunks)


def test_stable_rows_make_scores_batch_invariant(rm_tok):
    """With stable_rows, a pair's score is bitwise the same whatever else is scored with it."""
    from prs_jax.tree.scoring import ScorerConfig

    rm, tok = rm_tok
    pairs = [(f"prompt {i % 3}", f"response number {i}" + " more" * i) for i in range(11)]
    scorer = RewardScorer(rm, tok, config=ScorerConfig(stable_rows=4, token_budget=4096))
    together = scorer.score_pairs(pairs)
    alone = [scorer.score_pairs([p])[0] for p in pairs]
    halves = scorer.score_pairs(pairs[5:]), scorer.score_pairs(pairs[:5])
    assert together == alone == halves[1] + halves[0]
    np.testing.assert_allclose(together, RewardScorer(rm, tok).score_pairs(pairs), atol=1e-5)


def test_prompt_waves_release_the_pool_and_score_the_same(rm_tok):
    """Prompt parts enter the RM's KV pool in waves of `prompt_pages` pages and leave it after scoring: one
    page per wave gives the same scores, and the pool is empty after every call."""
    from prs_jax.tree.scoring import ScorerConfig

    rm, tok = rm_tok
    pairs = [(f"prompt number {i % 4} " + "long " * (i % 4) * 9, f"response {i}") for i in range(12)]
    want = RewardScorer(rm, tok).score_pairs(pairs)
    waves = RewardScorer(rm, tok, config=ScorerConfig(prompt_pages=1, page_size=4))
    np.testing.assert_allclose(waves.score_pairs(pairs), want, atol=1e-5)
    stats = waves.engine.kv_stats()
    assert stats["pages_used"] == 0 and stats["pages_peak"] >= 1 and len(waves.engine.tree) == 0
    before = waves.compilations
    waves.score_pairs(pairs[::-1])  # same shapes: nothing new to compile
    assert waves.compilations == before
