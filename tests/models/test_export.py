"""Export round trip: load -> save_pretrained -> transformers (PyTorch) loads it -> same logits."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.models import load_causal_lm, load_tokenizer, save_pretrained


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(num_key_value_heads=2)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("gpt_neox", {}),
])
def test_round_trip_through_transformers(model_type, overrides, make_checkpoint, hf_ref, tmp_path):
    src = make_checkpoint(model_type, **overrides)
    model = load_causal_lm(src)
    out = save_pretrained(model, tmp_path / "export", tokenizer=src)
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(2, 10))
    ours, _ = model(jnp.asarray(ids))
    ref = hf_ref.run(hf_ref.causal_lm(out), ids)
    np.testing.assert_allclose(ref, np.asarray(ours), atol=1e-4, rtol=0)
    # and our loader reads its own export
    again, _ = load_causal_lm(out)(jnp.asarray(ids))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(ours))
    assert load_tokenizer(out).chat_template


def test_sharded_export_with_index_and_bf16(llama_dir, tmp_path):
    model = load_causal_lm(llama_dir)
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=64 * 1024, tokenizer=llama_dir)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    ids = jnp.asarray([[5, 9, 17, 33, 65]])
    np.testing.assert_array_equal(np.asarray(load_causal_lm(out)(ids)[0]), np.asarray(model(ids)[0]))

    bf16 = load_causal_lm(llama_dir, dtype="bfloat16")
    assert bf16.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    out16 = save_pretrained(bf16, tmp_path / "bf16")
    assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_causal_lm(out16, dtype="bfloat16")
    np.testing.assert_array_equal(np.asarray(back.model.embed_tokens.embedding[...], np.float32),
                                  np.asarray(bf16.model.embed_tokens.embedding[...], np.float32))
