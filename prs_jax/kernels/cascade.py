"""Cascade (shared-prefix) attention: attention over a prefix shared by a group of sibling rows, merged exactly
with attention over each row's own suffix by log-sum-exp.

Shapes (G groups of n sibling rows, R = G * n rows, T new tokens per row, H query heads, K kv heads, D dims):

    q_gnthd         [G, n, T, H, D]     queries of the new tokens
    prefix_k/v      [G, K, P, D]        one copy of the shared context per group
    prefix_mask_gp  [G, P]              valid prefix slots (ragged prefix lengths)
    suffix_k/v      [R, K, S, D]        each row's own tokens (rows of group g are g*n .. g*n+n-1)
    suffix_mask_rts [R, T, S]           causal + validity mask of the suffix slots per query

The prefix part batches the queries of all n siblings (and of the H/K query heads sharing a kv head) against
one prefix: a [n*T*H/K, D] x [D, P] matrix product per (group, kv head) instead of n matrix-vector products
over n copies of the prefix. Both parts return normalised outputs and log-sum-exps; the merge
    lse = logaddexp(lse1, lse2);  o = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)
is exact. A part that sees no valid key has lse = -inf and weight 0.

`prefix_attention_reference` is the pure-JAX definition; `prefix_attention_pallas` is a Pallas kernel (online
softmax over prefix blocks) verified against it in interpret mode. `cascade_attention` dispatches.

Multi-level (an optional outer level, `Outer`): S outer prefixes [S, K, P0, D] (e.g. a prompt), each shared by up
to F groups (e.g. the prompt's drafts), whose own prefixes then hold only what follows the outer one. Group g
belongs to outer prefix `group[g]` at slot `slot[g]` < F. The queries of all rows of an outer prefix's groups
form one [F*n*T*H/K, D] matrix per (outer prefix, kv head), so the outer keys are read once for all of them; the
three parts (outer, group prefix, own suffix) merge exactly by log-sum-exp. Slots no group fills compute on
zero queries and are never read back.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG_INF = float("-inf")


def attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax attention returning (out [..., M, D] float32, lse [..., M] float32); q is pre-scaled.

    q [..., M, D], k/v [..., S, D], mask broadcastable to [..., M, S]. Rows with no valid key give out = 0 and
    lse = -inf.
    """
    s = jnp.einsum("...md,...sd->...ms", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s, NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m_safe)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("...ms,...sd->...md", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = jnp.where(l > 0, out / jnp.where(l > 0, l, 1.0), 0.0)
    lse = jnp.where(l[..., 0] > 0, m_safe[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), NEG_INF)
    return out, lse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Outer:
    """The outer cascade level of one layer: k/v [S, K, P0, D], mask [S, P0] (valid slots), and for each group its
    outer prefix `group` [G] int32 and its slot `slot` [G] int32 among that prefix's `fanout` (static) groups
    (pairs (group[g], slot[g]) distinct; group[g] = S: group g has no outer part)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    group: jax.Array
    slot: jax.Array
    fanout: int = dataclasses.field(metadata=dict(static=True))


def merge_partials_lse(parts: list[tuple[jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array]:
    """Exact merge of normalised partial attentions [(o [..., D], lse [...]), ...]; returns (o, lse)."""
    lse = functools.reduce(jnp.logaddexp, [l for _, l in parts])
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(o * jnp.where(jnp.isfinite(l), jnp.exp(l - lse_safe), 0.0)[..., None] for o, l in parts)
    return out, lse


def merge_partials(o1: jax.Array, lse1: jax.Array, o2: jax.Array, lse2: jax.Array) -> jax.Array:
    """Exact merge of two normalised partial attentions by their log-sum-exps."""
    lse = jnp.logaddexp(lse1, lse2)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    w1 = jnp.where(jnp.isfinite(lse1), jnp.exp(lse1 - lse_safe), 0.0)
    w2 = jnp.where(jnp.isfinite(lse2), jnp.exp(lse2 - lse_safe), 0.0)
    return o1 * w1[..., None] + o2 * w2[..., None]


def prefix_attention_reference(q_gkmd: jax.Array, k_gkpd: jax.Array, v_gkpd: jax.Array, mask_gp: jax.Array
                               ) -> tuple[jax.Array, jax.Array]:
    """Prefix part, pure JAX: q [G, K, M, D] (pre-scaled) against the group's prefix [G, K, P, D]."""
    return attention_with_lse(q_gkmd, k_gkpd, v_gkpd, mask_gp[:, None, None, :])


def _prefix_kernel(q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, block_p: int, num_blocks: int):
    q = q_ref[0, 0].astype(jnp.float32)  # [M, D]
    m_rows = q.shape[0]

    def body(i, carry):
        m_prev, l_prev, acc = carry
        start = pl.multiple_of(i * block_p, block_p)
        k = k_ref[0, 0, pl.ds(start, block_p), :].astype(jnp.float32)  # [bp, D]
        v = v_ref[0, 0, pl.ds(start, block_p), :].astype(jnp.float32)
        valid = mask_ref[0, pl.ds(start, block_p)] != 0  # [bp]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [M, bp]
        s = jnp.where(valid[None, :], s, NEG_INF)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.where(jnp.isfinite(m_prev), jnp.exp(m_prev - m_safe), 0.0)
        p = jnp.exp(s - m_safe[:, None])
        l_new = alpha * l_prev + jnp.sum(p, axis=-1)
        acc = acc * alpha[:, None] + jnp.dot(p, v, preferred_element_type=jnp.float32)
        return m_new, l_new, acc

    init = (jnp.full((m_rows,), NEG_INF, jnp.float32), jnp.zeros((m_rows,), jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    has = l > 0
    o_ref[0, 0] = jnp.where(has[:, None], acc / jnp.where(has, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[0, 0] = jnp.where(has, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(has, l, 1.0)), NEG_INF)


@functools.partial(jax.jit, static_argnames=("block_p", "interpret"))
def prefix_attention_pallas(q_gkmd: jax.Array, k_gkpd: jax.Array, v_gkpd: jax.Array, mask_gp: jax.Array, *,
                            block_p: int = 128, interpret: bool | object = False) -> tuple[jax.Array, jax.Array]:
    """Prefix part as a Pallas kernel: one program per (group, kv head), online softmax over prefix blocks.

    P is padded up to a multiple of `block_p` (padding masked). `interpret` is passed to `pallas_call`
    (True on CPU; `pltpu.InterpretParams()` for TPU-semantics checks).
    """
    g, kh, m_rows, d = q_gkmd.shape
    p_len = k_gkpd.shape[2]
    block_p = min(block_p, max(8, 1 << (p_len - 1).bit_length()))
    pad = (-p_len) % block_p
    if pad:
        k_gkpd = jnp.pad(k_gkpd, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v_gkpd = jnp.pad(v_gkpd, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask_gp = jnp.pad(mask_gp, ((0, 0), (0, pad)))
    p_pad = p_len + pad
    kernel = functools.partial(_prefix_kernel, block_p=block_p, num_blocks=p_pad // block_p)
    o, lse = pl.pallas_call(
        kernel,
        grid=(g, kh),
        in_specs=[
            pl.BlockSpec((1, 1, m_rows, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((1, 1, p_pad, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((1, 1, p_pad, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((1, p_pad), lambda i, j: (i, 0)),
        ],
        out_specs=[
            pl.BlockSpec((1, 1, m_rows, d), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec((1, 1, m_rows), lambda i, j: (i, j, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((g, kh, m_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((g, kh, m_rows), jnp.float32)],
        interpret=interpret,
    )(q_gkmd, k_gkpd, v_gkpd, mask_gp.astype(jnp.int32))
    return o, lse


# Backends on which the Pallas kernel has been verified against the reference on real hardware. Only these
# make it the default ("auto"); elsewhere it runs only when asked for (impl="pallas").
VERIFIED_BACKENDS: frozenset[str] = frozenset()


def use_pallas_default() -> bool:
    """Whether "auto" picks the Pallas kernel: only on a backend where it has been verified (none yet)."""
    return jax.default_backend() in VERIFIED_BACKENDS


QUERY_BLOCK = 512  # queries per attention block (cascade and plain attention): long inputs never hold
# [rows, heads, T, keys] scores at once


def cascade_attention(q_gnthd: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask_gp: jax.Array,
                      suffix_k: jax.Array, suffix_v: jax.Array, suffix_mask_rts: jax.Array, *,
                      impl: str = "reference", q_block: int | None = QUERY_BLOCK, outer: Outer | None = None
                      ) -> jax.Array:
    """Attention of each row's new tokens over ([outer prefix ++] group prefix ++ own suffix); returns
    [G, n, T, H, D]. `outer`: the optional outer level (see the module docstring).

    impl: "reference" (pure JAX) or "pallas" (prefix part as a Pallas kernel; interpret mode on CPU).
    With more than `q_block` new tokens per row (a long prefill) the queries run in equal blocks of at most
    `q_block` (lax.map, each block rematerialised in the backward pass): the scores held at once are
    [rows, heads, block, P + S] instead of [rows, heads, T, P + S]; every query's result is the same
    computation. None or 0: one block.
    """
    t = q_gnthd.shape[2]
    if not q_block or t <= q_block:
        return _cascade_block(q_gnthd, prefix_k, prefix_v, prefix_mask_gp, suffix_k, suffix_v, suffix_mask_rts,
                              impl, outer)
    g, n, _, h, d = q_gnthd.shape
    nb = -(-t // q_block)
    per = -(-t // nb)
    block = -(-per // 8) * 8  # equal blocks, a multiple of 8
    pad = nb * block - t
    q = jnp.pad(q_gnthd, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0)))
    q = q.reshape(g, n, nb, block, h, d).transpose(2, 0, 1, 3, 4, 5)  # [nb, G, n, block, H, D]
    m = jnp.pad(suffix_mask_rts, ((0, 0), (0, pad), (0, 0)))
    m = m.reshape(g * n, nb, block, -1).swapaxes(0, 1)  # [nb, R, block, S]
    one = jax.checkpoint(lambda qm: _cascade_block(qm[0], prefix_k, prefix_v, prefix_mask_gp, suffix_k, suffix_v,
                                                   qm[1], impl, outer))
    out = jax.lax.map(one, (q, m))  # [nb, G, n, block, H, D]
    return out.transpose(1, 2, 0, 3, 4, 5).reshape(g, n, nb * block, h, d)[:, :, :t]


def _prefix_part(q_gkmd: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str
                 ) -> tuple[jax.Array, jax.Array]:
    if impl == "pallas":
        return prefix_attention_pallas(q_gkmd, k, v, mask, interpret=jax.default_backend() == "cpu")
    if impl == "reference":
        return prefix_attention_reference(q_gkmd, k, v, mask)
    raise ValueError(f"cascade_attention: impl must be 'reference' or 'pallas', got {impl!r}")


def _outer_part(q_pre: jax.Array, outer: Outer, impl: str) -> tuple[jax.Array, jax.Array]:
    """The outer level: q [G, K, M, D] placed at (group[g], slot[g]) of [S, F, K, M, D], one [F*M, D] query matrix
    per (outer prefix, kv head), then each group's part read back: (o [G, K, M, D], lse [G, K, M])."""
    g, kh, m, d = q_pre.shape
    s_n, f = outer.k.shape[0], outer.fanout
    q = jnp.zeros((s_n, f, kh, m, d), q_pre.dtype).at[outer.group, outer.slot].set(q_pre, mode="drop")
    q = q.transpose(0, 2, 1, 3, 4).reshape(s_n, kh, f * m, d)
    o, lse = _prefix_part(q, outer.k, outer.v, outer.mask, impl)
    # a group whose outer index is S (out of range) has no outer part: zeros with lse -inf (weight 0)
    o = o.reshape(s_n, kh, f, m, d).transpose(0, 2, 1, 3, 4).at[outer.group, outer.slot].get(mode="fill",
                                                                                                fill_value=0.0)
    lse = lse.reshape(s_n, kh, f, m).transpose(0, 2, 1, 3).at[outer.group, outer.slot].get(mode="fill",
                                                                                             fill_value=NEG_INF)
    return o, lse


def _cascade_block(q_gnthd: jax.Array, prefix_k: jax.Array, prefix_v: jax.Array, prefix_mask_gp: jax.Array,
                   suffix_k: jax.Array, suffix_v: jax.Array, suffix_mask_rts: jax.Array, impl: str,
                   outer: Outer | None = None) -> jax.Array:
    g, n, t, h, d = q_gnthd.shape
    kh = prefix_k.shape[1]
    gq = h // kh
    q = (q_gnthd.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q_gnthd.dtype)
    # prefix: all siblings' queries of one kv head form one [n*T*gq, D] matrix
    q_pre = q.reshape(g, n, t, kh, gq, d).transpose(0, 3, 1, 2, 4, 5).reshape(g, kh, n * t * gq, d)
    o1, lse1 = _prefix_part(q_pre, prefix_k, prefix_v, prefix_mask_gp, impl)
    if outer is not None:  # the outer level merges into the group-prefix part first
        o0, lse0 = _outer_part(q_pre, outer, impl)
        o1, lse1 = merge_partials_lse([(o0, lse0), (o1, lse1)])
    o1 = o1.reshape(g, kh, n, t, gq, d).transpose(0, 2, 3, 1, 4, 5)  # [G, n, T, K, gq, D]
    lse1 = lse1.reshape(g, kh, n, t, gq).transpose(0, 2, 3, 1, 4)
    # suffix: per row, [K, T*gq, D] against its own [K, S, D]
    q_suf = q.reshape(g * n, t, kh, gq, d).transpose(0, 2, 1, 3, 4).reshape(g * n, kh, t * gq, d)
    mask = jnp.repeat(suffix_mask_rts, gq, axis=1)[:, None]  # [R, 1, T*gq, S]
    o2, lse2 = attention_with_lse(q_suf, suffix_k, suffix_v, mask)
    o2 = o2.reshape(g, n, kh, t, gq, d).transpose(0, 1, 3, 2, 4, 5)
    lse2 = lse2.reshape(g, n, kh, t, gq).transpose(0, 1, 3, 2, 4)
    out = merge_partials(o1, lse1, o2, lse2)
    return out.reshape(g, n, t, h, d).astype(q_gnthd.dtype)
