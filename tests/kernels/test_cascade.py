"""Cascade attention: exact equality with plain attention over the concatenated context; Pallas prefix kernel
against its pure-JAX reference in interpret mode (CPU semantics and TPU semantics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prs_jax.kernels.cascade import (
    attention_with_lse, cascade_attention, merge_partials, prefix_attention_pallas, prefix_attention_reference,
)


def _plain(q, k, v, mask):
    """Independent reference: masked softmax attention in float64 NumPy."""
    s = np.einsum("md,sd->ms", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    return np.where(den > 0, p @ v / np.where(den > 0, den, 1), 0)


def _case(rng, g, n, t, kh, gq, d, p, s, prefix_lens, suffix_lens):
    h = kh * gq
    q = rng.normal(size=(g, n, t, h, d)).astype(np.float32)
    pk, pv = (rng.normal(size=(g, kh, p, d)).astype(np.float32) for _ in range(2))
    sk, sv = (rng.normal(size=(g * n, kh, s, d)).astype(np.float32) for _ in range(2))
    pmask = np.arange(p)[None, :] < np.asarray(prefix_lens)[:, None]
    # row r holds suffix_lens[r] earlier tokens, then its t new tokens (slots after them)
    qslot = np.asarray(suffix_lens)[:, None] + np.arange(t)[None, :]
    smask = np.arange(s)[None, None, :] <= qslot[:, :, None]
    return q, pk, pv, pmask, sk, sv, smask


def _check(q, pk, pv, pmask, sk, sv, smask, impl):
    g, n, t, h, d = q.shape
    kh = pk.shape[1]
    out = np.asarray(cascade_attention(*map(jnp.asarray, (q, pk, pv, pmask, sk, sv, smask)), impl=impl))
    for gi in range(g):
        for i in range(n):
            r = gi * n + i
            for hh in range(h):
                kv = hh // (h // kh)
                k = np.concatenate([pk[gi, kv], sk[r, kv]]).astype(np.float64)
                v = np.concatenate([pv[gi, kv], sv[r, kv]]).astype(np.float64)
                m = np.concatenate([np.broadcast_to(pmask[gi], (t, pmask.shape[1])), smask[r]], axis=1)
                np.testing.assert_allclose(out[gi, i, :, hh], _plain(q[gi, i, :, hh].astype(np.float64), k, v, m),
                                           atol=2e-5, rtol=1e-5)


@settings(max_examples=12, deadline=None)
@given(st.data())
def test_cascade_equals_plain_attention(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    g, n, t = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    kh, gq = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2, 4]))
    p, s = data.draw(st.integers(1, 20)), data.draw(st.integers(t, t + 6))
    prefix_lens = [data.draw(st.integers(0, p)) for _ in range(g)]  # ragged, possibly empty prefixes
    suffix_lens = [data.draw(st.integers(0, s - t)) for _ in range(g * n)]
    case = _case(rng, g, n, t, kh, gq, 8, p, s, prefix_lens, suffix_lens)
    _check(*case, impl="reference")


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_pallas_prefix_kernel_matches_reference_interpret(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    g, kh = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2))
    m, p, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 70)), data.draw(st.sampled_from([8, 16]))
    block_p = data.draw(st.sampled_from([8, 16, 32]))
    q = jnp.asarray(rng.normal(size=(g, kh, m, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(g, kh, p, d)), jnp.float32) for _ in range(2))
    lens = np.array([data.draw(st.integers(0, p)) for _ in range(g)])
    mask = jnp.asarray(np.arange(p)[None, :] < lens[:, None])
    o_ref, lse_ref = prefix_attention_reference(q, k, v, mask)
    o, lse = prefix_attention_pallas(q, k, v, mask, block_p=block_p, interpret=True)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), np.isfinite(np.asarray(lse_ref)))
    fin = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse_ref)[fin], atol=1e-5, rtol=1e-5)


def test_cascade_with_pallas_impl_equals_plain():
    rng = np.random.default_rng(7)
    case = _case(rng, g=2, n=3, t=2, kh=2, gq=2, d=8, p=13, s=5, prefix_lens=[13, 4], suffix_lens=[0, 1, 2, 3, 1, 0])
    _check(*case, impl="pallas")


def test_pallas_prefix_kernel_tpu_interpret_mode():
    """TPU semantics (out-of-bounds reads raise, uninitialised memory is NaN, race detection) on tiny shapes."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 1, 8, 128)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 1, 16, 128)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([[16], [5]]))
    o_ref, lse_ref = prefix_attention_reference(q, k, v, mask)
    o, lse = prefix_attention_pallas(q, k, v, mask, block_p=8,
                                     interpret=pltpu.InterpretParams(detect_races=True))
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), atol=1e-5, rtol=1e-5)


def test_merge_handles_empty_parts():
    q = jnp.ones((1, 2, 4))
    k = v = jnp.ones((1, 3, 4))
    none = jnp.zeros((1, 2, 3), bool)
    o1, l1 = attention_with_lse(q, k, v, none)
    assert np.isneginf(np.asarray(l1)).all() and not np.isnan(np.asarray(o1)).any()
    o2, l2 = attention_with_lse(q, k, v * 2, ~none)
    np.testing.assert_allclose(np.asarray(merge_partials(o1, l1, o2, l2)), np.asarray(o2))
    assert not np.isnan(np.asarray(merge_partials(o1, l1, o1, l1))).any()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the GPU kernel only where a GPU is present")
def test_pallas_prefix_kernel_compiled_on_gpu():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(2, 2, 16, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 2, 256, 64)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(256)[None, :] < np.array([[256], [77]]))
    o, _ = prefix_attention_pallas(q, k, v, mask, interpret=False)
    o_ref, _ = prefix_attention_reference(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-3, rtol=2e-3)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_query_blocks_equal_one_block_values_and_gradients(data):
    """Long prefills run their queries in blocks (no [rows, heads, T, keys] scores at once): the same outputs
    and gradients as one block, for ragged prefixes and suffixes and a T that the blocks do not divide."""
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    g, n, t = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.integers(9, 41))
    kh, gq, d, p = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2])), 8, 12
    s = t + 3
    args = _case(rng, g, n, t, kh, gq, d, p, s, rng.integers(0, p + 1, size=g), rng.integers(0, 4, size=g * n))
    args = tuple(map(jnp.asarray, args))
    q_block = data.draw(st.sampled_from([8, 16]))
    # jitted: op-by-op dispatch of the block loop and its gradient is 4x slower than compiling it
    attend = jax.jit(cascade_attention, static_argnames="q_block")
    one = attend(*args, q_block=None)
    blocked = attend(*args, q_block=q_block)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(one), atol=2e-6, rtol=1e-6)

    def loss(q, pk, sv, qb):
        out = cascade_attention(q, pk, args[2], args[3], args[4], sv, args[6], q_block=qb)
        return jnp.sum(jnp.sin(out))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    g_one = grads(args[0], args[1], args[5], None)
    g_blk = grads(args[0], args[1], args[5], q_block)
    for a, b in zip(g_blk, g_one):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_query_blocks_bound_the_prefill_scores_buffer():
    """The compiled cascade attention of a long prefill (the tree engine's add_prompts) holds
    [rows, heads, block, keys] scores, not [rows, heads, T, keys]."""
    rng = np.random.default_rng(0)
    t, p = 1024, 16
    args = tuple(map(jnp.asarray, _case(rng, 2, 1, t, 2, 2, 16, p, t, [p, 5], [0, 0])))

    def temp_bytes(q_block):
        fn = jax.jit(lambda *a: cascade_attention(*a, q_block=q_block))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    full_scores = 2 * 4 * t * t * 4  # rows x heads x T x suffix keys, float32
    dense, blocked = temp_bytes(None), temp_bytes(128)
    assert dense >= full_scores
    assert blocked < full_scores / 2 and dense / blocked > 4


# ----------------------------------------------------------------------------------- multi-level (outer level)

def _outer_case(data, rng):
    """G groups of n rows; S outer prefixes of up to F groups each (a group may have none: index S)."""
    g, n, t = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    kh, gq = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([1, 2, 3]))
    s_n, f = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    slots = [(a, b) for a in range(s_n) for b in range(f)]
    order = rng.permutation(len(slots))
    group, slot = [], []
    for gi in range(g):  # distinct (outer, slot) pairs; groups beyond the slots, or drawn so, have no outer part
        if gi < len(slots) and data.draw(st.booleans()) | (gi == 0):
            a, b = slots[order[gi]]
        else:
            a, b = s_n, 0
        group.append(a)
        slot.append(b)
    p0, p, s = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)), data.draw(st.integers(t, t + 4))
    q, pk, pv, pmask, sk, sv, smask = _case(rng, g, n, t, kh, gq, 8, p, s,
                                            [data.draw(st.integers(0, p)) for _ in range(g)],
                                            [data.draw(st.integers(0, s - t)) for _ in range(g * n)])
    ok, ov = (rng.normal(size=(s_n, kh, p0, 8)).astype(np.float32) for _ in range(2))
    omask = np.arange(p0)[None, :] < np.asarray([data.draw(st.integers(0, p0)) for _ in range(s_n)])[:, None]
    # masked outer slots must not count (finite garbage: the paged gather zeroes them before any attention)
    ok[~np.broadcast_to(omask[:, None, :, None], ok.shape)] = 1e3
    ov[~np.broadcast_to(omask[:, None, :, None], ov.shape)] = -1e3
    return (q, pk, pv, pmask, sk, sv, smask), (ok, ov, omask, np.asarray(group, np.int32), np.asarray(slot, np.int32),
                                               f)


def _check_outer(base, outer, impl):
    from prs_jax.kernels.cascade import Outer

    q, pk, pv, pmask, sk, sv, smask = base
    ok, ov, omask, group, slot, f = outer
    g, n, t, h, d = q.shape
    kh = pk.shape[1]
    lvl = Outer(k=jnp.asarray(ok), v=jnp.asarray(ov), mask=jnp.asarray(omask), group=jnp.asarray(group),
                slot=jnp.asarray(slot), fanout=f)
    out = np.asarray(cascade_attention(*map(jnp.asarray, base), impl=impl, outer=lvl))
    s_n = ok.shape[0]
    for gi in range(g):
        o = group[gi]
        for i in range(n):
            r = gi * n + i
            for hh in range(h):
                kv = hh // (h // kh)
                parts_k, parts_v, parts_m = [], [], []
                if o < s_n:
                    parts_k.append(ok[o, kv])
                    parts_v.append(ov[o, kv])
                    parts_m.append(np.broadcast_to(omask[o], (t, omask.shape[1])))
                parts_k += [pk[gi, kv], sk[r, kv]]
                parts_v += [pv[gi, kv], sv[r, kv]]
                parts_m += [np.broadcast_to(pmask[gi], (t, pmask.shape[1])), smask[r]]
                ref = _plain(q[gi, i, :, hh].astype(np.float64), np.concatenate(parts_k).astype(np.float64),
                             np.concatenate(parts_v).astype(np.float64), np.concatenate(parts_m, axis=1))
                np.testing.assert_allclose(out[gi, i, :, hh], ref, atol=2e-5, rtol=1e-5)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_outer_level_equals_plain_attention_over_all_three_parts(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    base, outer = _outer_case(data, rng)
    _check_outer(base, outer, "reference")


@settings(max_examples=3, deadline=None)
@given(st.data())
def test_outer_level_with_the_pallas_prefix_kernel_interpret(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    base, outer = _outer_case(data, rng)
    _check_outer(base, outer, "pallas")


def test_outer_level_ignores_unfilled_slots_and_absent_groups():
    """Changing an outer prefix no group uses, or a fanout slot no group fills, changes nothing."""
    from prs_jax.kernels.cascade import Outer

    rng = np.random.default_rng(3)
    base = _case(rng, 2, 2, 2, 1, 2, 8, 5, 4, [3, 5], [0, 1, 2, 0])
    ok, ov = (rng.normal(size=(3, 1, 6, 8)).astype(np.float32) for _ in range(2))
    omask = np.ones((3, 6), bool)

    def run(k):
        lvl = Outer(k=jnp.asarray(k), v=jnp.asarray(ov), mask=jnp.asarray(omask),
                    group=jnp.asarray([0, 3], jnp.int32), slot=jnp.asarray([1, 0], jnp.int32), fanout=2)
        return np.asarray(cascade_attention(*map(jnp.asarray, base), outer=lvl))

    k2 = ok.copy()
    k2[1:] = 1e3  # outer prefixes 1 and 2 serve no group
    np.testing.assert_array_equal(run(ok), run(k2))
