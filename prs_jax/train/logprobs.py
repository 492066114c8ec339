"""Per-token and per-sequence log-probs of target ids, without materialising [B, T, V] logits.

Methods of `token_logprobs` (all return float32 [B, T] log p(target | prefix)):

- "plain":   logits = hidden @ w, log_softmax, gather. Materialises [B*T, V] (and keeps it for the backward).
- "chunked": pure JAX, the default on every backend. A `lax.scan` over vocabulary chunks keeps an online
             log-sum-exp (running max, running sum) and the target logit. It is a `jax.custom_vjp`, not a remat:
             the forward saves only hidden, w, targets and the LSE [B*T]; the backward is a second scan over
             the same chunks that recomputes each chunk's logits and forms
             d logits = g * (onehot(target) - exp(logits - lse)), accumulating d hidden ([B*T, D], float32)
             and writing d w chunk by chunk into a [D, V] buffer of w's dtype. Peak temporaries are about one
             [B*T, chunk] tile, forward and backward. Gradients equal plain's up to float rounding.
- "pallas":  prs_jax.kernels.logprobs.token_logprobs_pallas (same algorithm as Pallas kernels; interpret
             mode on CPU, which is slow: use it there for tests only).

A vocabulary that is not a multiple of the chunk is not padded (padding would copy w): the last chunk starts
at V - chunk and masks with -inf the columns an earlier chunk already covered.

Targets must lie in [0, V). Positions to ignore (prompt, padding, the -100 of TRL labels) should hold any valid
id such as 0 and be dropped by the mask given to `sequence_logprobs`.
The unembedding is [hidden, vocab] (the Dense kernel layout); for tied embeddings pass embedding.T.

The model-level API (the ONE way training code gets log-probs of a decoder; SFT, reward models, the DPO
family, the reference cache, the Sr-DPO analysis and A2C all go through it):

- `sequence_logps(model, batch, config, temperature=1.0)`: summed log-probs and token counts per sequence,
  float32 [B, V * S] (pairs: [B, 2] = chosen, rejected), for a prs_jax.data.batches.TokenBatch.
- `token_logps(...)`: per-token log-probs [B, V, R] of the scored tokens (0 where `batch.target_mask` is off).
- `response_hidden(model, batch, remat)` + `logps_from_hidden(...)`: the same in two steps, for callers that
  also need the hidden states of the scored positions (A2C's value head); `tail_token_batch(ids, mask, r)`
  builds the batch of a rollout layout (left-padded prompt + r response slots) inside jit.
Only the R scored positions per row reach the vocabulary projection. `temperature` divides the logits (A2C
scores its rollouts at the temperature it sampled them with).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
from jax import lax

from prs_jax.data.batches import SharedPromptBatch, TokenBatch
from prs_jax.kernels.logprobs import token_logprobs_pallas, token_logprobs_reference

if TYPE_CHECKING:
    from prs_jax.models.transformer import CausalLM

__all__ = ["token_logprobs", "token_logprobs_chunked", "sequence_logprobs", "LogProbConfig", "unembed_matrix",
           "response_hidden", "logps_from_hidden", "token_logps", "sequence_logps", "tail_token_batch",
           "shared_prompt_logps"]

Method = Literal["plain", "chunked", "pallas"]
DEFAULT_CHUNK = 2048
DEFAULT_BLOCK_VOCAB = 512


def _chunk_tile(hidden_nd, w_dv, c, chunk: int):
    """Masked float32 logits of chunk c [N, chunk] and the chunk's global column ids [1, chunk]."""
    vocab = w_dv.shape[1]
    lo = c * chunk
    start = jnp.minimum(lo, vocab - chunk)
    w_c = lax.dynamic_slice_in_dim(w_dv, start, chunk, axis=1)
    logits = jnp.dot(hidden_nd, w_c, preferred_element_type=jnp.float32)
    cols = start + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    # Columns below lo belong to an earlier chunk (only the clamped last chunk has any).
    valid = cols >= lo
    return jnp.where(valid, logits, -jnp.inf), cols, valid, start, w_c


def _chunked_forward(hidden_nd, w_dv, targets_n, chunk: int):
    n = hidden_nd.shape[0]
    n_chunks = -(-w_dv.shape[1] // chunk)

    def body(carry, c):
        m, l, tgt = carry
        logits, cols, valid, _, _ = _chunk_tile(hidden_nd, w_dv, c, chunk)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        # Every chunk has at least one valid column, so m_new is finite and exp(-inf - m_new) = 0.
        l_new = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        hit = valid & (cols == targets_n[:, None])
        tgt = tgt + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
        return (m_new, l_new, tgt), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, l, tgt), _ = lax.scan(body, init, jnp.arange(n_chunks, dtype=jnp.int32))
    lse = m + jnp.log(l)
    return tgt - lse, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden_nd, w_dv, targets_n, chunk: int):
    return _chunked_forward(hidden_nd, w_dv, targets_n, chunk)[0]


def _chunked_fwd(hidden_nd, w_dv, targets_n, chunk):
    logp, lse = _chunked_forward(hidden_nd, w_dv, targets_n, chunk)
    return logp, (hidden_nd, w_dv, targets_n, lse)


def _chunked_bwd(chunk, residuals, g_n):
    hidden_nd, w_dv, targets_n, lse = residuals
    n_chunks = -(-w_dv.shape[1] // chunk)
    g = g_n.astype(jnp.float32)

    def body(carry, c):
        dh, dw = carry
        logits, cols, valid, start, w_c = _chunk_tile(hidden_nd, w_dv, c, chunk)
        p = jnp.exp(logits - lse[:, None])  # 0 on masked columns
        onehot = (valid & (cols == targets_n[:, None])).astype(jnp.float32)
        dlog = g[:, None] * (onehot - p)
        dh = dh + jnp.dot(dlog.astype(w_c.dtype), w_c.T, preferred_element_type=jnp.float32)
        dw_c = jnp.dot(hidden_nd.T, dlog.astype(hidden_nd.dtype), preferred_element_type=jnp.float32)
        # Masked (already covered) columns have dlog = 0, so adding keeps what an earlier chunk wrote.
        old = lax.dynamic_slice_in_dim(dw, start, chunk, axis=1).astype(jnp.float32)
        dw = lax.dynamic_update_slice_in_dim(dw, (old + dw_c).astype(dw.dtype), start, axis=1)
        return (dh, dw), None

    init = (jnp.zeros(hidden_nd.shape, jnp.float32), jnp.zeros(w_dv.shape, w_dv.dtype))
    (dh, dw), _ = lax.scan(body, init, jnp.arange(n_chunks, dtype=jnp.int32))
    return dh.astype(hidden_nd.dtype), dw, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def token_logprobs_chunked(hidden_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, *,
                           chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    """Vocabulary-chunked log_softmax(hidden @ w)[target] as float32 [N] (custom_vjp; memory ~ one chunk)."""
    if chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be positive, got {chunk_size}.")
    chunk = min(chunk_size, w_dv.shape[1])
    return _chunked(hidden_nd, w_dv, targets_n.astype(jnp.int32), chunk)


def token_logprobs(hidden_btd: jax.Array, unembed_w_dv: jax.Array, targets_bt: jax.Array, *,
                   method: Method = "chunked", chunk_size: int | None = None, block_rows: int = 128,
                   interpret: bool | None = None, temperature: float = 1.0) -> jax.Array:
    """Float32 [B, T] log-probs of targets_bt under softmax(hidden_btd @ unembed_w_dv / temperature), never
    [B, T, V] unless plain.

    chunk_size: vocabulary chunk for "chunked" (default 2048) and vocabulary block for "pallas" (default 512).
    block_rows and interpret are passed to the Pallas kernel only. temperature (a Python float): the hidden
    states are divided by it before the unembedding, which is logits / temperature for every method (RL scores
    samples under the tempered distribution they were drawn from); gradients flow through the division.
    """
    if hidden_btd.ndim != 3 or unembed_w_dv.ndim != 2 or targets_bt.ndim != 2:
        raise ValueError(f"token_logprobs: expected hidden_btd [B, T, D], unembed_w_dv [D, V], targets_bt "
                         f"[B, T]; got {hidden_btd.shape}, {unembed_w_dv.shape}, {targets_bt.shape}.")
    b, t, d = hidden_btd.shape
    if unembed_w_dv.shape[0] != d:
        raise ValueError(f"token_logprobs: unembed_w_dv {unembed_w_dv.shape} must be [D={d}, V] (the Dense "
                         f"kernel layout); for tied embeddings pass embedding.T.")
    if targets_bt.shape != (b, t):
        raise ValueError(f"token_logprobs: targets_bt {targets_bt.shape} must match hidden_btd's [B, T] = {(b, t)}.")
    if not jnp.issubdtype(targets_bt.dtype, jnp.integer):
        raise ValueError(f"token_logprobs: targets_bt must be integer token ids, got {targets_bt.dtype}.")
    if not temperature > 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}.")
    if temperature != 1.0:
        hidden_btd = hidden_btd / jnp.asarray(temperature, hidden_btd.dtype)
    hidden_nd = hidden_btd.reshape(b * t, d)
    targets_n = targets_bt.reshape(b * t).astype(jnp.int32)
    if method == "plain":
        logp_n = token_logprobs_reference(hidden_nd, unembed_w_dv, targets_n)
    elif method == "chunked":
        logp_n = token_logprobs_chunked(hidden_nd, unembed_w_dv, targets_n,
                                        chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size)
    elif method == "pallas":
        logp_n = token_logprobs_pallas(hidden_nd, unembed_w_dv, targets_n, block_rows=block_rows,
                                       block_vocab=DEFAULT_BLOCK_VOCAB if chunk_size is None else chunk_size,
                                       interpret=interpret)
    else:
        raise ValueError(f"token_logprobs: unknown method {method!r}; use 'plain', 'chunked' or 'pallas'.")
    return logp_n.reshape(b, t)


def sequence_logprobs(token_logps_bt: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked sums of token log-probs [B] (float32) and token counts [B] (float32); nonzero mask = kept."""
    if token_logps_bt.shape != mask_bt.shape or token_logps_bt.ndim != 2:
        raise ValueError(f"sequence_logprobs: token_logps_bt {token_logps_bt.shape} and mask_bt "
                         f"{mask_bt.shape} must both be [B, T].")
    keep = mask_bt.astype(bool)
    # where, not multiply: a dropped position may hold -inf or NaN (e.g. an out-of-range id).
    sums = jnp.sum(jnp.where(keep, token_logps_bt.astype(jnp.float32), 0.0), axis=-1)
    return sums, jnp.sum(keep, axis=-1, dtype=jnp.float32)


# ------------------------------------------------------------------------------------------ model-level API
@dataclasses.dataclass(frozen=True)
class LogProbConfig:
    """How a loss computes log-probs: vocabulary method and chunk (see `token_logprobs`) and whether each decoder
    layer is recomputed in the backward pass (remat: activation memory ~ one layer, ~1.3x compute)."""

    method: Method = "chunked"
    chunk_size: int | None = None
    remat: bool = False


def unembed_matrix(model: "CausalLM") -> jax.Array:
    """The [hidden, vocab] output projection (the embedding's transpose when tied)."""
    if model.lm_head is None:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def tail_token_batch(ids_bt: jax.Array, mask_bt: jax.Array, r: int, response_mask_br: jax.Array | None = None
                     ) -> TokenBatch:
    """A TokenBatch (jnp, usable inside jit) scoring the last `r` tokens of each row of a [B, T] rollout layout
    (left-padded prompt, then r response slots): one sequence per row, `mask_bt` marks real tokens, and
    `response_mask_br` [B, r] (default: all) which of the r response slots are scored. For A2C-style callers:
    `response_hidden` / `logps_from_hidden(..., temperature=T)` on it give [B, 1, r] results."""
    b, t = ids_bt.shape
    mask = mask_bt.astype(bool)
    slots = jnp.broadcast_to(jnp.arange(t - r, t, dtype=jnp.int32), (b, r))
    scored = jnp.ones((b, r), bool) if response_mask_br is None else response_mask_br.astype(bool)
    return TokenBatch(tokens=ids_bt[:, None].astype(jnp.int32), segment_ids=mask.astype(jnp.int32)[:, None],
                      positions=(jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0))[:, None],
                      target_slot=slots[:, None], context_slot=(slots - 1)[:, None],
                      target_seq=jnp.where(scored, 0, -1).astype(jnp.int32)[:, None], seqs_per_row=1)


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape((-1,) + x.shape[2:])


def response_hidden(model: "CausalLM", batch: TokenBatch, remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """Hidden states [B, V, R, D] that predict the scored tokens and those tokens [B, V, R] (one backbone
    forward over the B * V rows; `model` is anything with a `.model` Backbone)."""
    batch.check("response_hidden")
    b, v, _ = batch.tokens.shape
    r = batch.target_slot.shape[-1]
    tokens = _flat(batch.tokens)
    hidden, _ = model.model(tokens, positions=_flat(batch.positions), segment_ids=_flat(batch.segment_ids),
                            remat=remat)
    h = jnp.take_along_axis(hidden, _flat(batch.context_slot)[..., None], axis=1)
    targets = jnp.take_along_axis(tokens, _flat(batch.target_slot), axis=1)
    return h.reshape(b, v, r, h.shape[-1]), targets.reshape(b, v, r)


def logps_from_hidden(model: "CausalLM", hidden: jax.Array, targets: jax.Array, config: LogProbConfig,
                      temperature: float = 1.0) -> jax.Array:
    """Float32 log softmax(hidden @ W / temperature)[target], shape of `targets` (hidden: targets' shape + [D])."""
    if temperature <= 0:
        raise ValueError(f"logps_from_hidden: temperature must be positive, got {temperature}.")
    lead = targets.shape
    h = hidden.reshape(1, -1, hidden.shape[-1])
    if temperature != 1.0:
        h = h / jnp.asarray(temperature, h.dtype)  # (h / T) @ W = logits / T
    out = token_logprobs(h, unembed_matrix(model).astype(h.dtype), targets.reshape(1, -1),
                         method=config.method, chunk_size=config.chunk_size)
    return out.reshape(lead)


def token_logps(model: "CausalLM", batch: TokenBatch, config: LogProbConfig = LogProbConfig(), *,
                temperature: float = 1.0) -> jax.Array:
    """Float32 [B, V, R] log-probs of the scored tokens (0 where `batch.target_mask` is off)."""
    h, targets = response_hidden(model, batch, config.remat)
    logp = logps_from_hidden(model, h, targets, config, temperature)
    return jnp.where(batch.target_seq >= 0, logp, 0.0)


def sequence_logps(model: "CausalLM", batch: TokenBatch, config: LogProbConfig = LogProbConfig(), *,
                   temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs and scored-token counts per sequence, float32 [B, V * S] each (row-major over the V
    rows and the S sequences of each row: for pairs, column 0 is chosen and column 1 rejected in both layouts)."""
    tok = token_logps(model, batch, config, temperature=temperature)
    s = batch.seqs_per_row
    hit = batch.target_seq[..., None] == jnp.arange(s, dtype=jnp.int32)  # [B, V, R, S]
    sums = jnp.sum(jnp.where(hit, tok[..., None], 0.0), axis=2)
    counts = jnp.sum(hit, axis=2, dtype=jnp.float32)
    b = sums.shape[0]
    return sums.reshape(b, -1), counts.reshape(b, -1)


def shared_prompt_logps(model: "CausalLM", batch: SharedPromptBatch, config: LogProbConfig = LogProbConfig(), *,
                        temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs and counts [B, n] of n responses per prompt, the prompt computed ONCE: a forward over the
    prompts fills a KV cache, then the B * n responses run as suffixes on a CascadeCache over it (prefix
    attention batched over the n siblings, merged exactly by log-sum-exp), gradients through both. The first
    response token is predicted by the prompt's last hidden state. `config.remat` is refused: the cache forwards
    keep their activations (use the packed layout to rematerialise)."""
    from prs_jax.models.layers import CascadeCache, KVCache

    if config.remat:
        raise ValueError("shared_prompt_logps: remat is not supported with pair_layout='cascade'; use "
                         "pair_layout='packed' (same results) to rematerialise decoder layers.")

    batch.check("shared_prompt_logps")
    b, p = batch.prompt_tokens.shape
    _, n, s = batch.resp_tokens.shape
    cfg = model.config
    dtype = model.model.embed_tokens.embedding[...].dtype
    h_prompt, cache = model.model(batch.prompt_tokens, attention_mask=batch.prompt_mask,
                                  cache=KVCache.init(cfg, b, p, dtype))
    cascade = CascadeCache.init(cfg, cache.k, cache.v, cache.mask, rows_per_group=n, suffix_len=s)
    resp = batch.resp_tokens.reshape(b * n, s)
    h_resp, _ = model.model(resp, attention_mask=batch.resp_mask.reshape(b * n, s), cache=cascade)
    last = jnp.repeat(h_prompt[:, -1:], n, axis=0)  # left-padded: the prompt's last token is at slot P - 1
    h_prev = jnp.concatenate([last, h_resp[:, :-1]], axis=1)  # [B * n, S, D]
    logp = logps_from_hidden(model, h_prev, resp, config, temperature)
    keep = batch.resp_scored.reshape(b * n, s).astype(bool)
    sums, counts = sequence_logprobs(logp, keep)
    return sums.reshape(b, n), counts.reshape(b, n)
