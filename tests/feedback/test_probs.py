"""Pure label math, prompts and metrics: multi-token labels on hand-made logits, debiasing, d-RLAIF expectation
and rescaling, label tokenisation with a leading space, prompt rendering, labeler metrics (no model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from prs_jax.errors import ConfigError, DataError
from prs_jax.feedback.labeler import AILabeler, Judgement, LabelerConfig
from prs_jax.feedback.metrics import (
    agreement,
    judge_win_rate,
    labeler_alignment,
    position_bias_rate,
    summarize,
)
from prs_jax.feedback.probs import (
    debias,
    expected_score,
    label_log_probs,
    normalize,
    plan_rows,
    rescale_score,
    split_labels,
)
from prs_jax.feedback.prompts import PromptBuilder, PromptConfig


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


# A toy vocabulary: ids 1..9 are the digits "1".."9", id 0 is "0", id 10 is some other token.
DIGIT = {str(d): d for d in range(10)}


def test_multi_token_score_labels_on_hand_made_logits():
    rng = np.random.default_rng(0)
    labels = [[DIGIT[str(i)]] for i in range(1, 10)] + [[DIGIT["1"], DIGIT["0"]]]  # "10" = "1" + "0"
    l0, l1 = rng.normal(size=11), rng.normal(size=11)  # after the context; after context + "1"
    lp0, lp1 = log_softmax(l0), log_softmax(l1)
    assert plan_rows(labels) == [(DIGIT["1"],)]  # one extra row covers "10" and the exclusivity of "1"
    got = label_log_probs({(): lp0, (1,): lp1}, labels, exclusive=True)
    p0, p1 = np.exp(lp0), np.exp(lp1)
    want = np.array([p0[1] * (1 - p1[0])] + [p0[d] for d in range(2, 10)] + [p0[1] * p1[0]])
    np.testing.assert_allclose(np.exp(got), want, rtol=1e-12)
    # without exclusivity "1" keeps the mass that continues into "10"
    plain = label_log_probs({(): lp0, (1,): lp1}, labels, exclusive=False)
    np.testing.assert_allclose(np.exp(plain[0]), p0[1], rtol=1e-12)
    np.testing.assert_allclose(np.exp(plain[9]), p0[1] * p1[0], rtol=1e-12)

    dist = normalize(got)
    np.testing.assert_allclose(dist, want / want.sum(), rtol=1e-12)
    s = float(expected_score(dist))
    np.testing.assert_allclose(s, float(np.sum(np.arange(1, 11) * want) / want.sum()), rtol=1e-12)
    np.testing.assert_allclose(float(rescale_score(s)), (s - 5.5) / 4.5, rtol=1e-12)


def test_rescaling_maps_the_score_range_to_minus_one_one():
    np.testing.assert_allclose(rescale_score([1.0, 5.5, 10.0]), [-1.0, 0.0, 1.0])
    one_hot = np.eye(10)
    np.testing.assert_allclose(expected_score(one_hot), np.arange(1, 11))
    np.testing.assert_allclose(rescale_score(expected_score(np.full(10, 0.1))), 0.0, atol=1e-12)


def test_plan_rows_for_several_token_labels():
    assert plan_rows([[5], [6]]) == [()]  # single-token labels: the context alone
    assert plan_rows([[7, 5], [7, 6]]) == [(7,)]  # " 1" / " 2" written as space + digit
    assert plan_rows([[1], [1, 0], [1, 0, 0]]) == [(1, 0)]  # nested "1", "10", "100"


def test_debias_maps_the_swapped_order_back():
    assert debias([0.9, 0.1], [0.9, 0.1]) == pytest.approx((0.5, 0.5))  # always position 1
    assert debias([0.7, 0.3], [0.2, 0.8]) == pytest.approx((0.75, 0.25))  # A wins in both orders


class _StubLabeler(AILabeler):
    """Distribution over positions from a stub logit function of the shown (first, second) texts."""

    def __init__(self, logits):
        super().__init__(None, None, LabelerConfig())
        self.logits = logits

    def judge(self, groups, seed=0):
        return [[Judgement(dist=normalize(self.logits(f, s))) for _, f, s in g] for g in groups]


def test_labeler_that_always_prefers_position_one_gives_one_half():
    lab = _StubLabeler(lambda f, s: [2.0, 0.0])
    out = lab.label(["x", "y"], ["good", "a"], ["bad", "b"])
    for r in out:
        assert (r.p_a, r.p_b) == pytest.approx((0.5, 0.5))
        np.testing.assert_allclose(r.ab.dist, r.ba.dist)


def test_debiasing_follows_candidate_identity():
    # prefers "good" (logit +2) and position 1 (+1): order (A, B) and (B, A) disagree on the position
    lab = _StubLabeler(lambda f, s: [2.0 * ("good" in f) + 1.0, 2.0 * ("good" in s)])
    [r] = lab.label(["x"], ["bad"], ["good"])
    q_ab, q_ba = normalize([1.0, 2.0]), normalize([3.0, 0.0])
    assert r.p_a == pytest.approx((q_ab[0] + q_ba[1]) / 2) and r.p_a < 0.5
    assert r.p_a + r.p_b == pytest.approx(1.0)
    one = _StubLabeler(lambda f, s: [2.0 * ("good" in f) + 1.0, 2.0 * ("good" in s)])
    one.config = LabelerConfig(both_orders=False)
    [r1] = one.label(["x"], ["bad"], ["good"])
    assert r1.ba is None and r1.p_a == pytest.approx(q_ab[0])


def test_split_labels_moves_a_trailing_space_into_the_label(tokenizer_dir):
    from prs_jax.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)

    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    # this tokenizer writes " 1" as one token, so "...: " + "1" does not split at the space
    assert enc("Better response: 1")[:-1] != enc("Better response: ")
    ctx, ids = split_labels(enc, "Better response: ", ["1", "2"])
    assert ctx == "Better response:"
    for lab, t in zip(["1", "2"], ids):
        assert enc(ctx) + t == enc(ctx + " " + lab)
    ctx, ids = split_labels(enc, "Rating=", [str(i) for i in range(1, 11)])
    assert ctx == "Rating=" and len(ids[-1]) == 2 and ids[-1][0] == ids[0][0]  # "10" is "1" + "0"
    with pytest.raises(ConfigError, match="merge with the end"):
        split_labels(enc, "Bet", ["ter", "x"])  # "Bet" + "ter" tokenises as B, e, tt, er


def test_prompt_builder_variants_files_and_exemplars(tokenizer_dir, tmp_path):
    from prs_jax.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    base = PromptBuilder.build(PromptConfig(task="summarize"), "pair", tok)
    detailed = PromptBuilder.build(PromptConfig(task="summarize", variant="detailed"), "pair", tok)
    assert base.chat and "Coverage" in detailed.preamble and "Coverage" not in base.preamble
    text = base.render("The text.", ["S one.", "S two."])
    assert text.startswith("<|user|>\n") and text.endswith("<|assistant|>\nBetter summary=")
    assert text.index("Summary 1:\nS one.") < text.index("Summary 2:\nS two.")
    raw = PromptBuilder.build(PromptConfig(task="harmless", chat=False), "pair", tok)
    assert raw.render("c", ["a", "b"]).endswith("Response 2:\nb\n\nBetter response=")
    cot = raw.render("c", ["a", "b"], cot=True)
    assert cot.endswith("explain which response is better and why.\n\nRationale:")

    (tmp_path / "pre.txt").write_text("My own preamble.")
    (tmp_path / "ex.jsonl").write_text(json.dumps({"context": "q", "response_1": "r1", "response_2": "r2",
                                                   "preferred": 2, "rationale": "r2 is right."}) + "\n")
    custom = PromptBuilder.build(PromptConfig(preamble=f"@{tmp_path / 'pre.txt'}", ending="Pick:",
                                              exemplars=str(tmp_path / "ex.jsonl"), exemplar_rationales=True,
                                              chat=False), "pair", tok)
    out = custom.render("c", ["a", "b"])
    assert out.startswith("My own preamble.") and "Rationale: r2 is right.\n\nPick:2" in out
    assert out.endswith("Pick:")
    direct = PromptBuilder.build(PromptConfig(task="helpful"), "direct", tok)
    assert direct.render("c", ["a"]).endswith("Rating=") and "Response:\na" in direct.render("c", ["a"])
    (tmp_path / "bad.jsonl").write_text(json.dumps({"context": "q", "response_1": "r1"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: exemplar misses"):
        PromptBuilder.build(PromptConfig(exemplars=str(tmp_path / "bad.jsonl")), "pair", tok)
    with pytest.raises(ConfigError, match="not found"):
        PromptBuilder.build(PromptConfig(preamble="@/no/such/file"), "pair", tok)


def test_labeler_metrics():
    p_a = [0.9, 0.2, 0.5, 0.6]
    assert labeler_alignment(p_a, [0, 1, 0, 1]) == pytest.approx((1 + 1 + 0.5 + 0) / 4)  # tie counts half
    # A first: position 1 wins, 1, 2, tie; B first: position 1 wins, 2, 2, 1
    assert position_bias_rate([0.8, 0.7, 0.3, 0.5], [0.6, 0.4, 0.1, 0.9]) == pytest.approx(2 / 4)
    assert position_bias_rate(np.array([[0.8, 0.2]]), np.array([[0.6, 0.4]])) == 1.0
    assert agreement([0.9, 0.2, 0.5], [0.7, 0.6, 0.1]) == pytest.approx((1 + 0 + 0.5) / 3)
    w = judge_win_rate(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert (w.wins, w.ties, w.n) == (1, 1, 2) and w.probs == pytest.approx([0.8, 0.5])
    assert math.isnan(labeler_alignment([], []))
    with pytest.raises(ValueError, match="human labels must be 0"):
        labeler_alignment([0.5], [2])
    s = summarize([{"p_a": 0.9, "human_label": "a", "q_ab": [0.8, 0.2], "q_ba": [0.6, 0.4]},
                   {"p_a": 0.3, "human_label": "a", "q_ab": [0.4, 0.6], "q_ba": [0.8, 0.2]},
                   {"p_a": 0.5, "human_label": None, "q_ab": None, "q_ba": None}])
    assert (s.n, s.n_human, s.n_both_orders, s.ties) == (3, 2, 2, 1)
    assert s.alignment == 0.5 and s.position_bias == 0.5
