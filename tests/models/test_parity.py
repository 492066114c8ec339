"""Logits of every supported family against transformers' PyTorch implementation (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import ModelConfig, load_causal_lm

TOL = 1e-4

FAMILIES = {
    "llama_gqa_llama3_rope": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_linear_rope_bias": ("llama", dict(
        attention_bias=True, mlp_bias=True, num_key_value_heads=1,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "qwen2_bias_tied": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "qwen3_qk_norm": ("qwen3", dict(num_key_value_heads=2, head_dim=32)),
    "mistral_sliding_window": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    "gpt_neox_partial_parallel": ("gpt_neox", dict(use_parallel_residual=True)),
    "gpt_neox_sequential": ("gpt_neox", dict(use_parallel_residual=False, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 0.5})),
}


def _batch(seed: int, vocab: int, b: int = 3, t: int = 12):
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(b, t))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, make_checkpoint, hf_ref):
    model_type, overrides = FAMILIES[name]
    path = make_checkpoint(model_type, **overrides)
    model = load_causal_lm(path)
    ref_model = hf_ref.causal_lm(path)
    ids = _batch(1, model.config.vocab_size)
    ours, _ = model(jnp.asarray(ids))
    ref = hf_ref.run(ref_model, ids)
    assert np.abs(ref).max() > 0.5, "degenerate reference logits; the test would prove nothing"
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama_gqa_llama3_rope", "qwen2_bias_tied", "gpt_neox_partial_parallel",
                                  "mistral_sliding_window"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_match_transformers(name, side, make_checkpoint, hf_ref):
    model_type, overrides = FAMILIES[name]
    path = make_checkpoint(model_type, **overrides)
    model = load_causal_lm(path)
    ref_model = hf_ref.causal_lm(path)
    t = 12
    lengths = [12, 7, 3]
    ids = _batch(2, model.config.vocab_size, len(lengths), t)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, t - n:] = 1
        else:
            mask[i, :n] = 1
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ours, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    ref = hf_ref.run(ref_model, ids, mask=mask, positions=positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], atol=TOL, rtol=0)
    # each padded row equals the same sequence run alone, unpadded
    for i, n in enumerate(lengths):
        alone, _ = model(jnp.asarray(ids[i][real[i]][None]))
        np.testing.assert_allclose(np.asarray(ours)[i][real[i]], np.asarray(alone)[0], atol=TOL, rtol=0)


def test_config_reads_legacy_rope_keys():
    cfg = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, rope_theta=5e5,
                                        rope_scaling={"type": "linear", "factor": 4.0}))
    assert cfg.rope.theta == 5e5 and cfg.rope.rope_type == "linear" and cfg.rope.factor == 4.0
    neox = ModelConfig.from_hf_dict(dict(model_type="gpt_neox", vocab_size=10, hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, rotary_pct=0.5,
                                         rotary_emb_base=100.0))
    assert neox.rope.partial_rotary_factor == 0.5 and neox.rope.theta == 100.0 and neox.rotary_dim == 2
