"""Per-token log-probs of target ids through the unembedding, without materialising [N, V] logits.

    logp[n] = (h[n] @ w)[t[n]] - logsumexp(h[n] @ w)

Two implementations of the same function:

- `token_logprobs_reference`: plain JAX (full logits, log_softmax, gather). The independent reference.
- `token_logprobs_pallas`: Pallas kernels wrapped in `jax.custom_vjp`.

Kernel layout (the idiom of jax.experimental.pallas.ops.gpu.attention, i.e. FlashAttention-2):

- Forward: grid over row blocks; inside the kernel a `fori_loop` over vocabulary blocks keeps an online
  log-sum-exp (running max m, running sum l) and picks the target logit from the block that holds it.
  It writes logp [N] and the LSE [N]; only a [block_rows, block_vocab] logits tile exists at a time.
- Backward, also in Pallas, recomputing each logits tile from the saved LSE:
  d logits = g * (onehot(target) - softmax) with softmax = exp(logits - lse).
  * d hidden: grid over row blocks, `fori_loop` over vocabulary blocks, dh += dlogits @ w_blk.T.
  * d w:      grid over vocabulary blocks, `fori_loop` over row blocks,  dw += h_blk.T @ dlogits.
  Every program owns its output block (no revisited outputs, no atomics), so the grid is fully parallel.
  Residuals are hidden, w, targets and the LSE [N]: nothing of size [N, V] is saved.

Ragged sizes: rows are padded with zeros to a multiple of block_rows (padded rows get a zero cotangent);
vocabulary columns are padded with zeros to a multiple of block_vocab and masked with -inf inside the kernels.
Padding the vocabulary copies w once per call: choose block_vocab dividing V to avoid it.

Targets must lie in [0, V) (put any valid id, e.g. 0, at positions that a mask drops later); an out-of-range
target picks no logit and yields -LSE. Inputs may be bf16; matmuls accumulate in float32 and the outputs are
float32.

Verified only in interpret mode on CPU (the default there). The full-width operand BlockSpecs (all of w for
the forward and dh kernels, all rows of h for the dw kernel) suit the GPU (Triton) lowering, which reads
slices from HBM; on TPU they would pull all of w into VMEM, so a TPU version needs the vocabulary as a grid
axis with accumulator outputs instead. The Triton backend also wants power-of-two block sizes and hidden
size. Neither accelerator has been run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

__all__ = ["token_logprobs_reference", "token_logprobs_pallas"]


def token_logprobs_reference(hidden_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array) -> jax.Array:
    """Plain JAX: log_softmax(hidden @ w)[target] as float32 [N] (materialises [N, V])."""
    logits_nv = jnp.dot(hidden_nd, w_dv, preferred_element_type=jnp.float32)
    logp_nv = jax.nn.log_softmax(logits_nv, axis=-1)
    return jnp.take_along_axis(logp_nv, targets_n[:, None].astype(jnp.int32), axis=-1)[:, 0]


# ----------------------------------------------------------------------------------------------------
# Kernels. Refs: h [br, D] or [N_pad, D]; w [D, V_pad] or [D, bv]; 1-D [rows] vectors for t, lse, g.


def _masked_logits(h, w_blk, col0, vocab: int, block_vocab: int):
    """A float32 logits tile with columns at or beyond `vocab` set to -inf; also the global column ids."""
    logits = lax.dot_general(h, w_blk, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (1, block_vocab), 1)
    return jnp.where(cols < vocab, logits, -jnp.inf), cols


def _fwd_kernel(h_ref, w_ref, t_ref, logp_ref, lse_ref, *, vocab: int, block_vocab: int, n_vblocks: int):
    h = h_ref[...]
    t = t_ref[...]
    rows = h.shape[0]

    def body(j, carry):
        m, l, tgt = carry
        col0 = pl.multiple_of(j * block_vocab, block_vocab)
        w_blk = w_ref[:, pl.ds(col0, block_vocab)]
        logits, cols = _masked_logits(h, w_blk, col0, vocab, block_vocab)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        # Every block has at least one real column, so m_new is finite and exp(-inf - m_new) = 0.
        l_new = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        tgt = tgt + jnp.sum(jnp.where(cols == t[:, None], logits, 0.0), axis=1)
        return m_new, l_new, tgt

    init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    m, l, tgt = lax.fori_loop(0, n_vblocks, body, init)
    lse = m + jnp.log(l)
    lse_ref[...] = lse
    logp_ref[...] = tgt - lse


def _dlogits(h, w_blk, col0, t, lse, g, vocab: int, block_vocab: int):
    """g * (onehot(target) - softmax) for one tile, recomputed from the saved LSE (0 on padded columns)."""
    logits, cols = _masked_logits(h, w_blk, col0, vocab, block_vocab)
    p = jnp.exp(logits - lse[:, None])
    onehot = (cols == t[:, None]).astype(jnp.float32)
    return g[:, None] * (onehot - p)


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dh_ref, *, vocab: int, block_vocab: int,
               n_vblocks: int):
    h, t, lse, g = h_ref[...], t_ref[...], lse_ref[...], g_ref[...]

    def body(j, dh):
        col0 = pl.multiple_of(j * block_vocab, block_vocab)
        w_blk = w_ref[:, pl.ds(col0, block_vocab)]
        dlog = _dlogits(h, w_blk, col0, t, lse, g, vocab, block_vocab)
        # dlogits [br, bv] x w_blk [D, bv] contracted over the vocabulary -> [br, D].
        return dh + lax.dot_general(dlog.astype(w_blk.dtype), w_blk, (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    dh = lax.fori_loop(0, n_vblocks, body, jnp.zeros(h.shape, jnp.float32))
    dh_ref[...] = dh.astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dw_ref, *, vocab: int, block_rows: int,
               block_vocab: int, n_rblocks: int):
    w_blk = w_ref[...]
    col0 = pl.program_id(0) * block_vocab

    def body(i, dw):
        r0 = pl.multiple_of(i * block_rows, block_rows)
        rows = pl.ds(r0, block_rows)
        h = h_ref[rows, :]
        dlog = _dlogits(h, w_blk, col0, t_ref[rows], lse_ref[rows], g_ref[rows], vocab, block_vocab)
        # h [br, D] x dlogits [br, bv] contracted over rows -> [D, bv].
        return dw + lax.dot_general(h, dlog.astype(h.dtype), (((0,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)

    dw = lax.fori_loop(0, n_rblocks, body, jnp.zeros(w_blk.shape, jnp.float32))
    dw_ref[...] = dw.astype(dw_ref.dtype)


# ----------------------------------------------------------------------------------------------------
# Wrappers: padding, pallas_call, custom_vjp.


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _padded(hidden, w, targets, block_rows: int, block_vocab: int):
    n, v = hidden.shape[0], w.shape[1]
    n_pad, v_pad = _round_up(n, block_rows), _round_up(v, block_vocab)
    if n_pad != n:
        hidden = jnp.pad(hidden, ((0, n_pad - n), (0, 0)))
        targets = jnp.pad(targets, (0, n_pad - n))
    if v_pad != v:
        w = jnp.pad(w, ((0, 0), (0, v_pad - v)))
    return hidden, w, targets


def _forward(hidden, w, targets, block_rows: int, block_vocab: int, interpret: bool):
    n, d = hidden.shape
    vocab = w.shape[1]
    h_p, w_p, t_p = _padded(hidden, w, targets, block_rows, block_vocab)
    n_pad, v_pad = h_p.shape[0], w_p.shape[1]
    kernel = functools.partial(_fwd_kernel, vocab=vocab, block_vocab=block_vocab,
                               n_vblocks=v_pad // block_vocab)
    logp, lse = pl.pallas_call(
        kernel,
        grid=(n_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
                  pl.BlockSpec((d, v_pad), lambda i: (0, 0)),
                  pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_specs=[pl.BlockSpec((block_rows,), lambda i: (i,)),
                   pl.BlockSpec((block_rows,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((n_pad,), jnp.float32)] * 2,
        interpret=interpret,
        name="token_logprobs_fwd",
    )(h_p, w_p, t_p)
    return logp[:n], lse[:n]


def _backward(hidden, w, targets, lse, g, block_rows: int, block_vocab: int, interpret: bool):
    n, d = hidden.shape
    vocab = w.shape[1]
    h_p, w_p, t_p = _padded(hidden, w, targets, block_rows, block_vocab)
    n_pad, v_pad = h_p.shape[0], w_p.shape[1]
    # Padded rows: zero cotangent and a finite LSE, so they add nothing to dw.
    lse_p = jnp.pad(lse, (0, n_pad - n))
    g_p = jnp.pad(g.astype(jnp.float32), (0, n_pad - n))
    row = pl.BlockSpec((block_rows,), lambda i: (i,))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, vocab=vocab, block_vocab=block_vocab, n_vblocks=v_pad // block_vocab),
        grid=(n_pad // block_rows,),
        in_specs=[pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
                  pl.BlockSpec((d, v_pad), lambda i: (0, 0)),
                  row, row, row],
        out_specs=pl.BlockSpec((block_rows, d), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((n_pad, d), hidden.dtype),
        interpret=interpret,
        name="token_logprobs_dh",
    )(h_p, w_p, t_p, lse_p, g_p)
    full_rows = pl.BlockSpec((n_pad,), lambda j: (0,))
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, vocab=vocab, block_rows=block_rows, block_vocab=block_vocab,
                          n_rblocks=n_pad // block_rows),
        grid=(v_pad // block_vocab,),
        in_specs=[pl.BlockSpec((n_pad, d), lambda j: (0, 0)),
                  pl.BlockSpec((d, block_vocab), lambda j: (0, j)),
                  full_rows, full_rows, full_rows],
        out_specs=pl.BlockSpec((d, block_vocab), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((d, v_pad), w.dtype),
        interpret=interpret,
        name="token_logprobs_dw",
    )(h_p, w_p, t_p, lse_p, g_p)
    return dh[:n], dw[:, :vocab]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _token_logprobs(hidden, w, targets, block_rows: int, block_vocab: int, interpret: bool):
    return _forward(hidden, w, targets, block_rows, block_vocab, interpret)[0]


def _token_logprobs_fwd(hidden, w, targets, block_rows, block_vocab, interpret):
    logp, lse = _forward(hidden, w, targets, block_rows, block_vocab, interpret)
    return logp, (hidden, w, targets, lse)


def _token_logprobs_bwd(block_rows, block_vocab, interpret, residuals, g):
    hidden, w, targets, lse = residuals
    dh, dw = _backward(hidden, w, targets, lse, g, block_rows, block_vocab, interpret)
    return dh, dw, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_logprobs_pallas(hidden: jax.Array, w: jax.Array, targets: jax.Array, *, block_rows: int = 128,
                          block_vocab: int = 512, interpret: bool | None = None) -> jax.Array:
    """Pallas log_softmax(hidden @ w)[target] as float32 [N]; differentiable in hidden and w (custom_vjp).

    hidden [N, D], w [D, V] (Dense kernel layout; pass embedding.T for tied embeddings), targets [N] int.
    Block sizes are capped at the (padded) problem size. interpret=None runs in interpret mode on CPU.
    """
    if hidden.ndim != 2 or w.ndim != 2 or targets.ndim != 1:
        raise ValueError(f"token_logprobs_pallas: expected hidden [N, D], w [D, V], targets [N]; got "
                         f"hidden {hidden.shape}, w {w.shape}, targets {targets.shape}.")
    if hidden.shape[1] != w.shape[0] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"token_logprobs_pallas: shapes disagree: hidden {hidden.shape}, w {w.shape}, "
                         f"targets {targets.shape} (need hidden [N, D], w [D, V], targets [N]).")
    if block_rows < 1 or block_vocab < 1:
        raise ValueError(f"token_logprobs_pallas: block sizes must be positive, got block_rows={block_rows}, "
                         f"block_vocab={block_vocab}.")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"token_logprobs_pallas: targets must be integer token ids, got {targets.dtype}.")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    n, vocab = hidden.shape[0], w.shape[1]
    if n == 0:
        return jnp.zeros((0,), jnp.float32)
    # Small problems get one block, kept a power of two (what the Triton lowering needs).
    block_rows = min(block_rows, max(8, pl.next_power_of_2(n)))
    block_vocab = min(block_vocab, pl.next_power_of_2(vocab))
    return _token_logprobs(hidden, w, targets.astype(jnp.int32), block_rows, block_vocab, bool(interpret))
