"""Typed model configuration, read from and written back to Hugging Face `config.json` dictionaries."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from prs_jax.errors import CheckpointError

Family = Literal["llama", "gpt_neox"]

# HF model_type -> our family. Llama-style decoders differ only by switches on one module.
_MODEL_TYPES: dict[str, Family] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gpt_neox": "gpt_neox",
}
SUPPORTED_MODEL_TYPES = tuple(_MODEL_TYPES)

_HF_CLASS = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gpt_neox": "GPTNeoX",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / legacy `rope_scaling` + `rope_theta`)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer covering Llama/Mistral/Qwen2/Qwen3 and GPT-NeoX."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections have bias
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    use_parallel_residual: bool = False  # GPT-NeoX
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # The checkpoint's own config.json, kept so that export writes back what was read.
    hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def family(self) -> Family:
        return _MODEL_TYPES[self.model_type]

    @property
    def rotary_dim(self) -> int:
        rot = int(self.head_dim * self.rope.partial_rotary_factor)
        return rot - rot % 2

    @property
    def num_params_estimate(self) -> int:
        h, i, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        mlp = (3 if self.family == "llama" else 2) * h * i
        per_layer = h * q + 2 * h * kv + q * h + mlp
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return l * per_layer + emb

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face config dict; `source` names the file in error messages."""
        model_type = cfg.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r} (architectures={cfg.get('architectures')}). "
                f"Supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
            )

        def need(key: str) -> Any:
            if key not in cfg:
                raise CheckpointError(f"{source}: required key {key!r} is missing for model_type {model_type!r}.")
            return cfg[key]

        family = _MODEL_TYPES[model_type]
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        rope_params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope_params.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise CheckpointError(
                f"{source}: rope type {rope_type!r} is not supported (supported: default, linear, llama3)."
            )
        partial = rope_params.get(
            "partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
        )
        if family == "gpt_neox" and "partial_rotary_factor" not in rope_params and "rotary_pct" not in cfg:
            partial = 0.25  # GPT-NeoX default in transformers
        rope = RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rope_params.get("original_max_position_embeddings", 8192)),
            partial_rotary_factor=float(partial),
        )
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        common = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope=rope,
            pad_token_id=cfg.get("pad_token_id"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            hf_config=dict(cfg),
        )
        if family == "gpt_neox":
            if cfg.get("attention_bias", True) is False:
                raise CheckpointError(f"{source}: GPT-NeoX without attention bias is not supported.")
            return cls(
                **common,
                num_key_value_heads=heads,
                head_dim=hidden // heads,
                norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=True,
                o_bias=True,
                mlp_bias=True,
                use_parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                hidden_act=str(cfg.get("hidden_act", "gelu")),
            )
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        act = str(cfg.get("hidden_act", "silu"))
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported for {model_type} (only 'silu').")
        attn_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = {"llama": attn_bias, "qwen3": attn_bias, "qwen2": True}.get(model_type, False)
        o_bias = {"llama": attn_bias, "qwen3": attn_bias}.get(model_type, False)
        mlp_bias = bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False
        return cls(
            **common,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            hidden_act=act,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        """Read `config.json` from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: no config.json in checkpoint directory {path}; is this an HF model dir?")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from e
        return cls.from_hf_dict(raw, source=str(file))

    def to_hf_dict(self, task: Literal["causal_lm", "sequence_classification"] = "causal_lm",
                   num_labels: int = 1) -> dict[str, Any]:
        """An HF config dict for this architecture (starting from the checkpoint's own, when there was one)."""
        out = dict(self.hf_config)
        suffix = "ForCausalLM" if task == "causal_lm" else "ForSequenceClassification"
        out["architectures"] = [_HF_CLASS[self.model_type] + suffix]
        out.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
        )
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            val = getattr(self, key)
            out[key] = list(val) if isinstance(val, tuple) else val
        rope: dict[str, Any] = {"rope_theta": self.rope.theta, "rope_type": self.rope.rope_type}
        if self.rope.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        if self.family == "gpt_neox":
            rope["partial_rotary_factor"] = self.rope.partial_rotary_factor
            out.pop("rotary_pct", None)
            out.pop("rotary_emb_base", None)
            out.update(layer_norm_eps=self.norm_eps, use_parallel_residual=self.use_parallel_residual,
                       attention_bias=True)
        else:
            out.update(num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                       rms_norm_eps=self.norm_eps)
            if self.model_type in ("llama", "qwen3"):
                out["attention_bias"] = self.qkv_bias
            if self.model_type == "llama":
                out["mlp_bias"] = self.mlp_bias
            if self.sliding_window is not None:
                out["sliding_window"] = self.sliding_window
                if self.model_type in ("qwen2", "qwen3"):
                    out["use_sliding_window"] = True
        out["rope_parameters"] = rope
        if task == "sequence_classification":
            out["num_labels"] = num_labels
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        return out

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)
