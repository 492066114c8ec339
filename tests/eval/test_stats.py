"""Bootstrap intervals and standard errors (prs_jax.eval.stats)."""

import numpy as np
import pytest

from prs_jax.eval.stats import bootstrap_ci, mean_se, paired_bootstrap_ci


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
