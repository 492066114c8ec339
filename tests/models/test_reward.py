"""Reward models: scores match transformers' *ForSequenceClassification; custom head names; head init."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.errors import CheckpointError
from prs_jax.models import RewardModel, from_pretrained, load_reward_model, save_pretrained
from prs_jax.models.safetensors_io import SafetensorsFile


def test_reward_matches_llama_sequence_classification(make_checkpoint, hf_ref):
    path = make_checkpoint("llama", task="reward")
    rm = load_reward_model(path)
    ref_model = hf_ref.sequence_classifier(path)
    pad = rm.config.pad_token_id
    rng = np.random.default_rng(0)
    lengths = [9, 5, 2]
    ids = np.full((3, 9), pad)
    mask = np.zeros((3, 9), np.int64)
    for i, n in enumerate(lengths):  # right padding, as HF finds the last non-pad token
        ids[i, :n] = rng.integers(3, rm.config.vocab_size, size=n)
        mask[i, :n] = 1
    ours = np.asarray(rm(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = hf_ref.run(ref_model, ids, mask=mask)[:, 0]
    assert ours.shape == (3,)
    assert np.abs(ref).max() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # left padding gives the same reward as right padding
    left = np.full_like(ids, pad)
    lmask = np.zeros_like(mask)
    for i, n in enumerate(lengths):
        left[i, 9 - n:] = ids[i, :n]
        lmask[i, 9 - n:] = 1
    np.testing.assert_allclose(np.asarray(rm(jnp.asarray(left), attention_mask=jnp.asarray(lmask))), ours,
                               atol=1e-4, rtol=0)


def test_custom_head_name_and_bias(make_checkpoint, tmp_path):
    path = make_checkpoint("llama", task="reward", head_name="regression_head")
    with pytest.raises(CheckpointError, match="regression_head|score.weight"):
        load_reward_model(path, head_name="score")
    rm = load_reward_model(path, head_name="regression_head")
    assert rm.head_name == "regression_head"
    # round trip keeps the custom head name, and from_pretrained recognises the reward model
    save_pretrained(rm, tmp_path / "rm", tokenizer=path)
    with SafetensorsFile(tmp_path / "rm" / "model.safetensors") as st:
        assert "regression_head.weight" in st.keys()
    again = from_pretrained(tmp_path / "rm")
    assert isinstance(again, RewardModel)
    ids = jnp.asarray([[5, 6, 7, 8]])
    np.testing.assert_allclose(np.asarray(again(ids)), np.asarray(rm(ids)), atol=1e-6)


def test_reward_head_initialised_on_causal_lm(llama_dir):
    with pytest.raises(CheckpointError, match="init_head"):
        load_reward_model(llama_dir)
    rm = load_reward_model(llama_dir, init_head=True, seed=3)
    assert rm.num_labels == 1
    score = rm(jnp.asarray([[5, 6, 7]]))
    assert score.shape == (1,) and np.isfinite(np.asarray(score)).all()
