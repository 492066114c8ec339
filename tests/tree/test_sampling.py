"""Sampling processors: empirical frequencies match the truncated softmax; penalties match a NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.tree.sampling import SamplingParams, apply_penalties, sample, sampling_distribution, truncate


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=8, top_p=0.9),
])
def test_empirical_frequencies_match_truncated_softmax(params):
    rng = np.random.default_rng(0)
    v, draws = 12, 40_000
    logits = jnp.asarray(rng.normal(size=(v,)) * 1.5, jnp.float32)
    u = jax.random.uniform(jax.random.key(0), (draws,))
    toks, _ = sample(jnp.broadcast_to(logits, (draws, v)), u, params)
    counts = np.bincount(np.asarray(toks), minlength=v)
    # independent expectation: NumPy softmax(logits / T) restricted by top-k, top-p, min-p
    x = np.asarray(logits, np.float64) / params.temperature
    keep = np.ones(v, bool)
    if params.top_k:
        keep &= x >= np.sort(x)[-params.top_k]
    p = np.exp(x - x.max()) * keep
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        k2 = np.zeros(v, bool)
        k2[order[before < params.top_p]] = True
        p = p * k2
        p /= p.sum()
    if params.min_p:
        p = p * (p >= params.min_p * p.max())
        p /= p.sum()
    np.testing.assert_allclose(np.asarray(sampling_distribution(logits[None], params))[0], p, atol=1e-6)
    assert (counts[p == 0] == 0).all()
    expected = p * draws
    chi2 = (((counts - expected) ** 2) / np.where(expected > 0, expected, 1))[p > 0].sum()
    dof = int((p > 0).sum()) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * max(dof, 1)), (chi2, dof)


def test_log_probs_are_raw_model_log_probs():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    tok, lp = sample(logits, jnp.asarray([0.3]), SamplingParams(temperature=0.5, top_k=2))
    np.testing.assert_allclose(float(lp[0]), float(jax.nn.log_softmax(logits[0])[tok[0]]), rtol=1e-6)
    tok, _ = sample(logits, jnp.asarray([0.99]), SamplingParams(greedy=True))
    assert int(tok[0]) == 0


def test_penalties_match_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 10)).astype(np.float32)
    counts = rng.integers(0, 3, size=(3, 10)).astype(np.int32)
    seen = rng.random((3, 10)) < 0.3
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3)
    out = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(seen), params))
    ref = logits.copy()
    rep = (counts > 0) | seen
    ref = np.where(rep, np.where(ref > 0, ref / 1.3, ref * 1.3), ref)
    ref = ref - 0.5 * (counts > 0) - 0.25 * counts
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_invalid_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SamplingParams(temperature=0.0)


def test_truncation_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
    k2 = truncate(logits, SamplingParams(top_k=2))
    assert np.isfinite(np.asarray(k2)).sum() == 2
    p = truncate(logits, SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    np.testing.assert_array_equal(np.isfinite(np.asarray(p))[0], [True, True, False, False])


def test_inverse_cdf_edges_never_draw_removed_tokens():
    from prs_jax.tree.sampling import inverse_cdf

    v = 300  # not a multiple of the 128-token block
    x = np.full((4, v), -np.inf, np.float32)
    x[:, 5] = 0.0
    x[:, 130] = 1.0
    x[:, 299] = -0.5
    u = jnp.asarray([0.0, 0.5, 1.0 - 1e-7, 0.9999999])
    tok = np.asarray(inverse_cdf(jnp.asarray(x), u))
    assert set(tok.tolist()) <= {5, 130, 299}
    assert tok[0] == 5 and tok[2] == 299
    one = np.full((1, v), -np.inf, np.float32)
    one[0, 77] = 3.0
    assert int(inverse_cdf(jnp.asarray(one), jnp.asarray([0.999]))[0]) == 77


@pytest.mark.parametrize("v,k", [(12, 5), (300, 7), (1000, 50), (1000, 999), (4096, 1)])
def test_topk_threshold_equals_sort(v, k):
    from prs_jax.tree.sampling import topk_threshold

    x = jax.random.normal(jax.random.key(v + k), (6, v)) * 3
    x = x.at[0, :v // 2].set(-jnp.inf)  # removed tokens (penalties, earlier truncation)
    got = np.asarray(topk_threshold(x, k))[:, 0]
    ref = np.sort(np.asarray(x), axis=-1)[:, ::-1][:, k - 1]
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[finite], ref[finite])
