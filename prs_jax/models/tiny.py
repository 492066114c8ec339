"""Tiny random HF-format checkpoints and a locally trained tokenizer (tests, the CLI demo, benchmarks).

Everything here is built on the fly, offline: a byte-level BPE tokenizer trained with `tokenizers` on a
small embedded text, saved as an HF tokenizer directory with a chat template, and random weights for any
supported architecture saved through `save_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.models.config import ModelConfig
from prs_jax.models.hf_io import save_pretrained
from prs_jax.models.transformer import CausalLM, RewardModel

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 6  # <pad>, <s>, <|end|>

# Roles are announced by their own token; every turn ends with <|end|>, which is also the EOS token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
Alignment research asks how a language model can be steered toward answers that people prefer.
A policy samples several drafts, a reward model scores them, and the best draft is kept.
Reflective sampling asks the model to critique its own draft and then to write a better one.
Preference pairs hold a chosen answer and a rejected answer for the same prompt.
The reference policy stays fixed while the trained policy moves away from it, held back by a KL penalty.
Write a short list of three fruits in alphabetical order: apple, banana, cherry.
Please answer briefly and politely. Keep the answer under twenty words and mention the deadline.
The quick brown fox jumps over the lazy dog; numbers 0 1 2 3 4 5 6 7 8 9 and symbols ( ) [ ] { } , . ; : ! ?
User: what is the capital of France? Assistant: Paris is the capital of France.
"""


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: str | list[str] | None = None,
                    model: Literal["bpe", "word"] = "bpe") -> Path:
    """Train a byte-level tokenizer and save it as an HF tokenizer directory with a chat template. `model="bpe"`
    learns BPE merges; `model="word"` keeps every pre-token of the corpus (a word with its leading space, a
    number, a punctuation run) as ONE token, up to `vocab_size` (the most frequent), anything else maps to <unk>:
    a model trained on it spends no capacity on spelling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus if corpus is not None else _CORPUS
    # a list of documents keeps their newlines (a word tokenizer needs them as tokens); a string is read by line
    lines = list(corpus) if isinstance(corpus, list) else [line for line in text.splitlines() if line]
    if model == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer: Any = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, "<unk>"],
                                                 show_progress=False)
    elif model == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        lines = lines * 4
    else:
        raise ValueError(f"build_tokenizer: model must be 'bpe' or 'word', got {model!r}")
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>",
                                 unk_token="<unk>" if model == "word" else None,
                                 additional_special_tokens=SPECIAL_TOKENS[3:6])
    hf.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out


def tiny_hf_config(model_type: str = "llama", **overrides: Any) -> dict[str, Any]:
    """An HF config dict for a tiny model of `model_type` (hidden 64, 2 layers unless overridden)."""
    base: dict[str, Any] = dict(model_type=model_type, vocab_size=512, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                tie_word_embeddings=False)
    if model_type == "gpt_neox":
        base.update(hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
    else:
        base.update(num_key_value_heads=2, hidden_act="silu", rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(overrides)
    return base


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """Give every parameter a random, non-degenerate value (norm weights near 1, biases non-zero)."""
    key = jax.random.key(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, sub = jax.random.split(key)
        leaf = var.get_value()
        name = str(path[-1])
        noise = jax.random.normal(sub, leaf.shape, jnp.float32)
        if name == "kernel":
            value = noise / np.sqrt(leaf.shape[-2])  # fan-in (a stacked kernel is [L, in, out])
        elif name == "embedding":
            value = noise
        elif any("norm" in str(p) for p in path) and name == "weight":
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        var.set_value(value.astype(leaf.dtype))
    return model


def build_checkpoint(out_dir: str | Path, model_type: str = "llama", *, seed: int = 0,
                     task: Literal["causal_lm", "reward"] = "causal_lm", head_name: str = "score",
                     tokenizer_dir: str | Path | None = None, **overrides: Any) -> Path:
    """Write a random tiny checkpoint (config + safetensors + tokenizer) to `out_dir` and return its path."""
    out = Path(out_dir)
    cfg = ModelConfig.from_hf_dict(tiny_hf_config(model_type, **overrides), source="tiny_hf_config")
    rngs = nnx.Rngs(seed)
    model: CausalLM | RewardModel
    if task == "causal_lm":
        model = CausalLM(cfg, rngs=rngs)
    else:
        model = RewardModel(cfg, head_name=head_name, rngs=rngs)
    randomize(model, seed)
    if tokenizer_dir is None:
        tokenizer_dir = build_tokenizer(out, vocab_size=min(cfg.vocab_size, 512))
    save_pretrained(model, out, tokenizer=tokenizer_dir)
    return out
