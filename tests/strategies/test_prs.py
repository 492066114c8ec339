"""PRS and best-of-N on a random tiny checkpoint with callable scorers."""

from __future__ import annotations

import numpy as np
import pytest

from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.strategies.base import CallableScorer, PromptItem
from prs_jax.strategies.prs import PRS, BestOfN, best_worst_pair, improving_pairs
from prs_jax.strategies.templates import next_turn_text
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams

ITEMS = [PromptItem("a", "List three fruits.", "I like short answers."), PromptItem("b", "Say hello.", None),
         PromptItem("c", "Name a color.", "Answer in capitals.")]


@pytest.fixture(scope="module")
def model_tok(make_checkpoint):
    path = make_checkpoint("llama", max_position_embeddings=1024)  # the tiny tokenizer spells out long turns
    return load_causal_lm(path), load_tokenizer(path)


def vowel_score(prompt, response, preference):
    """A scorer that rewards a known, checkable property: the share of vowels in the response."""
    return sum(ch in "aeiou" for ch in response) / max(len(response), 1)


def _engine(model_tok, seed=0):
    model, tok = model_tok
    # generous bucket floors: every call of these tests lands in a few shapes (fewer compilations)
    return TreeEngine(model, tok, seed=seed, config=EngineConfig(min_prefix_bucket=512, min_extend_bucket=256,
                                                                 min_groups_bucket=4, min_new_tokens_bucket=8))


@pytest.mark.parametrize("mode", ["conversation", "template"])
def test_prs_layer_counts_feedback_placement_and_argmax(model_tok, mode):
    prs = PRS(widths=(3, 2, 2), mode=mode, sampling=SamplingParams(temperature=1.0), max_new_tokens=6,
              feedback_max_new_tokens=4)
    results = prs.run(ITEMS, _engine(model_tok), CallableScorer(vowel_score))
    for res in results:
        assert [len(layer) for layer in res.layers] == [3, 2, 2]
        assert len(res.candidates) == 7
        assert all(c.reward is not None for c in res.candidates)
        assert res.selected.reward == max(c.reward for c in res.candidates)
        assert len(res.info["feedback_texts"]) == 2  # one feedback per refinement layer, not counted in N
        for layer in res.layers[1:]:
            refined = {c.metadata["refines"] for c in layer}
            assert len(refined) == 1
        if mode == "conversation":
            # the feedback request hangs on the best draft: its first refinement layer's parent chain
            best0 = max(res.layers[0], key=lambda c: c.reward)
            assert res.layers[1][0].metadata["refines"] == best0.id
            ask = [c for c in best0.children if c.kind == "fixed"][0]
            assert ask.children and ask.children[0].metadata.get("kind") == "feedback"
            assert res.layers[1][0].parent.parent.parent is ask
        else:
            assert len(res.extra_roots) == 4  # a feedback prompt and a refinement prompt per layer
    for res in results:
        for pair in improving_pairs(res):
            assert pair["refinement_reward"] > pair["draft_reward"]
        bw = best_worst_pair(res)
        assert bw is None or bw["margin"] > 0


def test_prs_is_reproducible_and_single_layer_equals_best_of_n(model_tok):
    scorer = CallableScorer(vowel_score)
    kw = dict(sampling=SamplingParams(temperature=1.0), max_new_tokens=6)
    a = PRS(widths=(2, 2), feedback_max_new_tokens=4, **kw).run(ITEMS, _engine(model_tok, 5), scorer)
    b = PRS(widths=(2, 2), feedback_max_new_tokens=4, **kw).run(ITEMS, _engine(model_tok, 5), scorer)
    assert [[c.tokens for c in r.candidates] for r in a] == [[c.tokens for c in r.candidates] for r in b]
    one = PRS(widths=(4,), **kw).run(ITEMS, _engine(model_tok, 7), scorer)
    bon = BestOfN(n=4, variant="prand", default_preference=PRS().templates.default_preference, **kw).run(
        ITEMS, _engine(model_tok, 7), scorer)
    assert [[c.tokens for c in r.candidates] for r in one] == [[c.tokens for c in r.candidates] for r in bon]
    assert [r.selected.text for r in one] == [r.selected.text for r in bon]


def test_best_of_n_reward_grows_with_n(model_tok):
    scorer = CallableScorer(vowel_score)
    items = [PromptItem(str(i), f"Prompt number {i}", None) for i in range(6)]
    means = []
    for n in (1, 2, 4, 8):
        res = BestOfN(n=n, variant="rand", sampling=SamplingParams(temperature=1.0), max_new_tokens=8).run(
            items, _engine(model_tok, 11), scorer)
        means.append(np.mean([r.reward for r in res]))
    assert all(b >= a - 1e-9 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0]
    greedy = BestOfN(variant="greedy", max_new_tokens=5).run(items[:2], _engine(model_tok), scorer)
    assert all(len(r.candidates) == 1 for r in greedy)


def test_budget_widths_and_errors():
    assert PRS.with_budget(16).widths == (8, 8)
    assert PRS.with_budget(16, split=0.25).widths == (4, 12)
    assert PRS.with_budget(16, depth=3).widths == (8, 4, 4)
    assert PRS.with_budget(5, depth=1).widths == (5,)
    with pytest.raises(ValueError, match="n >= depth"):
        PRS.with_budget(1, depth=2)


def test_next_turn_text_matches_chat_template(model_tok):
    _, tok = model_tok
    from prs_jax.models import render_chat

    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    prev = render_chat(tok, msgs, add_generation_prompt=False)
    full = render_chat(tok, msgs + [{"role": "user", "content": "more"}])
    eos = tok.eos_token
    cut = prev.index("A") + 1
    # answer ended with EOS: the EOS text is part of the generated node, the rest is appended
    eos_node = type("N", (), {"finish_reason": "eos", "tokens": [tok.eos_token_id]})()
    assert prev[:cut] + eos + next_turn_text(tok, "more", eos_node) == full
    assert prev[:cut] + next_turn_text(tok, "more", None) == full
