"""Building blocks shared by the decoders: dense layers with logical axes, norms, RoPE, attention, KV cache."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.kernels.cascade import QUERY_BLOCK, Outer, cascade_attention
from prs_jax.models.config import ModelConfig, RopeConfig
from prs_jax.models.sharding import constrain

Axes = tuple[str | None, ...]
_INIT_STD = 0.02


def named(name: str):
    """Run the decorated method inside `jax.named_scope(name)` (readable profiles and HLO op names)."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with jax.named_scope(name):
                return fn(*args, **kwargs)

        return call

    return wrap


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] and carries logical axis names for sharding."""

    def __init__(self, din: int, dout: int, axes: Axes, *, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(_normal(rngs, (din, dout), dtype), logical_axes=axes)
        self.bias = nnx.Param(jnp.zeros((dout,), dtype), logical_axes=axes[1:]) if bias else None

    @named("dense")
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        # a 2-D matmul: XLA:CPU computes the weight gradient of [B, T, D] x [D, F] about 2x slower than of
        # [B*T, D] x [D, F] (measured on the DPO step)
        y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, hidden]; `attend` is the tied unembedding."""

    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(_normal(rngs, (vocab, dim), dtype), logical_axes=("vocab", "embed"))

    @named("embed")
    def __call__(self, ids: jax.Array) -> jax.Array:
        # gather from the table with its hidden dim whole (FSDP gathers weights before use): a gather from a
        # table split on the hidden dim gives rows split on it, which the partitioner can only move to the
        # batch axes by replicating them
        return jnp.take(constrain(self.embedding[...], ("vocab", None)), ids, axis=0)

    @named("unembed_tied")
    def attend(self, x: jax.Array) -> jax.Array:
        return x @ self.embedding[...].T


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled by a learned weight (Llama convention: x * w, w initialised to 1)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    @named("rms_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, computed in float32 (GPT-NeoX)."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype), logical_axes=("norm",))
        self.eps = eps

    @named("layer_norm")
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] in float32, with linear or llama3 scaling applied."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        inv = inv / np.float32(rope.factor)
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, rotary_dim] for integer positions (HF's rotate-half layout)."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_bthd: jax.Array, cos_btr: jax.Array, sin_btr: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim features of every head; the rest pass through (partial rotary)."""
    rot = cos_btr.shape[-1]
    x_rot, x_pass = x_bthd[..., :rot], x_bthd[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos = cos_btr[:, :, None, :].astype(x_bthd.dtype)
    sin = sin_btr[:, :, None, :].astype(x_bthd.dtype)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out




def attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array, *,
              q_block: int | None = QUERY_BLOCK) -> jax.Array:
    """Grouped-query attention of T queries against S keys; softmax in float32. Returns [B, T, H, D].

    With more than `q_block` queries (a long prefill or training row) the queries run in equal blocks of at most
    `q_block` (lax.map, each block rematerialised in the backward pass), so the scores held at once are
    [B, H, block, S] instead of [B, H, T, S]; the result is the same. None or 0: one dense block."""
    t = q_bthd.shape[1]
    if not q_block or t <= q_block:
        return _dense_attention(q_bthd, k_bksd, v_bksd, mask_bts)
    b, _, h, d = q_bthd.shape
    n = -(-t // q_block)
    block = -(-t // n)  # equal blocks: padding below one query per block
    block = -(-block // 8) * 8
    pad = n * block - t
    q = jnp.pad(q_bthd, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d).swapaxes(0, 1)
    m = jnp.pad(mask_bts, ((0, 0), (0, pad), (0, 0))).reshape(b, n, block, -1).swapaxes(0, 1)
    one = jax.checkpoint(lambda qm: _dense_attention(qm[0], k_bksd, v_bksd, qm[1]))
    out = jax.lax.map(one, (q, m))  # [n, B, block, H, D]
    return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]


def _dense_attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    b, t, h, d = q_bthd.shape
    kvh = k_bksd.shape[1]
    q = q_bthd.reshape(b, t, kvh, h // kvh, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_bksd, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(d))
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_bksd)
    return out.reshape(b, t, h, d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer key/value slots [B, kv_heads, S, head_dim] plus slot validity and the next write slot.

    Token i of a row lives in slot i; `mask` marks slots holding real tokens (left padding leaves holes),
    and `index` is the slot where the next forward call writes. Queries attend to valid slots at or before
    their own slot, so one layout serves left-padded prompts and incremental decoding alike.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> "KVCache":
        """An empty cache with room for `max_len` tokens per row."""
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
                   mask=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask.shape[1]

    @property
    def lengths(self) -> jax.Array:
        """Number of real tokens held per row [B]."""
        return jnp.sum(self.mask, axis=-1, dtype=jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CascadeCache:
    """KV for cascade decoding: G shared prefixes (one per group of n sibling rows) + each row's own suffix.

    prefix_k/v[layer]: [G, K, P, D] with `prefix_mask` [G, P] and `prefix_len` [G] real tokens (positions of
    a row's new tokens continue after its group's prefix); suffix_k/v[layer]: [R, K, S, D] with R = G * n,
    `suffix_mask` [R, S] valid slots, `index` the next suffix slot to write. `impl` picks the prefix-attention
    implementation ("reference" or "pallas").
    """

    prefix_k: tuple[jax.Array, ...]
    prefix_v: tuple[jax.Array, ...]
    prefix_mask: jax.Array
    prefix_len: jax.Array
    suffix_k: tuple[jax.Array, ...]
    suffix_v: tuple[jax.Array, ...]
    suffix_mask: jax.Array
    index: jax.Array
    impl: str = dataclasses.field(default="reference", metadata=dict(static=True))
    # the optional outer level (kernels.cascade.Outer): per layer [S, K, P0, D], mask [S, P0], group -> (outer
    # prefix, slot); a group's context is its outer prefix, then its own prefix, then each row's suffix
    outer_k: tuple[jax.Array, ...] | None = None
    outer_v: tuple[jax.Array, ...] | None = None
    outer_mask: jax.Array | None = None
    outer_group: jax.Array | None = None
    outer_slot: jax.Array | None = None
    outer_fanout: int = dataclasses.field(default=0, metadata=dict(static=True))

    @classmethod
    def init(cls, cfg: ModelConfig, prefix_k: tuple[jax.Array, ...], prefix_v: tuple[jax.Array, ...],
             prefix_mask: jax.Array, rows_per_group: int, suffix_len: int, impl: str = "reference",
             outer: tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], jax.Array, jax.Array, jax.Array, int]
             | None = None) -> "CascadeCache":
        """A cascade cache over given prefixes with an empty suffix of `suffix_len` slots per row. `outer`:
        (k per layer, v per layer, mask [S, P0], group [G], slot [G], fanout) of the outer level, or None."""
        g = prefix_mask.shape[0]
        r = g * rows_per_group
        shape = (r, cfg.num_key_value_heads, suffix_len, cfg.head_dim)
        dtype = prefix_k[0].dtype
        prefix_len = jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32)
        extra: dict[str, Any] = {}
        if outer is not None:
            ok, ov, omask, group, slot, fanout = outer
            outer_len = jnp.sum(omask, axis=-1, dtype=jnp.int32)
            prefix_len = prefix_len + outer_len.at[group].get(mode="fill", fill_value=0)
            extra = dict(outer_k=tuple(ok), outer_v=tuple(ov), outer_mask=omask, outer_group=group, outer_slot=slot,
                         outer_fanout=int(fanout))
        return cls(prefix_k=tuple(prefix_k), prefix_v=tuple(prefix_v), prefix_mask=prefix_mask,
                   prefix_len=prefix_len,
                   suffix_k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
                   suffix_v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)),
                   suffix_mask=jnp.zeros((r, suffix_len), bool), index=jnp.zeros((), jnp.int32), impl=impl, **extra)

    def outer_level(self, k: jax.Array, v: jax.Array) -> Outer | None:
        """The outer level of one layer (its k/v given), or None without one."""
        if self.outer_mask is None:
            return None
        return Outer(k=k, v=v, mask=self.outer_mask, group=self.outer_group, slot=self.outer_slot,
                     fanout=self.outer_fanout)

    @property
    def rows_per_group(self) -> int:
        return self.suffix_mask.shape[0] // self.prefix_mask.shape[0]


@dataclasses.dataclass(frozen=True)
class AttnContext:
    """What every layer needs to attend: rope tables, the mask and (in cache mode) the write slot."""

    cos: jax.Array
    sin: jax.Array
    mask_bts: jax.Array  # plain: [B, T, S]; cascade: the suffix mask [R, T, S]
    write_index: jax.Array | None  # None: no cache (keys are the current tokens)
    cascade: CascadeCache | None = None  # set in cascade mode (prefix mask, groups, impl)


_KV_AXES = ("batch", "kv_heads", None, None)  # KV cache [B, K, S, D]: rows on the batch axes, heads on tensor
# outer cascade level [S, K, P0, D]: a few prefixes each read by many groups, kept whole on the batch axes (every
# data shard's groups read them) and split by kv heads like the rest of the KV
_OUTER_KV_AXES = (None, "kv_heads", None, None)


class Attention(nnx.Module):
    """Multi-head attention with GQA, optional q/k/v/o bias, optional per-head q/k RMSNorm, partial RoPE."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = Dense(h, self.num_heads * hd, ("embed", "heads"), bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Dense(h, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype,
                            rngs=rngs)
        self.v_proj = Dense(h, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=cfg.qkv_bias, dtype=dtype,
                            rngs=rngs)
        self.o_proj = Dense(self.num_heads * hd, h, ("heads", "embed"), bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(hd, cfg.norm_eps, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    @named("attention")
    def __call__(self, x_btd: jax.Array, ctx: AttnContext, kv: tuple[jax.Array, jax.Array] | None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, ctx.cos, ctx.sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        k_bksd = k.transpose(0, 2, 1, 3)
        v_bksd = v.transpose(0, 2, 1, 3)
        if ctx.cascade is not None:
            ok, ov = kv[:-4] or (None, None)  # with an outer level: (outer k, outer v, prefix k, v, suffix k, v)
            if ok is not None:
                ok, ov = constrain(ok, _OUTER_KV_AXES), constrain(ov, _OUTER_KV_AXES)
            pk, pv, sk, sv = kv[-4:]
            pk, pv = constrain(pk, _KV_AXES), constrain(pv, _KV_AXES)
            start = (0, 0, ctx.write_index, 0)
            sk = constrain(jax.lax.dynamic_update_slice(sk, k_bksd.astype(sk.dtype), start), _KV_AXES)
            sv = constrain(jax.lax.dynamic_update_slice(sv, v_bksd.astype(sv.dtype), start), _KV_AXES)
            g = ctx.cascade.prefix_mask.shape[0]
            outer = None if ok is None else ctx.cascade.outer_level(ok, ov)
            out = cascade_attention(q.reshape(g, b // g, t, self.num_heads, self.head_dim), pk, pv,
                                    ctx.cascade.prefix_mask, sk, sv, ctx.mask_bts, impl=ctx.cascade.impl, outer=outer)
            out = out.reshape(b, t, self.num_heads * self.head_dim)
            return self.o_proj(out), (*(() if ok is None else (ok, ov)), pk, pv, sk, sv)
        if kv is not None:
            k_cache, v_cache = kv
            start = (0, 0, ctx.write_index, 0)
            k_bksd = constrain(jax.lax.dynamic_update_slice(k_cache, k_bksd.astype(k_cache.dtype), start), _KV_AXES)
            v_bksd = constrain(jax.lax.dynamic_update_slice(v_cache, v_bksd.astype(v_cache.dtype), start), _KV_AXES)
            kv = (k_bksd, v_bksd)
        out = attention(q, k_bksd, v_bksd, ctx.mask_bts)
        out = constrain(out, ("batch", None, "heads", None))
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv


def activation(name: str):
    """The HF activation named `name` as a JAX function."""
    table = {
        "silu": jax.nn.silu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(table)}")
    return table[name]


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward (Llama family): down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Dense(h, i, ("embed", "mlp"), bias=bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense(h, i, ("embed", "mlp"), bias=bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(i, h, ("mlp", "embed"), bias=bias, dtype=dtype, rngs=rngs)
        self.act_name = cfg.hidden_act

    @named("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.act_name)
        hidden = constrain(act(self.gate_proj(x)) * self.up_proj(x), ("batch", None, "mlp"))
        return self.down_proj(hidden)


class PlainMLP(nnx.Module):
    """Two-layer feed-forward with bias (GPT-NeoX): dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.up_proj = Dense(h, i, ("embed", "mlp"), bias=True, dtype=dtype, rngs=rngs)
        self.down_proj = Dense(i, h, ("mlp", "embed"), bias=True, dtype=dtype, rngs=rngs)
        self.act_name = cfg.hidden_act

    @named("mlp")
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = constrain(activation(self.act_name)(self.up_proj(x)), ("batch", None, "mlp"))
        return self.down_proj(hidden)
