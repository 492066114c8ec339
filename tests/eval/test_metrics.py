"""Evaluation metrics against hand-computed values: reward statistics, best-of-n, position-swapped win rates,
Coverage-N / precision / KL for enumerative QA."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prs_jax.eval.metrics import (
    best_of_n_curve, coverage, empirical_distribution, entropy, enumerative_metrics, expected_best_of_n,
    kl_divergence, kl_to_reference, kl_to_uniform, normalize_answer, precision, reward_histogram, reward_stats,
    win_rate, win_rate_from_probs,
)


def test_reward_stats_by_hand():
    s = reward_stats([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    assert (s.n_prompts, s.n_samples, s.n_nan) == (2, 6, 1)
    assert s.mean == 3.0 and s.median == 3.0 and s.min == 1.0 and s.max == 5.0
    assert s.std == pytest.approx(math.sqrt(2.0))  # population std of 1..5
    assert s.best_of_n_mean == 4.0 and s.first_sample_mean == 2.5  # (3 + 5) / 2 and (1 + 4) / 2
    assert s.quantiles[0.25] == 2.0 and s.quantiles[0.75] == 4.0
    assert s.values.tolist() == [1, 2, 3, 4, 5]
    d = s.to_dict()
    assert d["q0.5"] == 3.0 and "values" not in d and len(s.to_dict(with_values=True)["values"]) == 5
    ragged = reward_stats([[1.0], [2.0, 6.0]])
    assert ragged.best_of_n_mean == 3.5 and ragged.mean == 3.0
    assert reward_stats(np.array([1.0, 3.0])).best_of_n_mean == 2.0  # 1-D: one sample per prompt
    empty = reward_stats([[float("nan")]])
    assert math.isnan(empty.mean) and math.isnan(empty.best_of_n_mean) and empty.n_nan == 1


def test_histogram():
    counts, edges = reward_histogram([0.0, 0.5, 1.0, float("nan")], bins=2, value_range=(0.0, 1.0))
    assert counts.tolist() == [1, 2] and edges.tolist() == [0.0, 0.5, 1.0]


def test_expected_best_of_n_matches_enumeration():
    r = [1.0, 2.0, 3.0, 4.0]
    # all 6 pairs: max 2, 3, 4, 3, 4, 4 -> 20 / 6
    assert expected_best_of_n(r, 2) == pytest.approx(20 / 6)
    assert expected_best_of_n(r, 1) == pytest.approx(2.5) and expected_best_of_n(r, 4) == 4.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=7)
    from itertools import combinations

    brute = np.mean([max(c) for c in combinations(x, 3)])
    assert expected_best_of_n(x, 3) == pytest.approx(brute)
    curve = best_of_n_curve([r, [0.0, 10.0]], [1, 2, 3])
    assert curve[1] == pytest.approx((2.5 + 5.0) / 2) and curve[2] == pytest.approx((20 / 6 + 10) / 2)
    assert curve[3] == pytest.approx(expected_best_of_n(r, 3))  # the 2-sample prompt is skipped
    with pytest.raises(ValueError):
        expected_best_of_n(r, 5)


def test_win_rate_from_probs_by_hand():
    w = win_rate_from_probs([0.9, 0.6, 0.5, 0.2], [0.2, 0.6, 0.5, 0.7])
    # order-averaged P(A): 0.85 (win), 0.5 (tie), 0.5 (tie), 0.25 (loss)
    np.testing.assert_allclose(w.probs, [0.85, 0.5, 0.5, 0.25])
    assert (w.wins, w.losses, w.ties, w.n) == (1, 1, 2, 4)
    assert w.win_rate == pytest.approx(0.5) and w.mean_prob == pytest.approx(0.525)
    assert w.consistent == pytest.approx(0.75)  # item 2: A first says A, B first says B
    m = win_rate_from_probs([0.7], [0.4], tie_margin=0.2)  # p = 0.65: inside the margin
    assert m.ties == 1 and m.win_rate == 0.5
    n = win_rate_from_probs([0.9, float("nan")], [0.1, 0.3])
    assert n.n == 1 and n.wins == 1
    with pytest.raises(ValueError):
        win_rate_from_probs([0.5], [0.5, 0.5])


def test_win_rate_swaps_positions():
    prompts, a, b = ["x", "y"], ["long answer", "long answer two"], ["short", "tiny"]
    always_first = win_rate(prompts, a, b, lambda x, first, second: 1.0)  # pure position bias
    assert always_first.ties == 2 and always_first.win_rate == 0.5 and always_first.consistent == 0.0
    longer = win_rate(prompts, a, b, lambda x, first, second: float(len(first) > len(second)))
    assert longer.wins == 2 and longer.win_rate == 1.0 and longer.consistent == 1.0
    seen = []
    win_rate(["p"], ["A"], ["B"], lambda x, f, s: seen.append((f, s)) or 0.5)
    assert seen == [("A", "B"), ("B", "A")]


def test_enumerative_metrics_by_hand():
    gt = ["Paris", "Lyon", "Nice", "Nantes"]
    responses = ["paris", "Paris!", "Lyon", "Berlin"]
    assert coverage(responses, gt) == 0.5  # {paris, lyon} of 4
    assert precision(responses, gt) == 0.75
    # correct answers only: P = (2/3 paris, 1/3 lyon); KL to uniform over 4 = log 4 - H(P)
    p = np.array([2 / 3, 1 / 3])
    expected = math.log(4) + float(np.sum(p * np.log(p)))
    assert kl_to_uniform(responses, gt) == pytest.approx(expected)
    assert kl_to_uniform(responses, gt) == pytest.approx(2 / 3 * math.log(8 / 3) + 1 / 3 * math.log(4 / 3))
    assert kl_to_uniform(gt, gt) == pytest.approx(0.0)  # every answer once: uniform
    assert math.isnan(kl_to_uniform(["Rome"], gt))
    m = enumerative_metrics(responses, gt)
    assert m["coverage"] == 0.5 and m["unique"] == 3 and m["n"] == 4
    # weights (e.g. verbalised probabilities) instead of counts
    assert kl_to_uniform(["Paris", "Lyon"], gt, weights=[0.5, 0.5]) == pytest.approx(math.log(4) - math.log(2))
    with pytest.raises(ValueError):
        coverage(["x"], [])


def test_kl_entropy_and_reference():
    assert kl_divergence({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(math.log(2))
    assert kl_divergence({"a": 0.5, "b": 0.5}, {"a": 1.0}) == math.inf
    assert math.isfinite(kl_divergence({"a": 0.5, "b": 0.5}, {"a": 1.0}, eps=0.1))
    assert entropy([0.5, 0.5, 0.0]) == pytest.approx(math.log(2)) and entropy({"a": 1.0}) == 0.0
    die = {str(i): 1 / 6 for i in range(1, 7)}
    rolls = ["1", "1", "2", "3"]  # P = (1/2, 1/4, 1/4)
    assert kl_to_reference(rolls, die) == pytest.approx(0.5 * math.log(3) + 0.5 * math.log(1.5))
    assert kl_to_reference(["7"], die) == math.inf
    assert kl_to_reference([str(i) for i in range(1, 7)], {k: 5.0 for k in die}) == pytest.approx(0.0)
    assert empirical_distribution(["A", "a", "b"]) == pytest.approx({"a": 2 / 3, "b": 1 / 3})


def test_normalize_answer():
    assert normalize_answer("  The Éclair!! ") == "eclair"
    assert normalize_answer("New   York-City") == "new york city"
