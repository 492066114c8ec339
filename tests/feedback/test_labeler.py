"""The AI labeler and the direct scorer on a random tiny Llama, against plain full forwards of the model on the
whole prompt (no KV cache, no shared prefix, no tree): pairwise soft labels in both orders, multi-token score
labels with a leading space ("10" and " 1"), and chain-of-thought self-consistency on the tree engine."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from prs_jax.feedback.direct import DirectConfig, DirectScorer
from prs_jax.feedback.labeler import AILabeler, LabelerConfig
from prs_jax.feedback.prompts import PromptConfig

PAD = 512  # every reference forward runs at this padded length: one compiled program
PAIRS = [("Explain the water cycle briefly.", "Water evaporates, condenses into clouds and falls as rain.",
          "it is complicated."),
         ("What is 2 + 2?", "4", "five, I think")]


@pytest.fixture(scope="module")
def model_and_tok(make_checkpoint):
    from prs_jax.models import load_causal_lm, load_tokenizer

    path = make_checkpoint("llama", max_position_embeddings=2048)
    return load_causal_lm(path), load_tokenizer(path)


def _logp(run_padded, model, ids):
    """log_softmax of the full forward's logits at every position [T, V] (float64)."""
    logits = np.asarray(run_padded(model, ids, length=PAD), np.float64)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pair_label_probabilities_equal_a_full_forward(model_and_tok, run_padded):
    model, tok = model_and_tok
    lab = AILabeler(model, tok, LabelerConfig(prompt=PromptConfig(task="helpful", variant="base"),
                                              min_row_bucket=128))
    out = lab.label([p[0] for p in PAIRS], [p[1] for p in PAIRS], [p[2] for p in PAIRS])
    one, two = _enc(tok, "1"), _enc(tok, "2")
    assert len(one) == len(two) == 1
    for (x, a, b), r in zip(PAIRS, out):
        for (first, second), q in (((a, b), r.ab.dist), ((b, a), r.ba.dist)):
            text = lab.prompts.render(x, [first, second])
            assert text.endswith("<|assistant|>\nBetter response=")
            lp = _logp(run_padded, model, _enc(tok, text))[-1]
            want = np.exp([lp[one[0]], lp[two[0]]])
            np.testing.assert_allclose(q, want / want.sum(), rtol=2e-4)
        assert r.p_a == pytest.approx((r.ab.dist[0] + r.ba.dist[1]) / 2)
        assert r.p_a + r.p_b == pytest.approx(1.0)
    assert lab.compilations <= 2  # one prefill of the shared prompt prefixes, one label program


def test_direct_scores_with_multi_token_labels_equal_a_full_forward(model_and_tok, run_padded):
    model, tok = model_and_tok
    # raw text ending in a space: the labels are read as " 1" .. " 10" and " 10" is two tokens here
    cfg = DirectConfig(prompt=PromptConfig(task="helpful", chat=False, ending="Rating: "), min_row_bucket=128)
    scorer = DirectScorer(model, tok, cfg)
    ctxs = [PAIRS[0][0], PAIRS[0][0], PAIRS[1][0]]
    resps = [PAIRS[0][1], PAIRS[0][2], PAIRS[1][1]]
    got = scorer.score(ctxs, resps)
    for x, y, s in zip(ctxs, resps, got):
        ctx = scorer.prompts.render(x, [y]).rstrip()
        assert ctx.endswith("Rating:")
        base = _enc(tok, ctx)
        seqs = {lab: _enc(tok, f"{ctx} {lab}")[len(base):] for lab in cfg.labels}
        assert len(seqs["10"]) == 2 and seqs["10"][0] == seqs["1"][0]
        lp = _logp(run_padded, model, base + seqs["10"])
        p = {lab: float(np.exp(sum(lp[len(base) - 1 + j, t] for j, t in enumerate(ids)))) for lab, ids in
             seqs.items()}
        p["1"] -= p["10"]  # "1" is the event "1 and not 10"
        want = np.array([p[lab] for lab in cfg.labels])
        want /= want.sum()
        np.testing.assert_allclose(s.dist, want, rtol=2e-4)
        score = float(np.sum(np.arange(1, 11) * want))
        assert s.score == pytest.approx(score, rel=1e-4)
        assert s.reward == pytest.approx((score - 5.5) / 4.5, rel=1e-4, abs=1e-6)
    assert scorer(ctxs, resps) == pytest.approx([s.reward for s in got])  # the reward-callable form
    # as a strategy scorer the preference z is part of the rated context (x, a blank line, z)
    prefs = ["Keep it short.", None, "Use a list."]
    with_z = scorer.score([f"{x}\n\n{z}" if z else x for x, z in zip(ctxs, prefs)], resps)
    assert scorer(ctxs, resps, prefs) == pytest.approx([s.reward for s in with_z])
    assert scorer(ctxs, resps, prefs)[0] != pytest.approx(got[0].reward)
    msgs = [[{"role": "system", "content": "s"}, {"role": "user", "content": x}] for x in ctxs]
    assert scorer(msgs, resps, prefs) == pytest.approx(
        [s.reward for s in scorer.score([[m[0], {"role": "user", "content": f"{m[1]['content']}\n\n{z}"
                                                   if z else m[1]["content"]}] for m, z in zip(msgs, prefs)], resps)])
    with pytest.raises(ValueError, match="preferences"):
        scorer(ctxs, resps, prefs[:1])


def test_chain_of_thought_self_consistency_averages_rationale_distributions(model_and_tok, run_padded):
    model, tok = model_and_tok
    cfg = LabelerConfig(cot=True, self_consistency=2, cot_max_new_tokens=8, temperature=1.0, min_row_bucket=128)
    lab = AILabeler(model, tok, cfg)
    out = lab.label([p[0] for p in PAIRS], [p[1] for p in PAIRS], [p[2] for p in PAIRS], seed=5)
    one, two = _enc(tok, "1")[0], _enc(tok, "2")[0]
    for (x, a, b), r in zip(PAIRS, out):
        for j, (first, second) in ((r.ab, (a, b)), (r.ba, (b, a))):
            assert len(j.samples) == len(j.rationales) == 2
            np.testing.assert_allclose(j.dist, np.mean(j.samples, axis=0), rtol=1e-12)
            prompt = _enc(tok, lab.prompts.render(x, [first, second], cot=True))
            for ctx, rationale, q in zip(j.contexts, j.rationales, j.samples):
                assert ctx[:len(prompt)] == prompt  # the CoT prompt, the kept rationale tokens, then the ending
                assert tok.decode(ctx[len(prompt):]).endswith("\nBetter response=")
                assert rationale[:3] in tok.decode(ctx[len(prompt):])
                lp = _logp(run_padded, model, ctx)[-1]
                want = np.exp([lp[one], lp[two]])
                np.testing.assert_allclose(q, want / want.sum(), rtol=2e-4)
        assert r.p_a == pytest.approx((r.ab.dist[0] + r.ba.dist[1]) / 2)
    assert len({t for r in out for t in r.ab.rationales + r.ba.rationales}) > 1  # sampled, not one greedy text
    again = lab.label([p[0] for p in PAIRS], [p[1] for p in PAIRS], [p[2] for p in PAIRS], seed=5)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in out]  # the seed fixes the samples
    # rationales are keyed by each pair's own tokens: labelling pairs one at a time, in another order, or
    # next to a duplicate samples the same rationales
    alone = [lab.label([x], [a], [b], seed=5)[0] for x, a, b in reversed(PAIRS)][::-1]
    dup = lab.label([PAIRS[1][0]] * 2, [PAIRS[1][1]] * 2, [PAIRS[1][2]] * 2, seed=5)
    for r, s in zip(out, alone):
        assert (r.ab.rationales, r.ba.rationales) == (s.ab.rationales, s.ba.rationales)
    assert dup[0].ab.rationales == out[1].ab.rationales
