"""Statistics for paired experiments: means with standard errors and bootstrap confidence intervals.

Effects in this project are paired by prompt (two methods run on the same prompts with common random numbers),
so intervals are computed on per-prompt differences; the bootstrap resamples prompts with a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mean_se(xs: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else 0.0


def bootstrap_ci(xs: Sequence[float] | np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
                 ) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `xs` and its percentile bootstrap (1 - alpha) interval over resampled
    units. For a paired effect pass the per-unit differences."""
    a = np.asarray(xs, dtype=float)
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    if n_boot <= 0 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci: need n_boot > 0 and 0 < alpha < 1 (got {n_boot}, {alpha})")
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(a.mean()), float(lo), float(hi)


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 2000,
                        alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high) over paired units (same prompts, common random numbers)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap_ci: a and b must be paired (shapes {x.shape} vs {y.shape})")
    return bootstrap_ci(x - y, n_boot, alpha, seed)
