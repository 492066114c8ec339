"""Incremental decoding on the KV cache reproduces the full forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import KVCache, load_causal_lm


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    ("gpt_neox", {}),
])
def test_prefill_then_steps_equals_full_forward(model_type, overrides, make_checkpoint):
    model = load_causal_lm(make_checkpoint(model_type, **overrides))
    rng = np.random.default_rng(0)
    t_prompt, t_new = 6, 5
    lengths = np.array([6, 4, 1])
    ids = rng.integers(3, model.config.vocab_size, size=(3, t_prompt + t_new))
    # left-padded prompts; every row then decodes t_new tokens one at a time
    prompt_mask = np.arange(t_prompt)[None, :] >= (t_prompt - lengths)[:, None]
    full_mask = np.concatenate([prompt_mask, np.ones((3, t_new), bool)], axis=1)
    full, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(full_mask))

    cache = KVCache.init(model.config, 3, t_prompt + t_new + 2)
    step = jax.jit(lambda m, x, c, mask: m(x, attention_mask=mask, cache=c))
    logits, cache = step(model, jnp.asarray(ids[:, :t_prompt]), cache, jnp.asarray(prompt_mask))
    np.testing.assert_allclose(np.asarray(logits)[prompt_mask], np.asarray(full)[:, :t_prompt][prompt_mask],
                               atol=1e-4, rtol=0)
    for j in range(t_new):
        col = t_prompt + j
        logits, cache = step(model, jnp.asarray(ids[:, col:col + 1]), cache, jnp.ones((3, 1), bool))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], np.asarray(full)[:, col], atol=1e-4, rtol=0)
    assert int(cache.index) == t_prompt + t_new
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + t_new)


def test_chunked_prefill_equals_one_shot(llama_dir):
    model = load_causal_lm(llama_dir)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 500, size=(2, 10)))
    full, _ = model(ids)
    cache = KVCache.init(model.config, 2, 16)
    a, cache = model(ids[:, :7], cache=cache)
    b, cache = model(ids[:, 7:], cache=cache)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), np.asarray(full), atol=1e-4, rtol=0)


def test_cascade_sliding_window_guard_counts_the_outer_level(make_checkpoint):
    """Cascade decoding has no window masking, so a context longer than the window must be refused; with an outer
    level the context is outer + group prefix + suffix (the group prefix alone fits)."""
    from prs_jax.models.layers import CascadeCache

    model = load_causal_lm(make_checkpoint("mistral", num_key_value_heads=2, sliding_window=8))
    cfg = model.config
    kh, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    pk = tuple(jnp.zeros((1, kh, 4, d)) for _ in range(layers))
    mask = jnp.ones((1, 4), bool)
    x = jnp.asarray([[5]], jnp.int32)
    two = CascadeCache.init(cfg, pk, pk, mask, 1, 4)  # 4 + 4 slots: within the window
    model(x, cache=two)
    ok = tuple(jnp.zeros((1, kh, 4, d)) for _ in range(layers))
    outer = (ok, ok, jnp.ones((1, 4), bool), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32), 1)
    three = CascadeCache.init(cfg, pk, pk, mask, 1, 4, outer=outer)  # 4 + 4 + 4 slots > 8
    with pytest.raises(NotImplementedError, match="sliding_window=8 over contexts of up to 12 tokens"):
        model(x, cache=three)
