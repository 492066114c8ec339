"""Helpers shared by the studies that sample from a policy, score with a gold reward or a reward model, and
retrain (sr_dpo, offline_rl): chunked strategy runs on the study environment's engine (prs_jax.experiments.env),
conversational training rows, and pure statistics (Pearson, Spearman).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from prs_jax.experiments.env import StudyEnv
from prs_jax.strategies.base import PromptItem, Scorer, StrategyResult


def run_chunked(env: StudyEnv, strategy: Any, items: Sequence[PromptItem], model: Any, scorer: Scorer, seed: int,
                chunk: int, desc: str) -> list[StrategyResult]:
    """Run a strategy over prompts in chunks with `model` (the env's policy or a retrained one) on the env's
    engine (a fresh engine per chunk bounds the KV held at once). Every chunk's engine has the same seed: samples
    are keyed by prompt id and tree path, so `chunk` does not change them."""
    out: list[StrategyResult] = []
    starts = range(0, len(items), max(chunk, 1))
    for i, start in enumerate(tqdm(starts, desc=desc, unit="chunk", leave=False)):
        engine = env.engine(seed, model=model)
        out.extend(strategy.run(list(items[start:start + chunk]), engine, scorer))
    return out


def rescore(results: Sequence[StrategyResult], scorer: Scorer) -> list[list[float]]:
    """Another scorer's rewards for every candidate of every result (the stored node rewards are unchanged)."""
    flat = [(r.item, c.text) for r in results for c in r.candidates]
    scores = scorer([it.prompt for it, _ in flat], [t for _, t in flat], [it.preference for it, _ in flat])
    out, k = [], 0
    for r in results:
        out.append([float(s) for s in scores[k:k + len(r.candidates)]])
        k += len(r.candidates)
    return out


def config_digest(obj: Any, *files: Path) -> str:
    """A short hash of a config (as JSON) and data files: names run directories, so that a rerun resumes only
    a run with the same settings and data."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:10]


def user_turn(item: PromptItem) -> list[dict[str, str]]:
    """The policy's input for (x, z) as one user message (x, a blank line, z)."""
    from prs_jax.strategies.base import join_preference

    return [{"role": "user", "content": join_preference(item.prompt, item.preference)}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------ correlations
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (nan when either side is constant or fewer than two points)."""
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    if x_.size < 2 or x_.std() == 0 or y_.std() == 0:
        return float("nan")
    return float(np.corrcoef(x_, y_)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), float)
    ranks[order] = np.arange(len(v), dtype=float)
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    if x_.size < 2:
        return float("nan")
    return pearson(_ranks(x_), _ranks(y_))
