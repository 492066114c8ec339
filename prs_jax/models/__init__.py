"""Flax NNX decoders (Llama family, GPT-NeoX), reward models, HF checkpoint I/O, sharding, tokenizers."""

from prs_jax.models.config import ModelConfig, RopeConfig, SUPPORTED_MODEL_TYPES
from prs_jax.models.hf_io import (
    from_pretrained, load_causal_lm, load_reward_model, resolve_dtype, save_pretrained,
)
from prs_jax.models.layers import CascadeCache, KVCache
from prs_jax.models.sharding import DEFAULT_RULES, MeshConfig, MeshContext, shard_model
from prs_jax.models.tokenizer import encode_chat, load_tokenizer, render_chat
from prs_jax.models.transformer import Backbone, CausalLM, RewardModel

__all__ = [
    "Backbone", "CascadeCache", "CausalLM", "DEFAULT_RULES", "KVCache", "MeshConfig", "MeshContext", "ModelConfig", "RewardModel", "RopeConfig",
    "SUPPORTED_MODEL_TYPES", "encode_chat", "from_pretrained", "load_causal_lm", "load_reward_model",
    "load_tokenizer", "render_chat", "resolve_dtype", "save_pretrained", "shard_model",
]
