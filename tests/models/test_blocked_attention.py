"""Attention blocked over queries equals dense attention (values and gradients), and bounds the scores held."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import load_causal_lm
from prs_jax.models.layers import _dense_attention, attention


def _inputs(seed, b, t, s, h, kvh, d, left_pad):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, kvh, s, d)), jnp.float32)
    valid = np.ones((b, s), bool)
    for i, p in enumerate(left_pad):
        valid[i, :p] = False  # ragged rows: left padding
    slot = np.arange(s)[None, :] <= (s - t + np.arange(t))[:, None]  # queries are the last t slots, causal
    mask = jnp.asarray(valid[:, None, :] & slot[None])
    return q, k, v, mask


@pytest.mark.parametrize("t,s,q_block,h,kvh", [(37, 37, 8, 4, 2), (64, 80, 16, 6, 3), (9, 9, 4, 2, 1),
                                               (130, 130, 64, 4, 4)])
def test_blocked_equals_dense_values_and_gradients(t, s, q_block, h, kvh):
    q, k, v, mask = _inputs(t, 3, t, s, h, kvh, 16, left_pad=[0, 5, s - 2])
    dense = _dense_attention(q, k, v, mask)
    blocked = jax.jit(lambda *a: attention(*a, q_block=q_block))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(dense), atol=1e-5, rtol=1e-5)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)))

    g_dense = jax.grad(lambda *a: loss(_dense_attention, *a), argnums=(0, 1, 2))(q, k, v)
    g_blocked = jax.jit(jax.grad(lambda *a: loss(lambda *x: attention(*x, q_block=q_block), *a),
                                 argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blocked, g_dense):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_blocking_bounds_the_scores_buffer():
    """The compiled forward of a long prefill holds [B, H, block, S] scores, not [B, H, T, S]."""
    q, k, v, mask = _inputs(0, 2, 1024, 1024, 4, 4, 16, left_pad=[0, 0])

    def temp_bytes(q_block):
        fn = jax.jit(lambda *a: attention(*a, q_block=q_block))
        return fn.lower(q, k, v, mask).compile().memory_analysis().temp_size_in_bytes

    full_scores = 2 * 4 * 1024 * 1024 * 4
    dense, blocked = temp_bytes(None), temp_bytes(128)
    assert dense >= full_scores  # scores (and probabilities) for all 1024 queries
    assert blocked < full_scores / 2 and dense / blocked > 4  # measured 67 MB vs 11.5 MB


def test_model_forward_blocked_equals_unblocked(llama_dir, monkeypatch):
    """A whole model forward longer than the block gives the same logits as one dense block."""
    import prs_jax.models.layers as layers

    model = load_causal_lm(llama_dir)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 70)))
    mask = jnp.ones(ids.shape, bool).at[1, :9].set(False)
    dense, _ = model(ids, attention_mask=mask)
    monkeypatch.setattr(layers, "QUERY_BLOCK", 16)
    monkeypatch.setattr(layers.attention, "__kwdefaults__", {"q_block": 16})
    blocked, _ = model(ids, attention_mask=mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], atol=1e-4, rtol=1e-4)
