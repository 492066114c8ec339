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
`impl="pallas"` runs `paged_prefix_attention_pallas`, a Pallas kernel that reads the pages in place through the
block table (scalar prefetch, `pltpu.PrefetchScalarGridSpec`: a TPU-style kernel; the Triton GPU backend has
no scalar prefetch) instead of gathering a dense prefix. It is verified against the reference in interpret mode
on CPU only (plain and TPU-semantics interpretation); no backend uses it unless asked for
(`PAGED_VERIFIED_BACKENDS` is empty, so `use_paged_pallas_default()` is False everywhere).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from prs_jax.kernels.cascade import NEG_INF, prefix_attention_reference


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
                           length_g: jax.Array, size: int, *, impl: str = "reference"
                           ) -> tuple[jax.Array, jax.Array]:
    """Prefix part of cascade attention read through block tables: q [G, K, M, D] (pre-scaled) against the
    first length_g[g] slots of group g's pages (k/v pages [N, ps, K, D]); returns (out, lse) as
    `prefix_attention_reference`. `size` (static) is the padded prefix length the gather materialises.

    impl: "reference" (gather + pure JAX, the default) or "pallas" (`paged_prefix_attention_pallas`; interpret
    mode on CPU)."""
    if impl == "pallas":
        return paged_prefix_attention_pallas(q_gkmd, k_pages, v_pages, table_gb, length_g, size,
                                             interpret=jax.default_backend() == "cpu")
    if impl != "reference":
        raise ValueError(f"paged_prefix_attention: impl must be 'reference' or 'pallas', got {impl!r}")
    k, mask = gather_pages(k_pages, table_gb, length_g, size)
    v, _ = gather_pages(v_pages, table_gb, length_g, size)
    return prefix_attention_reference(q_gkmd, k, v, mask)


# Backends on which `paged_prefix_attention_pallas` has been verified against the reference on real hardware.
# Only these may make it a default; elsewhere it runs only when asked for (impl="pallas").
PAGED_VERIFIED_BACKENDS: frozenset[str] = frozenset()


def use_paged_pallas_default() -> bool:
    """Whether "auto" may pick the paged Pallas kernel: only on a backend where it is verified (none yet)."""
    return jax.default_backend() in PAGED_VERIFIED_BACKENDS


def _paged_kernel(table_ref, len_ref, q_ref, *refs, ps: int, pages_per_step: int, kv_heads: int):
    """One grid step (g, b): `pages_per_step` pages of group g's context, all kv heads, online softmax."""
    k_refs, v_refs = refs[:pages_per_step], refs[pages_per_step:2 * pages_per_step]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_step:]
    del table_ref  # only the index maps read the table
    g, b = pl.program_id(0), pl.program_id(1)
    length = len_ref[g]
    first = b * (pages_per_step * ps)

    @pl.when(b == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    # steps wholly past the length do no work (their index maps re-point at the last valid page, so no new
    # page is fetched either)
    @pl.when(first < length)
    def _step():
        for j in range(pages_per_step):
            pos = first + j * ps + jax.lax.broadcasted_iota(jnp.int32, (1, ps), 1)
            valid = pos < length  # [1, ps]: every slot at/after the length is masked, whatever the page holds
            for h in range(kv_heads):
                q = q_ref[0, h].astype(jnp.float32)  # [M, D]
                k = k_refs[j][:, h, :].astype(jnp.float32)  # [ps, D]
                v = v_refs[j][:, h, :].astype(jnp.float32)
                v = jnp.where(valid.reshape(ps, 1), v, 0.0)  # 0 * NaN would leak through p @ v
                s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                s = jnp.where(valid, s, NEG_INF)  # [M, ps]
                m_prev, l_prev = m_sc[h], l_sc[h]  # [M]
                m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                alpha = jnp.where(jnp.isfinite(m_prev), jnp.exp(m_prev - m_safe), 0.0)
                p = jnp.exp(s - m_safe[:, None])
                l_sc[h] = alpha * l_prev + jnp.sum(p, axis=-1)
                m_sc[h] = m_new
                acc_sc[h] = acc_sc[h] * alpha[:, None] + jnp.dot(p, v, preferred_element_type=jnp.float32)

    @pl.when(b == pl.num_programs(1) - 1)
    def _finish():
        m, l = m_sc[...], l_sc[...]
        has = l > 0
        o_ref[0] = jnp.where(has[..., None], acc_sc[...] / jnp.where(has, l, 1.0)[..., None], 0.0
                             ).astype(o_ref.dtype)
        lse_ref[0] = jnp.where(has, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(has, l, 1.0)), NEG_INF)


@functools.partial(jax.jit, static_argnames=("size", "pages_per_step", "interpret"))
def paged_prefix_attention_pallas(q_gkmd: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table_gb: jax.Array,
                                  length_g: jax.Array, size: int, *, pages_per_step: int = 1,
                                  interpret: bool | object = False) -> tuple[jax.Array, jax.Array]:
    """`paged_prefix_attention` as a Pallas kernel that reads K/V pages in place through the block table.

    Grid (G, page steps); the block table and lengths are scalar-prefetched and each step's index map picks
    `pages_per_step` pages [ps, K, D] of the pool by table entry. Online softmax (running max and sum in
    scratch) over the steps; all K kv heads of a page in one step, each against its M query rows. Slots at or
    past min(length_g, size) are masked and table entries past a group's last valid page are never read (the
    index map clamps to that page; ids are clipped into [0, N)), so garbage there cannot leak. Returns (out
    [G, K, M, D] float32, lse [G, K, M] float32): out 0 and lse -inf for an empty prefix, as the reference.
    `interpret` is passed to `pallas_call` (True on CPU; `pltpu.InterpretParams()` for TPU semantics).
    """
    from jax.experimental.pallas import tpu as pltpu  # only when the kernel is built: the engine imports paged

    g, kh, m_rows, d = q_gkmd.shape
    n_pages, ps = k_pages.shape[:2]
    if k_pages.shape != (n_pages, ps, kh, d) or v_pages.shape != k_pages.shape:
        raise ValueError(f"paged_prefix_attention_pallas: k/v pages must be [N, ps, K={kh}, D={d}] like q's "
                         f"[G, K, M, D] = {q_gkmd.shape}; got k {k_pages.shape}, v {v_pages.shape}.")
    nb = table_gb.shape[1]
    if nb * ps < size:
        raise ValueError(f"paged_prefix_attention_pallas: a block table of {nb} pages x {ps} slots cannot cover "
                         f"{size} slots.")
    pps = max(1, pages_per_step)
    blocks = -(-size // ps)  # pages covering `size` slots
    steps = max(1, -(-blocks // pps))
    table = jnp.clip(table_gb.astype(jnp.int32), 0, n_pages - 1)
    cols = steps * pps
    table = table[:, :cols] if cols <= nb else jnp.pad(table, ((0, 0), (0, cols - nb)))
    length = jnp.clip(length_g.astype(jnp.int32), 0, size)

    def page_map(j):
        def index_map(gi, bi, table_ref, len_ref):
            last = jnp.maximum((len_ref[gi] + ps - 1) // ps - 1, 0)
            return table_ref[gi, jnp.minimum(bi * pps + j, last)], 0, 0, 0
        return pl.BlockSpec((pl.Squeezed(), ps, kh, d), index_map)

    page_specs = [page_map(j) for j in range(pps)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(g, steps),
        in_specs=[pl.BlockSpec((1, kh, m_rows, d), lambda gi, bi, t, n: (gi, 0, 0, 0)), *page_specs, *page_specs],
        out_specs=[pl.BlockSpec((1, kh, m_rows, d), lambda gi, bi, t, n: (gi, 0, 0, 0)),
                   pl.BlockSpec((1, kh, m_rows), lambda gi, bi, t, n: (gi, 0, 0))],
        scratch_shapes=[pltpu.VMEM((kh, m_rows), jnp.float32), pltpu.VMEM((kh, m_rows), jnp.float32),
                        pltpu.VMEM((kh, m_rows, d), jnp.float32)],
    )
    kernel = functools.partial(_paged_kernel, ps=ps, pages_per_step=pps, kv_heads=kh)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((g, kh, m_rows, d), jnp.float32),
                   jax.ShapeDtypeStruct((g, kh, m_rows), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(table, length, q_gkmd, *([k_pages] * pps), *([v_pages] * pps))
    return o, lse
