"""AI-labeler metrics (pure NumPy): alignment with human labels, position-bias rate, agreement of variants.

Soft labels are P(A) per pair; the labeler's verdict is A if P(A) > 0.5, B if P(A) < 0.5, a tie at exactly 0.5.
Human labels are 0 (A preferred) or 1 (B preferred). A tie counts half in alignment and agreement (the expected
score of breaking it at random), so a labeler that only ever answers by position scores 0.5, not 1 or 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from prs_jax.eval.metrics import WinRate, win_rate_from_probs


def verdicts(p_a: Sequence[float] | np.ndarray) -> np.ndarray:
    """0 where A wins (P(A) > 0.5), 1 where B wins, -1 for a tie."""
    p = np.asarray(p_a, np.float64).reshape(-1)
    return np.where(p > 0.5, 0, np.where(p < 0.5, 1, -1))


def _credit(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.where((pred == -1) | (target == -1), 0.5, (pred == target).astype(np.float64))


def alignment_credit(p_a: Sequence[float] | np.ndarray, human: Sequence[int] | np.ndarray) -> np.ndarray:
    """Per pair: 1 where the soft label picks the human-preferred answer, 0 where the other, 1/2 for a tie."""
    pred, target = verdicts(p_a), np.asarray(human, np.int64).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"labeler_alignment: {pred.size} soft labels but {target.size} human labels.")
    if not np.isin(target, (0, 1)).all():
        raise ValueError("labeler_alignment: human labels must be 0 (A preferred) or 1 (B preferred).")
    return _credit(pred, target)


def labeler_alignment(p_a: Sequence[float] | np.ndarray, human: Sequence[int] | np.ndarray) -> float:
    """Mean over pairs of 1[argmax soft label == human label] (human: 0 = A preferred, 1 = B); ties count half."""
    c = alignment_credit(p_a, human)
    return float(c.mean()) if c.size else math.nan


def _first_position(q: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(q, np.float64)
    return x[:, 0] if x.ndim == 2 else x.reshape(-1)


def position_bias_rate(q_ab: Sequence[float] | np.ndarray, q_ba: Sequence[float] | np.ndarray) -> float:
    """Share of pairs where the same POSITION wins in both orders. `q_ab` / `q_ba` are P(position 1 wins) with
    A first and with B first (or [N, 2] distributions over positions); a tie in either order is no win."""
    same = same_position(q_ab, q_ba)
    return float(same.mean()) if same.size else math.nan


def same_position(q_ab: Sequence[float] | np.ndarray, q_ba: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per pair: 1.0 where the same position wins in both orders (see position_bias_rate), else 0.0."""
    a, b = _first_position(q_ab), _first_position(q_ba)
    if a.shape != b.shape:
        raise ValueError(f"position_bias_rate: {a.size} judgements with A first but {b.size} with B first.")
    return (((a > 0.5) & (b > 0.5)) | ((a < 0.5) & (b < 0.5))).astype(np.float64)


def agreement(p_a_1: Sequence[float] | np.ndarray, p_a_2: Sequence[float] | np.ndarray) -> float:
    """Share of pairs on which two labeler variants pick the same winner (a tie in either counts half)."""
    v1, v2 = verdicts(p_a_1), verdicts(p_a_2)
    if v1.shape != v2.shape:
        raise ValueError(f"agreement: {v1.size} labels from the first variant but {v2.size} from the second.")
    return float(_credit(v1, v2).mean()) if v1.size else math.nan


def judge_win_rate(q_ab: Sequence[float] | np.ndarray, q_ba: Sequence[float] | np.ndarray,
                   tie_margin: float = 0.0) -> WinRate:
    """Win rate of A over B with the AI labeler as judge, from its distributions over positions with A first
    and with B first (as in PairLabel.ab.dist / .ba.dist, or P(position 1) alone); see eval.win_rate_from_probs."""
    return win_rate_from_probs(_first_position(q_ab), _first_position(q_ba), tie_margin)


@dataclasses.dataclass(frozen=True)
class LabelSummary:
    """Summary of a labelling run (NaN where not measurable)."""

    n: int
    mean_p_a: float
    ties: int
    n_human: int
    alignment: float
    n_both_orders: int
    position_bias: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(rows: Sequence[dict[str, Any]]) -> LabelSummary:
    """Summary of labelled rows (fields p_a, optional human_label "a"/"b", q_ab / q_ba)."""
    p = np.asarray([r["p_a"] for r in rows], np.float64)
    human = [(r["p_a"], 0 if r["human_label"] == "a" else 1) for r in rows if r.get("human_label") in ("a", "b")]
    both = [(r["q_ab"][0], r["q_ba"][0]) for r in rows if r.get("q_ab") is not None and r.get("q_ba") is not None]
    return LabelSummary(
        n=len(rows), mean_p_a=float(p.mean()) if len(p) else math.nan, ties=int(np.sum(verdicts(p) == -1)),
        n_human=len(human),
        alignment=labeler_alignment([x for x, _ in human], [y for _, y in human]) if human else math.nan,
        n_both_orders=len(both),
        position_bias=position_bias_rate([x for x, _ in both], [y for _, y in both]) if both else math.nan)
