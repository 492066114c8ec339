"""Diversity of the responses to one prompt: semantic (embedding cosine), lexical (pairwise ROUGE-L F1) and
distinct-n.

Semantic diversity follows verbalised sampling: the mean over response pairs of 1 - clip(cos(e_i, e_j), 0, 1),
in percent (0 = all the same direction, 100 = pairwise orthogonal or opposed). The embedder is pluggable: any
function list[str] -> [n, d] array, e.g. a sentence-transformers model's `encode`. `ModelEmbedder` is a
default that needs no download: mean-pooled final hidden states of any loaded prs_jax model. It is a WEAK
stand-in for a sentence embedder (a causal LM's states are not trained for similarity; its cosines sit high and
compress differences), good for relative comparisons between methods on the same model and for tests, not for
numbers to put next to the paper's.

ROUGE-L F1 is computed here (LCS on word tokens, F1 with beta = 1), with the same tokenisation as the
`rouge-score` package without stemming: lower-cased, runs of letters/digits as tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from itertools import combinations
from typing import Any, Callable, Sequence

import numpy as np

Embedder = Callable[[list[str]], Any]


# ----------------------------------------------------------------------------------------------- semantic
def cosine_matrix(emb: Any) -> np.ndarray:
    """Pairwise cosine similarities [n, n] of embeddings [n, d] (a zero vector has cosine 0 with everything)."""
    e = np.asarray(emb, np.float64)
    if e.ndim != 2:
        raise ValueError(f"cosine_matrix: embeddings must be [n, d], got shape {e.shape}.")
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    unit = np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)
    return unit @ unit.T


def semantic_diversity_from_embeddings(emb: Any) -> float:
    """100 * mean over pairs i < j of 1 - clip(cos(e_i, e_j), 0, 1); NaN for fewer than two responses."""
    e = np.asarray(emb, np.float64)
    n = e.shape[0] if e.ndim == 2 else 0
    if n < 2:
        return math.nan
    iu = np.triu_indices(n, k=1)
    return float(100.0 * np.mean(1.0 - np.clip(cosine_matrix(e)[iu], 0.0, 1.0)))


def semantic_diversity(texts: Sequence[str], embedder: Embedder) -> float:
    """Semantic diversity (%) of one prompt's responses under `embedder`."""
    if len(texts) < 2:
        return math.nan
    return semantic_diversity_from_embeddings(_embed(embedder, list(texts)))


def semantic_diversity_groups(groups: Sequence[Sequence[str]], embedder: Embedder) -> tuple[float, list[float]]:
    """(mean over prompts, per-prompt values) with every text embedded in ONE embedder call; prompts with
    fewer than two responses give NaN and are left out of the mean."""
    flat = [t for g in groups for t in g]
    emb = _embed(embedder, flat) if flat else np.zeros((0, 1))
    per, start = [], 0
    for g in groups:
        per.append(semantic_diversity_from_embeddings(emb[start:start + len(g)]) if len(g) >= 2 else math.nan)
        start += len(g)
    finite = [v for v in per if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else math.nan), per


def _embed(embedder: Embedder, texts: list[str]) -> np.ndarray:
    e = np.asarray(embedder(texts), np.float64)
    if e.ndim != 2 or e.shape[0] != len(texts):
        raise ValueError(f"embedder returned shape {e.shape} for {len(texts)} texts; expected [n, d].")
    return e


class ModelEmbedder:
    """Mean-pooled final hidden states (after the final norm) of a prs_jax model's backbone (CausalLM or
    RewardModel): a download-free, weak stand-in for a sentence embedder (see the module docstring).

    Texts are tokenised without special tokens, cut to `max_length`, and run in batches padded to power-of-two
    lengths, so a run compiles a few programs."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 256, batch_size: int = 16,
                 pad_id: int | None = None):
        import jax
        from flax import nnx

        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        pid = pad_id if pad_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pid) if pid is not None else 0

        @nnx.jit
        def pooled(module, ids, mask):
            hidden, _ = module.model(ids, attention_mask=mask)
            m = mask[..., None].astype(hidden.dtype)
            return (hidden * m).sum(axis=1) / jax.numpy.maximum(m.sum(axis=1), 1.0)

        self._pooled = pooled

    @classmethod
    def from_pretrained(cls, path: str, **kw: Any) -> "ModelEmbedder":
        """Load a causal LM checkpoint directory and its tokenizer (local files only)."""
        from prs_jax.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path), load_tokenizer(path), **kw)

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embeddings [n, hidden] as float32 NumPy (a text with no tokens embeds to zeros)."""
        import jax.numpy as jnp

        ids_all = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"])[:self.max_length] for t in texts]
        out = []
        for s in range(0, len(ids_all), self.batch_size):
            chunk = ids_all[s:s + self.batch_size]
            rows = 1 << max(len(chunk) - 1, 0).bit_length()
            length = 1 << max(max((len(x) for x in chunk), default=1) - 1, 7).bit_length()
            ids = np.full((rows, length), self.pad_id, np.int32)
            mask = np.zeros((rows, length), bool)
            for i, x in enumerate(chunk):
                ids[i, :len(x)] = x
                mask[i, :len(x)] = True
            out.append(np.asarray(self._pooled(self.model, jnp.asarray(ids), jnp.asarray(mask)),
                                  np.float32)[:len(chunk)])
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), np.float32)
        return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------------------------- lexical
_TOKEN_RE = re.compile(r"[^\W_]+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (rouge-score's default, without stemming, Unicode-aware)."""
    return _TOKEN_RE.findall(str(text).lower())


def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence (row-wise DP; each row is a running max in NumPy)."""
    if not a or not b:
        return 0
    vocab: dict[Any, int] = {}
    ia = np.asarray([vocab.setdefault(x, len(vocab)) for x in a])
    ib = np.asarray([vocab.setdefault(x, len(vocab)) for x in b])
    if len(ib) > len(ia):
        ia, ib = ib, ia
    prev = np.zeros(len(ib) + 1, np.int64)
    for x in ia:
        cand = prev.copy()
        hit = np.flatnonzero(ib == x)
        cand[hit + 1] = np.maximum(cand[hit + 1], prev[hit] + 1)
        prev = np.maximum.accumulate(cand)
    return int(prev[-1])


def rouge_l_f1(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric; 0 when either has no tokens)."""
    ta, tb = tokenize(a), tokenize(b)
    lcs = lcs_length(ta, tb)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(tb), lcs / len(ta)
    return 2 * p * r / (p + r)


def mean_pairwise_rouge_l(texts: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over pairs i < j (lower = more diverse); NaN for fewer than two texts."""
    if len(texts) < 2:
        return math.nan
    return float(np.mean([rouge_l_f1(a, b) for a, b in combinations(texts, 2)]))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all texts (word tokens); NaN when there are no n-grams."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1 (got {n}).")
    grams: Counter[tuple[str, ...]] = Counter()
    for t in texts:
        toks = tokenize(t)
        grams.update(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else math.nan


def diversity_report(texts: Sequence[str], embedder: Embedder | None = None,
                     ns: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """All diversity numbers of one prompt's responses (semantic only with an embedder)."""
    out: dict[str, float] = {"n": len(texts), "rouge_l": mean_pairwise_rouge_l(texts)}
    out.update({f"distinct_{k}": distinct_n(texts, k) for k in ns})
    if embedder is not None:
        out["semantic"] = semantic_diversity(texts, embedder)
    return out
