"""Evaluation metrics as pure NumPy functions: reward statistics, position-swapped win rates, and the
enumerative-QA metrics of verbalised sampling (Coverage-N, KL to uniform over the ground truth, precision).

Rewards come as [prompts, samples] arrays or ragged lists of lists; NaN rewards (unscored samples) are ignored
and counted. Logs are natural (nats).
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from prs_jax.eval import stats

DEFAULT_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


# ----------------------------------------------------------------------------------------------- rewards
def _rows(rewards: Any) -> list[np.ndarray]:
    """Rewards per prompt as float64 arrays (a 1-D input is one sample per prompt)."""
    if isinstance(rewards, np.ndarray) and rewards.ndim == 2:
        return [np.asarray(r, np.float64) for r in rewards]
    rows = list(rewards)
    if rows and np.ndim(rows[0]) == 0:
        return [np.asarray([r], np.float64) for r in rows]
    return [np.asarray(r, np.float64).reshape(-1) for r in rows]


@dataclasses.dataclass(frozen=True)
class RewardStats:
    """Summary of rewards over prompts x samples. `best_of_n_mean` is the mean over prompts of each prompt's best
    sample; `values` holds every finite reward (sorted) for histograms and box plots."""

    n_prompts: int
    n_samples: int
    n_nan: int
    mean: float
    std: float
    median: float
    min: float
    max: float
    best_of_n_mean: float
    first_sample_mean: float
    quantiles: dict[float, float]
    values: np.ndarray

    def to_dict(self, with_values: bool = False) -> dict[str, Any]:
        """JSON-ready dict (quantile keys as strings like "q0.25")."""
        out = {k: getattr(self, k) for k in ("n_prompts", "n_samples", "n_nan", "mean", "std", "median", "min",
                                             "max", "best_of_n_mean", "first_sample_mean")}
        out.update({f"q{q:g}": v for q, v in self.quantiles.items()})
        if with_values:
            out["values"] = self.values.tolist()
        return out


def reward_stats(rewards: Any, quantiles: Sequence[float] = DEFAULT_QUANTILES) -> RewardStats:
    """Mean / std (population) / median / quantiles over all finite rewards, and the best-of-N mean over
    prompts (prompts whose rewards are all NaN do not count)."""
    rows = _rows(rewards)
    flat = np.concatenate(rows) if rows else np.zeros(0)
    finite = np.sort(flat[np.isfinite(flat)])
    nan = math.nan
    best = [r[np.isfinite(r)].max() for r in rows if np.isfinite(r).any()]
    first = [r[0] for r in rows if len(r) and np.isfinite(r[0])]
    has = len(finite) > 0
    return RewardStats(
        n_prompts=len(rows), n_samples=int(flat.size), n_nan=int(flat.size - finite.size),
        mean=float(finite.mean()) if has else nan, std=float(finite.std()) if has else nan,
        median=float(np.median(finite)) if has else nan, min=float(finite[0]) if has else nan,
        max=float(finite[-1]) if has else nan, best_of_n_mean=float(np.mean(best)) if best else nan,
        first_sample_mean=float(np.mean(first)) if first else nan,
        quantiles={float(q): (float(np.quantile(finite, q)) if has else nan) for q in quantiles}, values=finite)


def reward_histogram(values: Any, bins: int | Sequence[float] = 20,
                     value_range: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(counts [bins], edges [bins + 1]) of the finite values: ready for a bar plot."""
    v = np.asarray(values, np.float64).reshape(-1)
    return np.histogram(v[np.isfinite(v)], bins=bins, range=value_range)


def expected_best_of_n(rewards: Sequence[float] | np.ndarray, n: int) -> float:
    """E[max of n samples drawn without replacement] from one prompt's N rewards (exact, order statistics):
    sum_i r_(i) C(i-1, n-1) / C(N, n) over rewards sorted ascending (i = 1..N)."""
    r = np.sort(np.asarray(rewards, np.float64)[np.isfinite(np.asarray(rewards, np.float64))])
    big_n = len(r)
    if not 1 <= n <= big_n:
        raise ValueError(f"expected_best_of_n: n must be in [1, {big_n}] (got {n}).")
    total = math.comb(big_n, n)
    w = np.asarray([math.comb(i - 1, n - 1) / total for i in range(1, big_n + 1)], np.float64)
    return float(np.sum(r * w))


def best_of_n_curve(rewards: Any, ns: Sequence[int]) -> dict[int, float]:
    """Mean over prompts of `expected_best_of_n` for each n (prompts with fewer than n finite rewards skipped)."""
    rows = [r[np.isfinite(r)] for r in _rows(rewards)]
    out = {}
    for n in ns:
        vals = [expected_best_of_n(r, n) for r in rows if len(r) >= n]
        out[int(n)] = float(np.mean(vals)) if vals else math.nan
    return out


# ----------------------------------------------------------------------------------------------- win rates
@dataclasses.dataclass(frozen=True)
class WinRate:
    """A vs B over prompts: `win_rate` = (wins + ties / 2) / n and `se` its standard error over prompts
    (prs_jax.eval.stats.win_rate on the per-prompt verdicts); `mean_prob` is the soft win rate (mean of the
    order-averaged P(A better)); `consistent` is the fraction where both orders agree on the winner."""

    n: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    mean_prob: float
    consistent: float
    probs: np.ndarray  # order-averaged P(A better) per prompt
    se: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("n", "wins", "losses", "ties", "win_rate", "se", "mean_prob",
                                              "consistent")}


def win_rate_from_probs(p_ab: Sequence[float] | np.ndarray, p_ba: Sequence[float] | np.ndarray,
                        tie_margin: float = 0.0) -> WinRate:
    """Position-debiased win rate from P(first better) with A shown first (`p_ab`) and B shown first (`p_ba`).

    Per prompt p = (p_ab + (1 - p_ba)) / 2; a win if p > 0.5 + tie_margin, a loss if p < 0.5 - tie_margin,
    otherwise a tie. NaN judgements are dropped."""
    a = np.asarray(p_ab, np.float64).reshape(-1)
    b = np.asarray(p_ba, np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"win_rate_from_probs: {a.size} judgements with A first but {b.size} with B first.")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = np.clip(a[ok], 0, 1), np.clip(b[ok], 0, 1)
    p = (a + (1.0 - b)) / 2.0
    verdict = (p > 0.5 + tie_margin).astype(float) - (p < 0.5 - tie_margin)  # +1 A wins, -1 B wins, 0 tie
    w = stats.win_rate(verdict, np.zeros_like(verdict))
    n = w.n
    first, second = np.sign(a - 0.5), np.sign(0.5 - b)  # each order's verdict for A (+1 A, -1 B, 0 tie)
    return WinRate(n=n, wins=w.wins, losses=w.losses, ties=w.ties, win_rate=w.win_rate,
                   mean_prob=float(p.mean()) if n else math.nan,
                   consistent=float(np.mean(first == second)) if n else math.nan, probs=p, se=w.se)


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str],
             judge: Callable[[str, str, str], float], tie_margin: float = 0.0) -> WinRate:
    """Win rate of A over B with a judge fn(prompt, first, second) -> P(first better), asked in both orders."""
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"win_rate: {len(prompts)} prompts, {len(responses_a)} A responses and "
                         f"{len(responses_b)} B responses; they must match.")
    p_ab = [float(judge(x, a, b)) for x, a, b in zip(prompts, responses_a, responses_b)]
    p_ba = [float(judge(x, b, a)) for x, a, b in zip(prompts, responses_a, responses_b)]
    return win_rate_from_probs(p_ab, p_ba, tie_margin)


# ----------------------------------------------------------------------------------------------- enumerative QA
def normalize_answer(text: str) -> str:
    """Case-folded, accents stripped, punctuation removed, whitespace collapsed; a leading article dropped."""
    t = unicodedata.normalize("NFKD", str(text))
    t = "".join(c for c in t if not unicodedata.combining(c)).casefold()
    t = re.sub(r"[^\w\s]", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"^(the|a|an) ", "", t)


def _norm_set(answers: Iterable[str], normalize: Callable[[str], str]) -> set[str]:
    return {normalize(a) for a in answers}


def precision(responses: Sequence[str], ground_truth: Iterable[str],
              normalize: Callable[[str], str] = normalize_answer) -> float:
    """Fraction of responses (duplicates included) that are in the ground-truth set."""
    if not responses:
        return math.nan
    gt = _norm_set(ground_truth, normalize)
    return sum(normalize(r) in gt for r in responses) / len(responses)


def coverage(responses: Sequence[str], ground_truth: Iterable[str],
             normalize: Callable[[str], str] = normalize_answer) -> float:
    """Coverage-N: |unique correct responses| / |ground-truth set|."""
    gt = _norm_set(ground_truth, normalize)
    if not gt:
        raise ValueError("coverage: the ground-truth set is empty.")
    return len({normalize(r) for r in responses} & gt) / len(gt)


def empirical_distribution(answers: Sequence[str], normalize: Callable[[str], str] | None = normalize_answer,
                           weights: Sequence[float] | None = None) -> dict[str, float]:
    """Answer -> probability from counts (or from non-negative `weights`, e.g. verbalised probabilities)."""
    keys = [normalize(a) if normalize else a for a in answers]
    w = np.ones(len(keys)) if weights is None else np.clip(np.nan_to_num(np.asarray(weights, np.float64)), 0, None)
    tot: Counter[str] = Counter()
    for k, x in zip(keys, w):
        tot[k] += float(x)
    s = sum(tot.values())
    return {k: v / s for k, v in tot.items()} if s > 0 else {}


def entropy(p: Mapping[str, float] | Sequence[float] | np.ndarray) -> float:
    """Shannon entropy in nats (zero-probability entries contribute nothing)."""
    v = np.asarray(list(p.values()) if isinstance(p, Mapping) else p, np.float64)
    v = v[v > 0]
    return float(-np.sum(v * np.log(v)))


def kl_divergence(p: Mapping[str, float], q: Mapping[str, float], eps: float = 0.0) -> float:
    """KL(P || Q) in nats over P's support; inf where Q gives 0 to an answer P has (unless eps > 0, which
    mixes eps of uniform mass over the union of both supports into Q)."""
    keys = sorted(set(p) | set(q))
    pv = np.asarray([p.get(k, 0.0) for k in keys], np.float64)
    qv = np.asarray([q.get(k, 0.0) for k in keys], np.float64)
    if eps > 0:
        qv = (1 - eps) * qv + eps / len(keys)
    m = pv > 0
    if np.any(qv[m] <= 0):
        return math.inf
    return float(np.sum(pv[m] * (np.log(pv[m]) - np.log(qv[m]))))


def kl_to_uniform(responses: Sequence[str], ground_truth: Iterable[str],
                  normalize: Callable[[str], str] = normalize_answer,
                  weights: Sequence[float] | None = None) -> float:
    """KL(P_hat || Uniform over GT) = log|GT| - H(P_hat), with P_hat the empirical distribution of the CORRECT
    responses (incorrect ones are left out: they are counted by `precision`). NaN with no correct response."""
    gt = _norm_set(ground_truth, normalize)
    if not gt:
        raise ValueError("kl_to_uniform: the ground-truth set is empty.")
    keep = [i for i, r in enumerate(responses) if normalize(r) in gt]
    if not keep:
        return math.nan
    p = empirical_distribution([responses[i] for i in keep], normalize,
                               None if weights is None else [weights[i] for i in keep])
    if not p:
        return math.nan
    return float(math.log(len(gt)) - entropy(p))


def kl_to_reference(responses: Sequence[str], reference: Mapping[str, float],
                    normalize: Callable[[str], str] | None = normalize_answer, eps: float = 0.0,
                    weights: Sequence[float] | None = None) -> float:
    """KL(P_hat || reference) with P_hat from the responses (e.g. dice rolls against uniform 1..6); the
    reference's keys are normalised like the responses and its values renormalised to sum to 1."""
    ref: Counter[str] = Counter()
    for k, v in reference.items():
        ref[normalize(k) if normalize else k] += float(v)
    s = sum(ref.values())
    if s <= 0:
        raise ValueError("kl_to_reference: the reference distribution has no mass.")
    p = empirical_distribution(responses, normalize, weights)
    if not p:
        return math.nan
    return kl_divergence(p, {k: v / s for k, v in ref.items()}, eps)


def enumerative_metrics(responses: Sequence[str], ground_truth: Iterable[str],
                        normalize: Callable[[str], str] = normalize_answer) -> dict[str, float]:
    """Coverage-N, KL to uniform over GT, precision and the number of unique responses, for one prompt."""
    gt = list(ground_truth)
    return {"coverage": coverage(responses, gt, normalize), "kl_uniform": kl_to_uniform(responses, gt, normalize),
            "precision": precision(responses, gt, normalize), "unique": len({normalize(r) for r in responses}),
            "n": len(responses)}
