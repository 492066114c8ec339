"""Flax NNX decoders: one backbone for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) and GPT-NeoX (Pythia).

One forward serves training and decoding:

    hidden, cache = backbone(ids_bt, attention_mask=mask_bt, positions=pos_bt, cache=None | KVCache)

Without a cache the T tokens attend causally to each other (padding masked). With a cache the T tokens are
written at `cache.index` and attend to every valid slot up to their own (prefill and incremental decode are
the same call). `CausalLM.unembed` is separate so training can send only response positions through the
vocabulary projection.

Layer scan (`scan_layers=True`, default off): the decoder layers are stored as ONE stacked `Block` whose
parameters carry a leading layer axis [L, ...] (built with `nnx.vmap` over a Block factory and
`nnx.split_rngs`; the axis has the logical name "layers", never sharded). A cache-free forward (training, scoring
without a cache) runs the layers as one `lax.scan` over that stack, so a deep model compiles one layer body
instead of L copies and the training step (forward, backward, optimizer update) never stacks or slices layer
parameters; `remat=True` then checkpoints the scan body (per-layer remat). Forwards with a KV cache (prefill
into a cache, decoding) run the layers unrolled, each layer's parameters indexed from the stack (`layer(i)`), so
the per-layer caches keep their layout; `scan=False` does the same without a cache. Storage differs from the
default model only in layout: HF checkpoints load and save per-layer names either way (`hf_io` maps
`model.layers.{i}.*` to slice i of the stacked arrays), but optimizer state and Trainer checkpoints hold the
stacked arrays, so a run checkpointed with one layout does not resume into the other.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from prs_jax.models.config import ModelConfig
from prs_jax.models.layers import (
    AttnContext, Attention, CascadeCache, Dense, Embed, GatedMLP, KVCache, LayerNorm, PlainMLP, RMSNorm, named,
    rope_cos_sin, rope_inv_freq,
)
from prs_jax.models.sharding import LAYER_AXIS, constrain


class Block(nnx.Module):
    """One decoder layer: pre-norm attention + MLP, sequential (Llama) or parallel residual (GPT-NeoX)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        norm = RMSNorm if cfg.family == "llama" else LayerNorm
        self.input_layernorm = norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)
        self.post_attention_layernorm = norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs) if cfg.family == "llama" else PlainMLP(cfg, dtype=dtype,
                                                                                                 rngs=rngs)
        self.parallel_residual = cfg.use_parallel_residual

    @named("block")
    def __call__(self, x: jax.Array, ctx: AttnContext, kv: tuple[jax.Array, jax.Array] | None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), ctx, kv)
        if self.parallel_residual:
            x = x + attn_out + self.mlp(self.post_attention_layernorm(x))
        else:
            x = x + attn_out
            x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", None, "embed_act")), kv


def default_positions(attention_mask_bt: jax.Array, offset_b: jax.Array | None = None) -> jax.Array:
    """Positions counting real tokens only: left padding does not shift RoPE positions."""
    pos = jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1
    if offset_b is not None:
        pos = pos + offset_b[:, None]
    return jnp.maximum(pos, 0)


class Backbone(nnx.Module):
    """Embedding, decoder layers and final norm; returns hidden states [B, T, hidden]."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = False):
        self.config = cfg
        self.scan_layers = scan_layers  # layers stored stacked and scanned (see the module docstring)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        if scan_layers:
            self.layers = stacked_blocks(cfg, dtype=dtype, rngs=rngs)
        else:
            self.layers = nnx.List([Block(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        norm = RMSNorm if cfg.family == "llama" else LayerNorm
        self.norm = norm(cfg.hidden_size, cfg.norm_eps, dtype=dtype)

    def layer(self, i: int) -> Block:
        """Decoder layer `i` as a `Block` (with stacked storage: a new module over slice i of every parameter;
        updating it does not write back into the stack)."""
        return self.layers[i] if not self.scan_layers else self._unstacked()[i]

    def _unstacked(self) -> list[Block]:
        """Every decoder layer as its own `Block` (stacked storage: one split, then slice i per layer)."""
        if not self.scan_layers:
            return list(self.layers)
        graphdef, state = nnx.split(self.layers)
        return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                for i in range(self.config.num_hidden_layers)]

    def _mask(self, q_slot_bt: jax.Array, kv_valid_bs: jax.Array) -> jax.Array:
        s = jnp.arange(kv_valid_bs.shape[1], dtype=jnp.int32)
        allowed = kv_valid_bs[:, None, :] & (s[None, None, :] <= q_slot_bt[:, :, None])
        if self.config.sliding_window is not None:
            allowed &= s[None, None, :] > q_slot_bt[:, :, None] - self.config.sliding_window
        return allowed

    def _segment_mask(self, segment_ids_bt: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Packed rows (prs_jax.data.batches): causal over slots, padding (segment 0) hidden, the shared prefix
        (segment 1) visible to every later token, any other segment visible only to itself."""
        t = segment_ids_bt.shape[1]
        s = jnp.arange(t, dtype=jnp.int32)
        seg_q, seg_k = segment_ids_bt[:, :, None], segment_ids_bt[:, None, :]
        allowed = (s[None, None, :] <= s[None, :, None]) & (seg_k > 0) & ((seg_k == seg_q) | (seg_k == 1))
        if self.config.sliding_window is not None:  # distances in positions: slots of packed branches skip
            allowed &= positions_bt[:, None, :] > positions_bt[:, :, None] - self.config.sliding_window
        return allowed

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | CascadeCache | None = None,
                 remat: bool = False, scan: bool | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | CascadeCache | None]:
        """Hidden states [B, T, hidden] and the updated cache. `remat`: recompute each layer in the backward
        pass (cache-free forwards). `scan`: run the layers as a `lax.scan` over the stacked layer parameters
        (default: `self.scan_layers`; cache-free forwards of a `scan_layers=True` model only; False runs a
        stacked model's layers unrolled). `segment_ids` [B, T] (training only, no cache): packed rows with a
        shared prefix, see `_segment_mask`; then `positions` must be given and `attention_mask` is not used."""
        if scan and cache is not None:
            raise ValueError("Backbone: scan=True runs cache-free forwards only (training, scoring); a forward "
                             "with a KV cache runs the layers unrolled. Drop scan=True for cached calls.")
        if scan and not self.scan_layers:
            raise ValueError("Backbone: scan=True needs the layers stored stacked; build or load the model with "
                             "scan_layers=True (e.g. load_causal_lm(path, scan_layers=True)).")
        scan = self.scan_layers and cache is None if scan is None else scan
        b, t = input_ids.shape
        if segment_ids is not None:
            if cache is not None or positions is None:
                raise ValueError("Backbone: segment_ids (packed rows) need explicit positions and no cache.")
            attention_mask = segment_ids > 0
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), bool)
        attention_mask = attention_mask.astype(bool)
        cascade = cache if isinstance(cache, CascadeCache) else None
        if cache is None:
            if positions is None:
                positions = default_positions(attention_mask)
            q_slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = (self._segment_mask(segment_ids, positions) if segment_ids is not None
                    else self._mask(q_slot, attention_mask))
            write_index = valid = None
        else:
            write_index = cache.index
            old_valid = cache.suffix_mask if cascade is not None else cache.mask
            valid = jax.lax.dynamic_update_slice(old_valid, attention_mask, (0, write_index))
            if positions is None:
                offset = jnp.sum(old_valid, axis=-1, dtype=jnp.int32)
                if cascade is not None:
                    offset = offset + jnp.repeat(cascade.prefix_len, cascade.rows_per_group)
                positions = default_positions(attention_mask, offset)
            q_slot = write_index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if cascade is not None and self.config.sliding_window is not None:
                total = cascade.prefix_mask.shape[1] + cascade.suffix_mask.shape[1]
                if cascade.outer_mask is not None:  # the outer level's slots come before the group prefix
                    total += cascade.outer_mask.shape[1]
                if total > self.config.sliding_window:
                    raise NotImplementedError(
                        f"cascade decoding with sliding_window={self.config.sliding_window} over contexts of up "
                        f"to {total} tokens is not supported; use plain decoding for this model.")
            mask = self._mask(q_slot, valid)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config.rope, self.config.rotary_dim))
        ctx = AttnContext(cos=cos, sin=sin, mask_bts=mask, write_index=write_index, cascade=cascade)
        x = constrain(self.embed_tokens(input_ids), ("batch", None, "embed_act"))
        new_k, new_v = [], []
        if scan:
            x = self._scan(x, ctx, remat)
            return self.norm(x), None
        for i, layer in enumerate(self._unstacked()):
            if cascade is not None:
                kv = (cascade.prefix_k[i], cascade.prefix_v[i], cascade.suffix_k[i], cascade.suffix_v[i])
                if cascade.outer_k is not None:
                    kv = (cascade.outer_k[i], cascade.outer_v[i], *kv)
            else:
                kv = (cache.k[i], cache.v[i]) if cache is not None else None
            if remat and kv is None:
                # training: keep only each layer's input; recompute the layer in the backward pass
                graphdef, state = nnx.split(layer)
                x = jax.checkpoint(lambda st, h, g=graphdef: nnx.merge(g, st)(h, ctx, None)[0])(state, x)
            else:
                with jax.named_scope(f"layer_{i}"):
                    x, kv = layer(x, ctx, kv)
            if kv is not None:
                new_k.append(kv[-2])
                new_v.append(kv[-1])
        x = self.norm(x)
        if cascade is not None:
            cache = dataclasses.replace(cascade, suffix_k=tuple(new_k), suffix_v=tuple(new_v), suffix_mask=valid,
                                        index=write_index + t)
        elif cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), mask=valid, index=write_index + t)
        return x, cache

    @named("layers_scan")
    def _scan(self, x: jax.Array, ctx: AttnContext, remat: bool) -> jax.Array:
        """The decoder layers as one `lax.scan` over the stacked parameters (remat: per-layer checkpoint)."""
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(h, ctx, None)[0], None

        if remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, state)
        return x


def stacked_blocks(cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> Block:
    """`cfg.num_hidden_layers` decoder layers as one `Block` whose parameters have a leading layer axis [L, ...]
    (logical name `LAYER_AXIS`, prepended to each parameter's `logical_axes`); each layer draws its own init."""

    @nnx.split_rngs(splits=cfg.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS, "logical_axes": LAYER_AXIS})
    def make(layer_rngs: nnx.Rngs) -> Block:
        return Block(cfg, dtype=dtype, rngs=layer_rngs)

    return make(rngs)


class CausalLM(nnx.Module):
    """Backbone + vocabulary projection (tied to the embedding or separate)."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs,
                 scan_layers: bool = False):
        self.config = cfg
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs, scan_layers=scan_layers)
        self.lm_head = None if cfg.tie_word_embeddings else Dense(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, dtype=dtype, rngs=rngs)

    @named("unembed")
    def unembed(self, hidden: jax.Array) -> jax.Array:
        """Logits [..., vocab] for hidden states [..., hidden]."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | CascadeCache | None = None
                 ) -> tuple[jax.Array, KVCache | CascadeCache | None]:
        """Logits [B, T, vocab] for every position and the updated cache (None without one)."""
        hidden, cache = self.model(input_ids, attention_mask=attention_mask, positions=positions, cache=cache)
        return self.unembed(hidden), cache


class RewardModel(nnx.Module):
    """Backbone + linear head; the reward is the head's output at each row's last real token."""

    def __init__(self, cfg: ModelConfig, *, num_labels: int = 1, head_name: str = "score", head_bias: bool = False,
                 dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs, scan_layers: bool = False):
        self.config = cfg
        self.head_name = head_name
        self.num_labels = num_labels
        self.model = Backbone(cfg, dtype=dtype, rngs=rngs, scan_layers=scan_layers)
        self.head = Dense(cfg.hidden_size, num_labels, ("embed", None), bias=head_bias, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """Rewards [B] (or [B, num_labels] when num_labels > 1)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        hidden, _ = self.model(input_ids, attention_mask=attention_mask, positions=positions)
        t = input_ids.shape[1]
        last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(t)[None, :], 0), axis=-1)
        h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        out = self.head(h_last)
        return out[:, 0] if self.num_labels == 1 else out
