"""Batched, jit-compiled autoregressive decoding on the KV cache (the flat case of the tree engine).

One jitted program prefills the (left-padded) prompts and runs a `lax.while_loop` that stops early when
every row has finished; the model's graph definition is static and its state is a jit argument, so a new
model with the same shapes reuses the compiled program.

Randomness: with one `key`, the key is split every step and row i takes element i of the step's uniforms, so a
row's samples depend on its position in the batch. Pass `row_keys` (one key per row, e.g. derived from a
prompt id as the tree engine does) to make each row's samples depend on its own key only: row i at step s
uses uniform(fold_in(row_keys[i], s)), the tree engine's scheme.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from prs_jax.models.layers import KVCache
from prs_jax.models.sharding import mesh_context_of, use_rules
from prs_jax.tree.sampling import SamplingParams, sample
from prs_jax.models.transformer import CausalLM


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """Generated tokens [B, N] (pad after the end), their log-probs [B, N], and lengths [B] (EOS included)."""

    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "eos_ids", "pad_id",
                                             "rules"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
              key: jax.Array, *, max_new_tokens: int, sampling: SamplingParams,
              eos_ids: tuple[int, ...], pad_id: int, rules: Any = None) -> Generation:
    with use_rules(rules):
        return _generate_body(graphdef, state, input_ids, attention_mask, key, max_new_tokens=max_new_tokens,
                              sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)


def _generate_body(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, attention_mask: jax.Array,
                   key: jax.Array, *, max_new_tokens: int, sampling: SamplingParams,
                   eos_ids: tuple[int, ...], pad_id: int) -> Generation:
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    # The cache is born inside the program, so XLA updates it in place without a donated input.
    cache = KVCache.init(model.config, b, t + max_new_tokens, model.model.embed_tokens.embedding[...].dtype)
    hidden, cache = model.model(input_ids, attention_mask=attention_mask, cache=cache)
    last = model.unembed(hidden[:, -1])  # only the last prompt position needs the vocabulary projection
    eos = jnp.asarray(eos_ids, jnp.int32)
    out_tok = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    out_lp = jnp.zeros((b, max_new_tokens), jnp.float32)

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, last, cache, done, lengths, out_tok, out_lp, key = carry
        if key.ndim:  # one key per row: position-stable
            u = jax.vmap(jax.random.uniform)(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, step))
        else:
            key, sub = jax.random.split(key)
            u = jax.random.uniform(sub, (b,))
        tok, lp = sample(last, u, sampling)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        logits, cache = model(tok[:, None], cache=cache)  # finished rows decode on, their output is discarded
        return step + 1, logits[:, -1], cache, done, lengths, out_tok, out_lp, key

    init = (jnp.int32(0), last, cache, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), out_tok, out_lp, key)
    _, _, _, _, lengths, out_tok, out_lp, _ = jax.lax.while_loop(cond, body, init)
    return Generation(tokens=out_tok, logprobs=out_lp, lengths=lengths)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Left-pad token lists to a common length; returns (ids [B, T], mask [B, T])."""
    if not sequences:
        raise ValueError("left_pad: no sequences given.")
    for i, s in enumerate(sequences):
        if len(s) == 0:
            raise ValueError(f"left_pad: sequence {i} is empty; every prompt needs at least one token.")
    t = length or max(len(s) for s in sequences)
    ids = [[pad_id] * (t - len(s)) + list(s) for s in sequences]
    mask = [[0] * (t - len(s)) + [1] * len(s) for s in sequences]
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)


def generate(model: CausalLM, input_ids: jax.Array, attention_mask: jax.Array, *, max_new_tokens: int,
             sampling: SamplingParams = SamplingParams(), key: jax.Array | None = None,
             eos_ids: Sequence[int] = (), pad_id: int = 0, row_keys: jax.Array | None = None) -> Generation:
    """Decode up to `max_new_tokens` for each left-padded prompt row; stops early when all rows hit EOS.

    `row_keys` ([B] keys, optional) replace `key` with one key per row: a row's samples then do not depend on
    the batch it runs in (see the module docstring)."""
    if max_new_tokens <= 0:
        raise ValueError(f"generate: max_new_tokens must be positive (got {max_new_tokens}).")
    if sampling.needs_counts:
        raise ValueError("generate: repetition/presence/frequency penalties are applied by the tree engine "
                         "(prs_jax.tree.TreeEngine.expand); the flat decoder does not track token counts.")
    b, t = input_ids.shape
    limit = model.config.max_position_embeddings
    if t + max_new_tokens > limit:
        raise ValueError(f"generate: prompt length {t} + max_new_tokens {max_new_tokens} exceeds the context "
                         f"window of {limit} tokens (config.json max_position_embeddings).")
    graphdef, state = nnx.split(model)
    if row_keys is not None:
        if key is not None:
            raise ValueError("generate: pass `key` or `row_keys`, not both.")
        if row_keys.shape != (b,):
            raise ValueError(f"generate: row_keys must hold one key per row ({b}), got shape {row_keys.shape}.")
        key = row_keys
    key = key if key is not None else jax.random.key(0)
    kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tuple(int(e) for e in eos_ids),
                  pad_id=int(pad_id))
    ctx = mesh_context_of(model)  # a sharded model decodes inside its mesh
    if ctx is None:
        return _generate(graphdef, state, input_ids, attention_mask, key, **kwargs)
    with ctx.activate():
        return _generate(graphdef, state, input_ids, attention_mask, key, rules=ctx.frozen_rules, **kwargs)
