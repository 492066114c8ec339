"""Diversity metrics against hand-computed values and an independent LCS; the default model embedder against
a plain forward pass of the backbone."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from prs_jax.eval.diversity import (
    ModelEmbedder, cosine_matrix, distinct_n, diversity_report, lcs_length, mean_pairwise_rouge_l, rouge_l_f1,
    semantic_diversity, semantic_diversity_from_embeddings, semantic_diversity_groups, tokenize,
)


def test_semantic_diversity_by_hand():
    emb = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    # pairs: cos 0 -> 1, cos 1/sqrt2 -> 1 - 0.7071 (twice)
    expected = 100 * (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert semantic_diversity_from_embeddings(emb) == pytest.approx(expected)
    assert semantic_diversity_from_embeddings([[1.0, 0.0], [-2.0, 0.0]]) == pytest.approx(100.0)  # clipped at 0
    assert semantic_diversity_from_embeddings([[1.0, 2.0], [2.0, 4.0]]) == pytest.approx(0.0)
    assert math.isnan(semantic_diversity_from_embeddings([[1.0, 0.0]]))
    assert cosine_matrix([[0.0, 0.0], [1.0, 0.0]])[0, 1] == 0.0  # a zero vector is orthogonal to everything


def test_semantic_diversity_with_pluggable_embedder():
    calls = []

    def letters(texts):
        calls.append(len(texts))
        return np.array([[t.count(c) for c in "ab"] for t in texts], float)

    assert semantic_diversity(["a", "b", "ab"], letters) == pytest.approx(100 * (1 + 2 * (1 - 1 / math.sqrt(2))) / 3)
    mean, per = semantic_diversity_groups([["a", "a"], ["a", "b"], ["b"]], letters)
    assert per[0] == pytest.approx(0.0) and per[1] == pytest.approx(100.0) and math.isnan(per[2])
    assert mean == pytest.approx(50.0) and calls[-1] == 5  # one embedder call for all groups
    with pytest.raises(ValueError, match="embedder"):
        semantic_diversity(["a", "b"], lambda ts: np.zeros(3))


def _lcs_reference(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j], dp[i][j - 1])
    return dp[-1][-1]


def test_lcs_against_textbook_dp():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1]) == 0
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 4, rng.integers(0, 15)).tolist()
        b = rng.integers(0, 4, rng.integers(0, 15)).tolist()
        assert lcs_length(a, b) == _lcs_reference(a, b)


def test_rouge_l_and_distinct_n_by_hand():
    assert tokenize("The cat's HAT, 2 times!") == ["the", "cat", "s", "hat", "2", "times"]
    # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat: P = R = 4/6
    assert rouge_l_f1("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # LCS 2 of 2 and 4 tokens: P = 2/4, R = 2/2 -> F = 2/3
    assert rouge_l_f1("a b", "a x b y") == pytest.approx(2 / 3) == rouge_l_f1("a x b y", "a b")
    assert rouge_l_f1("", "a") == 0.0 and rouge_l_f1("same text", "same text") == 1.0
    texts = ["a b", "a x b y", "c"]
    assert mean_pairwise_rouge_l(texts) == pytest.approx((2 / 3 + 0 + 0) / 3)
    assert math.isnan(mean_pairwise_rouge_l(["only"]))
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert math.isnan(distinct_n(["a"], 2))
    r = diversity_report(texts, ns=(1,))
    assert set(r) == {"n", "rouge_l", "distinct_1"}


def test_model_embedder_is_masked_mean_of_hidden_states(llama_dir, run_padded):
    emb = ModelEmbedder.from_pretrained(str(llama_dir), batch_size=4)
    texts = ["Alignment research asks how.", "A policy samples several drafts, a reward model scores them.", "",
             "Paris"]
    e = emb(texts)
    assert e.shape == (4, emb.model.config.hidden_size) and e.dtype == np.float32
    assert np.all(e[2] == 0)  # no tokens
    for t, row in zip(texts, e):
        ids = emb.tokenizer(t, add_special_tokens=False)["input_ids"]
        if ids:
            ref = run_padded(emb.model.model, ids).mean(axis=0)
            np.testing.assert_allclose(row, ref, atol=1e-4)
    np.testing.assert_allclose(emb(texts[3:]), e[3:], atol=1e-5)  # batch composition does not matter
    d = semantic_diversity(texts[:2] + texts[3:], emb)
    assert 0.0 <= d <= 100.0
    pairs = [1 - max(0.0, min(1.0, float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))))
             for x, y in combinations(e[[0, 1, 3]], 2)]
    assert d == pytest.approx(100 * np.mean(pairs), abs=1e-3)
