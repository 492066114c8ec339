"""prs_jax.eval.stats: standard errors, bootstrap intervals, paired win rates, the sign-flip permutation test,
Holm's adjustment and log-log fits."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.eval.stats import (
    PairedWinRate,
    bootstrap_ci,
    holm,
    loglog_fit,
    mean_se,
    paired_bootstrap_ci,
    paired_permutation_p,
    win_rate,
)


def test_mean_se_and_bootstrap_cover_the_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, size=400)
    m, se = mean_se(x)
    assert m == pytest.approx(x.mean()) and se == pytest.approx(x.std(ddof=1) / 20)
    mean, lo, hi = bootstrap_ci(x, 2000, seed=1)
    assert lo < mean < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_ci(x, 500, seed=2) == bootstrap_ci(x, 500, seed=2)


def test_paired_interval_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 300)
    a, b = base + 0.1 + rng.normal(0, 0.1, 300), base
    d, lo, hi = paired_bootstrap_ci(a, b, 2000)
    assert lo > 0.05 and hi < 0.15 and d == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match="paired"):
        paired_bootstrap_ci(a, b[:10])
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci(a, 0)
    assert np.isnan(mean_se([])[0])


# ------------------------------------------------------------------------------------------------ win rates
def test_win_rate_counts_ties_half_with_hand_computed_se():
    w = win_rate([3.0, 1.0, 2.0, 2.0, 0.0], [1.0, 1.0, 5.0, 2.0, -1.0])  # win, tie, loss, tie, win
    assert (w.n, w.wins, w.ties, w.losses) == (5, 2, 2, 1)
    assert w.win_rate == pytest.approx(3.0 / 5)  # (2 + 2 / 2) / 5
    # per-unit outcomes 1, .5, 0, .5, 1: mean .6, sample variance ((.4^2 * 2) + (.1^2 * 2) + .6^2) / 4 = .175
    assert w.se == pytest.approx(math.sqrt(0.175 / 5))
    assert w.shares() == pytest.approx((0.4, 0.4, 0.2))
    assert math.isnan(w.ci_low) and math.isnan(w.ci_high)  # no interval unless asked
    assert w.to_dict()["wins"] == 2 and isinstance(w, PairedWinRate)


def test_win_rate_per_unit_repeats_and_bootstrap():
    # two prompts x two samples: prompt 1 wins both, prompt 2 a tie and a loss -> per prompt 1.0 and 0.25
    w = win_rate([[2.0, 3.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 5.0]])
    assert (w.n, w.wins, w.ties, w.losses) == (2, 2, 1, 1)
    assert w.win_rate == pytest.approx(0.625) and w.se == pytest.approx(np.std([1.0, 0.25], ddof=1) / math.sqrt(2))
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 200), rng.normal(0, 1, 200)
    w1, w2 = win_rate(a, b, n_boot=500, seed=3), win_rate(a, b, n_boot=500, seed=3)
    assert w1 == w2 and w1.ci_low < w1.win_rate < w1.ci_high
    assert win_rate([1.0], [0.0]).se == 0.0
    empty = win_rate([], [])
    assert empty.n == 0 and math.isnan(empty.win_rate) and math.isnan(empty.shares()[0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=1, max_size=30))
def test_win_rate_is_antisymmetric(pairs):
    a, b = [float(x) for x, _ in pairs], [float(y) for _, y in pairs]
    ab, ba = win_rate(a, b), win_rate(b, a)
    assert ab.win_rate + ba.win_rate == pytest.approx(1.0)
    assert (ab.wins, ab.ties, ab.losses) == (ba.losses, ba.ties, ba.wins)
    assert ab.se == pytest.approx(ba.se)


def test_win_rate_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="`a` holds NaN"):
        win_rate([float("nan")], [1.0])
    with pytest.raises(ValueError, match="`b` must be a list"):
        win_rate([[1.0, 2.0], [1.0, 2.0]], [[1.0, 2.0], [3.0]])  # ragged: unequal samples per prompt
    with pytest.raises(ValueError, match="n_boot"):
        win_rate([1.0], [0.0], n_boot=-1)


# ------------------------------------------------------------------------------------------------ tests, Holm
def test_holm_hand_worked_example():
    # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.20; monotone: 0.04, 0.09, 0.09, 0.20
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.20]), [0.04, 0.09, 0.09, 0.20])
    np.testing.assert_allclose(holm([0.5, 0.4]), [0.8, 0.8])
    np.testing.assert_allclose(holm([0.9, 0.6, 0.7]), [1.0, 1.0, 1.0])  # capped at 1
    assert holm([]).size == 0
    with pytest.raises(ValueError, match="pvalues"):
        holm([0.1, 1.2])
    with pytest.raises(ValueError, match="pvalues"):
        holm([[0.1, 0.2]])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_is_monotone_and_between_p_and_bonferroni(ps):
    adj = holm(ps)
    p = np.asarray(ps)
    assert np.all(adj >= p - 1e-15) and np.all(adj <= np.minimum(1.0, p * p.size) + 1e-12)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adj[order]) >= -1e-15)


def test_permutation_p_sanity():
    x = np.random.default_rng(0).normal(size=40)
    assert paired_permutation_p(x, x, 2000, seed=0) == 1.0
    assert paired_permutation_p(x + 1.0, x, 2000, seed=0) == pytest.approx(1 / 2001)  # every difference +1
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 1, 60), rng.normal(0, 1, 60)
    assert paired_permutation_p(a, b, 3000, seed=5) == paired_permutation_p(a, b, 3000, seed=5)
    assert paired_permutation_p(a, b, 3000, seed=5) < 0.05
    null = paired_permutation_p(rng.normal(size=60), rng.normal(size=60), 3000, seed=5)
    assert 0.0 < null <= 1.0


def test_permutation_p_exact_for_few_units():
    # differences 1, 2, 3: of the 8 sign patterns only +++ and --- reach |mean| = 2, so p = 2 / 8
    assert paired_permutation_p([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], n_perm=1000) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="n_perm"):
        paired_permutation_p([1.0], [0.0], n_perm=0)
    with pytest.raises(ValueError, match="empty"):
        paired_permutation_p([], [])
    with pytest.raises(ValueError, match="paired"):
        paired_permutation_p([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------------------------ log-log fits
def test_loglog_fit_recovers_a_power_law():
    rng = np.random.default_rng(0)
    x = np.logspace(2, 6, 30)
    y = 3.0 * x ** -0.5 * np.exp(rng.normal(0, 0.1, x.size))
    fit = loglog_fit(x, y, n_boot=1000, seed=1)
    assert fit.slope == pytest.approx(-0.5, abs=0.03) and fit.intercept == pytest.approx(math.log10(3), abs=0.1)
    assert fit.slope_ci[0] < -0.5 < fit.slope_ci[1]
    assert fit.intercept_ci[0] < math.log10(3) < fit.intercept_ci[1]
    assert fit.n_boot == 1000 and loglog_fit(x, y, n_boot=200, seed=4) == loglog_fit(x, y, n_boot=200, seed=4)
    np.testing.assert_allclose([fit.slope, fit.intercept], np.polyfit(np.log10(x), np.log10(y), 1))


def test_loglog_fit_from_per_unit_records():
    rng = np.random.default_rng(2)
    sizes = [1e3, 1e4, 1e5, 1e6]
    noise = rng.normal(0, 0.2, 50)  # the same 50 prompts at every size (paired)
    units = [3.0 * s ** -0.5 * np.exp(noise + rng.normal(0, 0.05, 50)) for s in sizes]
    for paired in (False, True):
        fit = loglog_fit(sizes, units=units, paired_units=paired, n_boot=500, seed=0)
        assert fit.slope_ci[0] < -0.5 < fit.slope_ci[1]
    assert fit.to_dict()["slope_ci"] == list(fit.slope_ci)


def test_loglog_fit_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="`xs`"):
        loglog_fit([10.0], [1.0])
    with pytest.raises(ValueError, match="`xs` must be finite and positive"):
        loglog_fit([0.0, 10.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="`ys` must be finite and positive"):
        loglog_fit([1.0, 10.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="`xs` and `ys` must match"):
        loglog_fit([1.0, 10.0], [1.0])
    with pytest.raises(ValueError, match="exactly one of `ys`"):
        loglog_fit([1.0, 10.0])
    with pytest.raises(ValueError, match="two distinct"):
        loglog_fit([10.0, 10.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="`units`"):
        loglog_fit([1.0, 10.0], units=[[1.0]])
    with pytest.raises(ValueError, match="paired_units"):
        loglog_fit([1.0, 10.0], units=[[1.0], [1.0, 2.0]], paired_units=True)
    with pytest.raises(ValueError, match="n_boot"):
        loglog_fit([1.0, 10.0], [1.0, 2.0], n_boot=-1)
