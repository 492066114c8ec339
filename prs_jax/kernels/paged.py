"""Paged KV, pure JAX: read a prefix through block tables, write new tokens' KV into pages, copy pages.

A pool holds fixed-size pages of KV for every layer:

    pool            [L, 2, N, ps, K, D]   layers, (k, v), N pages of ps token slots, K kv heads, D dims
    table_gb        [G, nb] int32          page ids of group g's context, in position order (slot s of the
                                           context is page table_gb[g, s // ps], offset s % ps)
    length_g        [G] int32              valid context slots of group g

Page ids past a group's length may be anything in range (they are read and masked). Reads zero every slot at
or past the group's length, so a stale or NaN-filled page behind the mask never reaches an attention sum.
Writes take page ids that may equal N ("no write"): `mode="drop"` discards them, so a batch of rows with
different lengths writes in one scatter.

`paged_prefix_attention` is the prefix part of cascade attention read through block tables; it equals
`cascade.prefix_attention_reference` over the dense prefix the tables describe (tests/kernels/test_paged.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prs_jax.kernels.cascade import prefix_attention_reference


def gather_pages(pages_nskd: jax.Array, table_gb: jax.Array, length_g: jax.Array, size: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Dense context [..., G, K, size, D] and its mask [G, size] from pages [..., N, ps, K, D] by block table.

    Leading axes (layers, k/v) are carried through. Needs table_gb.shape[1] * ps >= size."""
    ps = pages_nskd.shape[-3]
    g, nb = table_gb.shape
    if nb * ps < size:
        raise ValueError(f"gather_pages: a block table of {nb} pages x {ps} slots cannot cover {size} slots.")
    lead = pages_nskd.shape[:-4]
    k, d = pages_nskd.shape[-2:]
    got = jnp.take(pages_nskd, table_gb, axis=len(lead), mode="clip")  # [..., G, nb, ps, K, D]
    got = got.reshape(*lead, g, nb * ps, k, d)[..., :size, :, :]
    dense = jnp.swapaxes(got, -3, -2)  # [..., G, K, size, D]
    mask = jnp.arange(size, dtype=jnp.int32)[None, :] < length_g[:, None]
    return jnp.where(mask[:, None, :, None], dense, jnp.zeros((), dense.dtype)), mask


def write_slots(pool: jax.Array, kv_lrtkd: jax.Array, page_rt: jax.Array, offset_rt: jax.Array) -> jax.Array:
    """pool [L, 2, N, ps, K, D] with slot t of row r of kv [L, 2, R, T, K, D] written at (page_rt[r, t],
    offset_rt[r, t]); page id N drops the write. Destinations must be distinct (or dropped)."""
    return pool.at[:, :, page_rt, offset_rt].set(kv_lrtkd.astype(pool.dtype), mode="drop")


def copy_pages(pool: jax.Array, src_c: jax.Array, dst_c: jax.Array) -> jax.Array:
    """pool with page dst_c[i] := page src_c[i] (all layers); dst id N drops the copy."""
    return pool.at[:, :, dst_c].set(jnp.take(pool, src_c, axis=2, mode="clip"), mode="drop")


def paged_prefix_attention(q_gkmd: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table_gb: jax.Array,
                           length_g: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    """Prefix part of cascade attention read through block tables: q [G, K, M, D] (pre-scaled) against the
    first length_g[g] slots of group g's pages (k/v pages [N, ps, K, D]); returns (out, lse) as
    `prefix_attention_reference`. `size` (static) is the padded prefix length the gather materialises."""
    k, mask = gather_pages(k_pages, table_gb, length_g, size)
    v, _ = gather_pages(v_pages, table_gb, length_g, size)
    return prefix_attention_reference(q_gkmd, k, v, mask)
