"""Pure functions for AI-feedback label distributions.

A label ("1", "2", or a score "1".."10") may be several tokens (a leading space, "10" as "1" + "0"). Its log-prob
after a context is the teacher-forced sum over its tokens. When one label's tokens are a prefix of another's
("1" of "10"), the shorter label is the event "its tokens, then NOT a continuation towards a longer label", so
that the labels are disjoint events: log P("1") = log p("1") + log(1 - p("0" | "1")). The distribution over
labels is the softmax of these log-probs (normalised over the label set, as the RLAIF paper does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from prs_jax.errors import ConfigError

TokenSeq = tuple[int, ...]


def split_labels(encode: Callable[[str], list[int]], text: str, labels: Sequence[str]
                 ) -> tuple[str, list[list[int]]]:
    """(context text, token ids of each label) with encode(context) + ids_i == encode(context + label_i).

    Tried first with `text` as is, then with its trailing whitespace moved into the labels (tokenisers that
    write " 1" as one token merge a trailing space of the ending with the digit)."""
    for cut in dict.fromkeys((len(text), len(text.rstrip()))):
        ctx, moved = text[:cut], text[cut:]
        base = encode(ctx)
        ids = []
        for lab in labels:
            full = encode(ctx + moved + lab)
            if len(full) <= len(base) or full[:len(base)] != base:
                break
            ids.append(full[len(base):])
        else:
            if len({tuple(x) for x in ids}) != len(ids):
                raise ConfigError(f"labels {list(labels)} do not tokenise to distinct token sequences after "
                                  f"{text[-40:]!r}; choose other labels.")
            return ctx, ids
    raise ConfigError(f"the labels {list(labels)} merge with the end of the prompt {text[-40:]!r} when tokenised, "
                      "so their probabilities cannot be read after it; end the prompt.ending with a separator "
                      "such as '=' or ':'.")


def plan_rows(labels: Sequence[Sequence[int]]) -> list[TokenSeq]:
    """Token extensions to run after the context so that every needed next-token distribution is computed:
    after each label's proper prefixes, and after a whole label that is a prefix of another (exclusivity).
    Only maximal extensions are kept (an extension covers every prefix of itself)."""
    labs = [tuple(t) for t in labels]
    need = {t[:-1] for t in labs}
    need |= {t for t in labs if any(len(u) > len(t) and u[:len(t)] == t for u in labs)}
    return sorted(e for e in need if not any(len(f) > len(e) and f[:len(e)] == e for f in need))


def label_log_probs(next_logprobs: Mapping[TokenSeq, Any], labels: Sequence[Sequence[int]],
                    exclusive: bool = True) -> np.ndarray:
    """Log-prob of each label [K] from next-token log-probs after the context extended by each prefix
    (`next_logprobs[prefix][token]`, e.g. a full log_softmax vector or a dict of the tokens needed)."""
    labs = [tuple(t) for t in labels]
    out = np.zeros(len(labs), np.float64)
    for i, t in enumerate(labs):
        lp = float(sum(float(next_logprobs[t[:j]][t[j]]) for j in range(len(t))))
        if exclusive:
            conts = {u[len(t)] for u in labs if len(u) > len(t) and u[:len(t)] == t}
            if conts:
                mass = sum(math.exp(float(next_logprobs[t][c])) for c in conts)
                lp += math.log1p(-mass) if mass < 1.0 else -math.inf
        out[i] = lp
    return out


def normalize(log_probs: Any) -> np.ndarray:
    """Softmax over the last axis (the label set), float64."""
    x = np.asarray(log_probs, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isfinite(m), m, 0.0))
    return e / np.sum(e, axis=-1, keepdims=True)


def debias(q_ab: Any, q_ba: Any) -> tuple[float, float]:
    """Position-debiased (P(A), P(B)) from the distribution over positions with A first (`q_ab`) and with B
    first (`q_ba`): P(A) = (q_ab[0] + q_ba[1]) / 2."""
    q_ab, q_ba = np.asarray(q_ab, np.float64), np.asarray(q_ba, np.float64)
    p_a = float((q_ab[0] + q_ba[1]) / 2.0)
    p_b = float((q_ab[1] + q_ba[0]) / 2.0)
    return p_a, p_b


def expected_score(dist: Any, values: Sequence[float] | None = None) -> np.ndarray:
    """s = sum_i values[i] * dist[..., i] (values default to 1..K)."""
    d = np.asarray(dist, np.float64)
    v = np.arange(1, d.shape[-1] + 1, dtype=np.float64) if values is None else np.asarray(values, np.float64)
    return d @ v


def rescale_score(s: Any, low: float = 1.0, high: float = 10.0) -> np.ndarray:
    """Affine map of a score in [low, high] to [-1, 1]: (s - (low + high) / 2) / ((high - low) / 2)."""
    return (np.asarray(s, np.float64) - (low + high) / 2.0) / ((high - low) / 2.0)
