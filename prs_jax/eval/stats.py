"""Statistics for paired experiments: means with standard errors, bootstrap confidence intervals, paired win
rates, a sign-flip permutation test with Holm-Bonferroni adjustment, and log-log (power-law) fits.

Effects in this project are paired by prompt (two methods run on the same prompts with common random numbers),
so intervals are computed on per-prompt differences; the bootstrap resamples prompts with a seeded generator.
This is the one copy of these statistics: the studies import them from here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

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


# ------------------------------------------------------------------------------------------------ win rates
@dataclasses.dataclass(frozen=True)
class PairedWinRate:
    """A vs B on paired units (prompts): comparison counts, the win rate with ties counted one half, its standard
    error over units, and (when asked for) a percentile bootstrap interval over units (NaN otherwise).

    With several comparisons per unit (an [n, k] input: k samples of each prompt, sample j against sample j) the
    counts are over all n * k comparisons and the standard error is over the n per-unit win rates."""

    n: int  # units (prompts)
    wins: int
    ties: int
    losses: int
    win_rate: float
    se: float
    ci_low: float = math.nan
    ci_high: float = math.nan

    @property
    def comparisons(self) -> int:
        return self.wins + self.ties + self.losses

    def shares(self) -> tuple[float, float, float]:
        """(win, tie, loss) shares of the comparisons (NaN when there are none)."""
        c = self.comparisons
        return (self.wins / c, self.ties / c, self.losses / c) if c else (math.nan, math.nan, math.nan)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _paired_scores(a: Any, b: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """a, b as float arrays of one shape, [n] or [n, k]; ValueError naming the bad argument otherwise."""
    arrs = []
    for arg, v in (("a", a), ("b", b)):
        try:
            x = np.asarray(v, dtype=float)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name}: `{arg}` must be a list of scores or an [n, k] array "
                             f"(equally many per unit): {e}") from None
        if x.ndim not in (1, 2):
            raise ValueError(f"{name}: `{arg}` must be 1-D (one score per unit) or 2-D [n, k], got shape {x.shape}.")
        if np.isnan(x).any():
            raise ValueError(f"{name}: `{arg}` holds NaN scores; drop the unscored units from both sides first.")
        arrs.append(x)
    if arrs[0].shape != arrs[1].shape:
        raise ValueError(f"{name}: `a` and `b` must be paired (shapes {arrs[0].shape} vs {arrs[1].shape}).")
    return arrs[0], arrs[1]


def win_rate(a: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
             b: Sequence[float] | Sequence[Sequence[float]] | np.ndarray,
             n_boot: int = 0, alpha: float = 0.05, seed: int = 0) -> PairedWinRate:
    """Win rate of A over B from paired scores (higher is better; ties count one half).

    `a` and `b` are one score per unit ([n]) or k per unit ([n, k], compared column by column). The win rate is
    the mean over units of each unit's share of (wins + ties / 2); `se` is its standard error over units (0 for a
    single unit). `n_boot` > 0 adds a percentile bootstrap (1 - alpha) interval over units (`seed`). No units: NaN
    rate and s.e."""
    if n_boot < 0:
        raise ValueError(f"win_rate: n_boot must be >= 0 (0: no interval), got {n_boot}.")
    x, y = _paired_scores(a, b, "win_rate")
    outcome = (x > y) + 0.5 * (x == y)
    per_unit = outcome if outcome.ndim == 1 else outcome.mean(axis=1)
    wins, ties = int(np.sum(x > y)), int(np.sum(x == y))
    rate, se = mean_se(per_unit)
    lo = hi = math.nan
    if n_boot > 0 and per_unit.size:
        _, lo, hi = bootstrap_ci(per_unit, n_boot, alpha, seed)
    return PairedWinRate(n=int(per_unit.size), wins=wins, ties=ties, losses=int(x.size) - wins - ties,
                         win_rate=rate, se=se, ci_low=lo, ci_high=hi)


# ------------------------------------------------------------------------------------------------ tests
def paired_permutation_p(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_perm: int = 10000,
                         seed: int | Sequence[int] = 0) -> float:
    """Two-sided p-value of "the mean paired difference a - b is zero" by a sign-flip permutation test.

    Under the null each unit's difference is as likely to have either sign, so the statistic |mean(s * d)| is
    recomputed for random signs s. When 2^n <= n_perm every sign pattern is enumerated (exact p); otherwise
    p = (1 + #{|T*| >= |T|}) / (1 + n_perm) with `n_perm` draws from a generator seeded by `seed` (anything
    np.random.default_rng takes, e.g. protocol.draw_key's list). Identical inputs give p = 1."""
    x, y = _paired_scores(a, b, "paired_permutation_p")
    if x.ndim != 1:
        raise ValueError(f"paired_permutation_p: pass one score per unit (1-D), got shape {x.shape}.")
    if x.size == 0:
        raise ValueError("paired_permutation_p: `a` and `b` are empty; need at least one paired unit.")
    if n_perm <= 0:
        raise ValueError(f"paired_permutation_p: n_perm must be > 0, got {n_perm}.")
    d = x - y
    t = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))  # equal statistics up to rounding count as reaching T
    if d.size < 63 and 2 ** d.size <= n_perm:
        bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)[None, :]) & 1
        stats = np.abs(((1 - 2 * bits) * d).mean(axis=1))
        return float(np.mean(stats >= t - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 1024):  # chunks bound the memory of the [draws, n] sign matrix
        m = min(1024, n_perm - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, d.size))
        hits += int(np.sum(np.abs((signs * d).mean(axis=1)) >= t - tol))
    return (1 + hits) / (1 + n_perm)


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order: the i-th smallest p times (m - i + 1), made
    monotone non-decreasing in that order and capped at 1. Reject the hypotheses whose adjusted p <= alpha to
    control the family-wise error rate at alpha over the m declared endpoints."""
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"holm: `pvalues` must be a flat list, got shape {p.shape}.")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"holm: `pvalues` must lie in [0, 1] (no NaN), got {p.tolist()}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return out


# ------------------------------------------------------------------------------------------------ fits
@dataclasses.dataclass(frozen=True)
class LogLogFit:
    """log10(y) = slope * log10(x) + intercept, with percentile bootstrap (1 - alpha) intervals (NaN when no
    resample could be fitted)."""

    slope: float
    intercept: float
    slope_ci: tuple[float, float]
    intercept_ci: tuple[float, float]
    n_boot: int  # resamples that gave a fit (degenerate ones are skipped)

    def to_dict(self) -> dict[str, Any]:
        return {"slope": self.slope, "intercept": self.intercept, "slope_ci": list(self.slope_ci),
                "intercept_ci": list(self.intercept_ci), "n_boot": self.n_boot}


def _line(lx: np.ndarray, ly: np.ndarray) -> tuple[float, float]:
    """Least-squares (slope, intercept) of ly on lx (NaN when lx is constant)."""
    dx = lx - lx.mean()
    sxx = float(dx @ dx)
    if sxx <= 0 or not np.isfinite(ly).all():
        return math.nan, math.nan
    slope = float(dx @ (ly - ly.mean())) / sxx
    return slope, float(ly.mean() - slope * lx.mean())


def loglog_fit(xs: Sequence[float] | np.ndarray, ys: Sequence[float] | np.ndarray | None = None,
               n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
               units: Sequence[Sequence[float]] | None = None, paired_units: bool = False) -> LogLogFit:
    """Power law y = 10^intercept * x^slope fitted by least squares on log10 / log10, with bootstrap intervals.

    Either `ys` (one value per x; the bootstrap resamples the (x, y) points, skipping resamples with a single
    distinct x) or `units` (per x, the per-unit values whose mean is y, e.g. per-prompt scores; the bootstrap
    resamples units within each x and refits the means). With `paired_units` the units are the same across x
    (e.g. the same prompts for every policy size; equal counts needed) and one index draw is shared by every x.
    x and the fitted y must be positive; resamples with a non-positive mean are skipped. Resampling a handful of
    points (e.g. three model sizes) gives a crude interval; prefer `units` when per-unit values exist."""
    x = np.asarray(xs, dtype=float)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"loglog_fit: `xs` must be a flat list of at least two values, got shape {x.shape}.")
    if not (np.isfinite(x).all() and (x > 0).all()):
        raise ValueError(f"loglog_fit: `xs` must be finite and positive, got {x.tolist()}.")
    if (ys is None) == (units is None):
        raise ValueError("loglog_fit: pass exactly one of `ys` (one value per x) and `units` (per-unit values).")
    if n_boot < 0 or not 0 < alpha < 1:
        raise ValueError(f"loglog_fit: need n_boot >= 0 and 0 < alpha < 1 (got n_boot={n_boot}, alpha={alpha}).")
    rows: list[np.ndarray] = []
    if units is not None:
        rows = [np.asarray(u, dtype=float).reshape(-1) for u in units]
        if len(rows) != x.size or any(r.size == 0 for r in rows):
            raise ValueError(f"loglog_fit: `units` needs one non-empty list per x ({x.size}), got "
                             f"{[r.size for r in rows]}.")
        if paired_units and len({r.size for r in rows}) != 1:
            raise ValueError(f"loglog_fit: `paired_units` needs equally many units per x, got "
                             f"{[r.size for r in rows]}.")
        y = np.array([r.mean() for r in rows])
    else:
        y = np.asarray(ys, dtype=float)
        if y.shape != x.shape:
            raise ValueError(f"loglog_fit: `xs` and `ys` must match (shapes {x.shape} vs {y.shape}).")
    if not (np.isfinite(y).all() and (y > 0).all()):
        raise ValueError(f"loglog_fit: `ys` must be finite and positive to take logs, got {y.tolist()}.")
    if np.unique(x).size < 2:
        raise ValueError(f"loglog_fit: `xs` needs at least two distinct values, got {x.tolist()}.")
    lx = np.log10(x)
    slope, icpt = _line(lx, np.log10(y))
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(n_boot):
        if units is None:
            idx = rng.integers(0, x.size, size=x.size)
            bx, by = lx[idx], y[idx]
        else:
            shared = rng.integers(0, rows[0].size, size=rows[0].size) if paired_units else None
            bx = lx
            by = np.array([r[shared if shared is not None else rng.integers(0, r.size, size=r.size)].mean()
                           for r in rows])
        if (by <= 0).any():
            continue
        s, c = _line(bx, np.log10(by))
        if np.isfinite(s):
            fits.append((s, c))
    if fits:
        f = np.asarray(fits)
        (s_lo, c_lo), (s_hi, c_hi) = np.quantile(f, [alpha / 2, 1 - alpha / 2], axis=0)
        s_ci, c_ci = (float(s_lo), float(s_hi)), (float(c_lo), float(c_hi))
    else:
        s_ci = c_ci = (math.nan, math.nan)
    return LogLogFit(slope=slope, intercept=icpt, slope_ci=s_ci, intercept_ci=c_ci, n_boot=len(fits))
