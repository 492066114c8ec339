"""Paged KV: prefix attention read through block tables equals the dense reference (ragged lengths, GQA ratios,
page sizes; every page no table reaches is NaN, so a read out of bounds shows); page writes and copies."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from prs_jax.kernels.cascade import cascade_attention, prefix_attention_reference
from prs_jax.kernels.paged import copy_pages, gather_pages, paged_prefix_attention, write_slots


def _paged(rng, dense_gkpd, lengths, ps, spare):
    """Scatter dense prefixes [G, K, P, D] into a NaN-filled page pool [N, ps, K, D] at shuffled page ids; slots
    of a group's last page past its length stay NaN too. Returns (pool, table [G, nb])."""
    g, kh, p, d = dense_gkpd.shape
    nb = -(-p // ps)
    used = [-(-n // ps) for n in lengths]
    n_pages = sum(used) + spare
    ids = rng.permutation(n_pages)
    pool = np.full((n_pages, ps, kh, d), np.nan, np.float32)
    table = np.zeros((g, nb), np.int32)
    at = 0
    for gi, n in enumerate(lengths):
        for b in range(used[gi]):
            page = ids[at]
            at += 1
            table[gi, b] = page
            take = min(ps, n - b * ps)
            pool[page, :take] = dense_gkpd[gi, :, b * ps:b * ps + take].transpose(1, 0, 2)
        # table entries past the group's pages point at NaN pages that are never valid
        table[gi, used[gi]:] = ids[sum(used)]
    return pool, table


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_paged_prefix_attention_equals_dense(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    g, kh = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 2]))
    gq, ps = data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([1, 3, 4, 16]))
    m, d, p = data.draw(st.integers(1, 6)), 8, data.draw(st.integers(1, 40))
    lengths = [data.draw(st.integers(0, p)) for _ in range(g)]  # ragged, possibly empty
    spare = data.draw(st.integers(1, 3))  # a pool always has pages
    k = rng.normal(size=(g, kh, p, d)).astype(np.float32)
    v = rng.normal(size=(g, kh, p, d)).astype(np.float32)
    q = jnp.asarray(rng.normal(size=(g, kh, m * gq, d)), jnp.float32)
    mask = np.arange(p)[None, :] < np.asarray(lengths)[:, None]
    kpool, table = _paged(np.random.default_rng(1), k, lengths, ps, spare)
    vpool, _ = _paged(np.random.default_rng(1), v, lengths, ps, spare)
    o, lse = paged_prefix_attention(q, jnp.asarray(kpool), jnp.asarray(vpool), jnp.asarray(table),
                                    jnp.asarray(lengths, jnp.int32), p)
    o_ref, lse_ref = prefix_attention_reference(q, jnp.asarray(np.where(mask[:, None, :, None], k, 0)),
                                                jnp.asarray(v), jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(o)))
    np.testing.assert_array_equal(np.asarray(o), np.asarray(o_ref))  # same shapes, same values: bitwise
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(lse_ref))
    # and through the whole cascade (prefix read from pages, merged with a suffix by log-sum-exp)
    dense_k, gmask = gather_pages(jnp.asarray(kpool), jnp.asarray(table), jnp.asarray(lengths, jnp.int32), p)
    dense_v, _ = gather_pages(jnp.asarray(vpool), jnp.asarray(table), jnp.asarray(lengths, jnp.int32), p)
    np.testing.assert_array_equal(np.asarray(gmask), mask)
    np.testing.assert_array_equal(np.asarray(dense_k), np.where(mask[:, None, :, None], k, 0))
    n, t, s = 2, 1, 3
    qc = jnp.asarray(rng.normal(size=(g, n, t, kh * gq, d)), jnp.float32)
    sk, sv = (jnp.asarray(rng.normal(size=(g * n, kh, s, d)), jnp.float32) for _ in range(2))
    smask = jnp.ones((g * n, t, s), bool)
    paged = cascade_attention(qc, dense_k, dense_v, gmask, sk, sv, smask)
    dense = cascade_attention(qc, jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), sk, sv, smask)
    np.testing.assert_allclose(np.asarray(paged), np.asarray(dense), atol=1e-6, rtol=1e-6)


def test_write_slots_and_copy_pages():
    n, ps, kh, d = 5, 4, 2, 3
    pool = jnp.zeros((1, 2, n, ps, kh, d))
    kv = jnp.arange(1 * 2 * 2 * 3 * kh * d, dtype=jnp.float32).reshape(1, 2, 2, 3, kh, d) + 1
    page = jnp.asarray([[1, 1, n], [3, 4, 4]], jnp.int32)  # n: dropped
    off = jnp.asarray([[2, 3, 0], [3, 0, 1]], jnp.int32)
    out = np.asarray(write_slots(pool, kv, page, off))
    np.testing.assert_array_equal(out[:, :, 1, 2], np.asarray(kv[:, :, 0, 0]))
    np.testing.assert_array_equal(out[:, :, 1, 3], np.asarray(kv[:, :, 0, 1]))
    np.testing.assert_array_equal(out[:, :, 3, 3], np.asarray(kv[:, :, 1, 0]))
    np.testing.assert_array_equal(out[:, :, 4, :2], np.asarray(kv[:, :, 1, 1:]))
    assert out[:, :, [0, 2]].sum() == 0 and out[:, :, 1, :2].sum() == 0  # the dropped slot wrote nothing
    copied = np.asarray(copy_pages(jnp.asarray(out), jnp.asarray([1, 4], jnp.int32), jnp.asarray([2, n], jnp.int32)))
    np.testing.assert_array_equal(copied[:, :, 2], out[:, :, 1])
    np.testing.assert_array_equal(np.delete(copied, 2, axis=2), np.delete(out, 2, axis=2))
