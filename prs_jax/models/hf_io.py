"""Load and export Hugging Face checkpoint directories (config.json + safetensors shards + tokenizer files).

Loading builds the module with `nnx.eval_shape` (no allocation), then fills it tensor by tensor from the
memory-mapped shards, placing each leaf directly with its target sharding: the host never holds more than
one tensor. Every HF tensor name maps to our parameter paths by a small table per family; the same table,
read backwards, exports. The table names per-layer paths (`model.layers.{i}...`); in a `scan_layers` model,
whose decoder layers are stored stacked, such a path is slice i of the stacked parameter (`_slot`), written
on the device one layer at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from prs_jax.errors import CheckpointError
from prs_jax.models.config import ModelConfig
from prs_jax.models.safetensors_io import SafetensorsFile, iter_checkpoint_files, save_file
from prs_jax.models.sharding import logical_to_sharding
from prs_jax.models.transformer import CausalLM, RewardModel

Path_ = tuple[Any, ...]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "generation_config.json")
# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """A JAX dtype from a name ('float32', 'bfloat16', 'float16') or a dtype."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")
        return jnp.dtype(_DTYPES[dtype])
    return jnp.dtype(dtype)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more of our parameters."""

    hf_name: str
    paths: tuple[Path_, ...]
    load: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    save: Callable[..., np.ndarray]


def _same(path: Path_, name: str) -> TensorRule:
    return TensorRule(name, (path,), lambda a: (a,), lambda a: a)


def _linear(path: Path_, name: str) -> TensorRule:
    # HF nn.Linear stores [out, in]; our kernels are [in, out].
    return TensorRule(name, (path,), lambda a: (a.T,), lambda a: a.T)


def _fused_qkv_weight(prefix: Path_, name: str, heads: int, head_dim: int) -> TensorRule:
    # GPT-NeoX: rows are laid out per head as [q(D), k(D), v(D)].
    paths = tuple(prefix + (p, "kernel") for p in ("q_proj", "k_proj", "v_proj"))

    def load(a: np.ndarray) -> tuple[np.ndarray, ...]:
        w = a.reshape(heads, 3, head_dim, a.shape[-1])
        return tuple(w[:, j].reshape(heads * head_dim, -1).T for j in range(3))

    def save(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        parts = [x.T.reshape(heads, 1, head_dim, -1) for x in (q, k, v)]
        return np.concatenate(parts, axis=1).reshape(3 * heads * head_dim, -1)

    return TensorRule(name, paths, load, save)


def _fused_qkv_bias(prefix: Path_, name: str, heads: int, head_dim: int) -> TensorRule:
    paths = tuple(prefix + (p, "bias") for p in ("q_proj", "k_proj", "v_proj"))

    def load(a: np.ndarray) -> tuple[np.ndarray, ...]:
        b = a.reshape(heads, 3, head_dim)
        return tuple(b[:, j].reshape(-1) for j in range(3))

    def save(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.stack([x.reshape(heads, head_dim) for x in (q, k, v)], axis=1).reshape(-1)

    return TensorRule(name, paths, load, save)


def _llama_rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    rules = [_same(("model", "embed_tokens", "embedding"), f"{prefix}embed_tokens.weight"),
             _same(("model", "norm", "weight"), f"{prefix}norm.weight")]
    for i in range(cfg.num_hidden_layers):
        base, hf = ("model", "layers", i), f"{prefix}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rules.append(_same(base + (norm, "weight"), f"{hf}{norm}.weight"))
        for proj, has_bias in (("q_proj", cfg.qkv_bias), ("k_proj", cfg.qkv_bias), ("v_proj", cfg.qkv_bias),
                               ("o_proj", cfg.o_bias)):
            rules.append(_linear(base + ("self_attn", proj, "kernel"), f"{hf}self_attn.{proj}.weight"))
            if has_bias:
                rules.append(_same(base + ("self_attn", proj, "bias"), f"{hf}self_attn.{proj}.bias"))
        if cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                rules.append(_same(base + ("self_attn", norm, "weight"), f"{hf}self_attn.{norm}.weight"))
        for proj in ("gate_proj", "up_proj", "down_proj"):
            rules.append(_linear(base + ("mlp", proj, "kernel"), f"{hf}mlp.{proj}.weight"))
            if cfg.mlp_bias:
                rules.append(_same(base + ("mlp", proj, "bias"), f"{hf}mlp.{proj}.bias"))
    return rules


def _neox_rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    rules = [_same(("model", "embed_tokens", "embedding"), f"{prefix}embed_in.weight")]
    for p in ("weight", "bias"):
        rules.append(_same(("model", "norm", p), f"{prefix}final_layer_norm.{p}"))
    for i in range(cfg.num_hidden_layers):
        base, hf = ("model", "layers", i), f"{prefix}layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for p in ("weight", "bias"):
                rules.append(_same(base + (norm, p), f"{hf}{norm}.{p}"))
        attn = base + ("self_attn",)
        rules.append(_fused_qkv_weight(attn, f"{hf}attention.query_key_value.weight", cfg.num_attention_heads,
                                       cfg.head_dim))
        rules.append(_fused_qkv_bias(attn, f"{hf}attention.query_key_value.bias", cfg.num_attention_heads,
                                     cfg.head_dim))
        rules.append(_linear(attn + ("o_proj", "kernel"), f"{hf}attention.dense.weight"))
        rules.append(_same(attn + ("o_proj", "bias"), f"{hf}attention.dense.bias"))
        for ours, theirs in (("up_proj", "dense_h_to_4h"), ("down_proj", "dense_4h_to_h")):
            rules.append(_linear(base + ("mlp", ours, "kernel"), f"{hf}mlp.{theirs}.weight"))
            rules.append(_same(base + ("mlp", ours, "bias"), f"{hf}mlp.{theirs}.bias"))
    return rules


def tensor_rules(cfg: ModelConfig, task: Literal["causal_lm", "reward"], head_name: str = "score",
                 head_bias: bool = False) -> list[TensorRule]:
    """The HF <-> prs_jax name table for a model of `cfg` used as a causal LM or a reward model."""
    if cfg.family == "llama":
        rules = _llama_rules(cfg, "model.")
        lm_head = "lm_head.weight"
    else:
        rules = _neox_rules(cfg, "gpt_neox.")
        lm_head = "embed_out.weight"
    if task == "causal_lm":
        if not cfg.tie_word_embeddings:
            rules.append(_linear(("lm_head", "kernel"), lm_head))
    else:
        rules.append(_linear(("head", "kernel"), f"{head_name}.weight"))
        if head_bias:
            rules.append(_same(("head", "bias"), f"{head_name}.bias"))
    return rules


def _checkpoint_names(model_dir: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for file in iter_checkpoint_files(model_dir):
        with SafetensorsFile(file) as st:
            for k in st.keys():
                names[k] = file
    return names


def _slot(path: Path_, variables: Mapping[Path_, Any]) -> tuple[Path_, int | None]:
    """Where a rule's parameter path lives in the model: the path itself (index None), or, for a per-layer path
    ("model", "layers", i, ...) of a model with stacked layers, slice i of the stacked ("model", "layers", ...)."""
    if path in variables:
        return path, None
    if len(path) > 3 and path[:2] == ("model", "layers") and isinstance(path[2], int):
        stacked = path[:2] + path[3:]
        if stacked in variables:
            return stacked, path[2]
    raise KeyError(f"parameter {'.'.join(map(str, path))} is not in the model (neither per layer nor stacked)")


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, value: jax.Array, i: jax.Array) -> jax.Array:
    """`stacked` with layer i replaced by `value`, in place (the stack is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), i, 0)


def _place(host: np.ndarray, var: nnx.Variable, index: int | None, mesh: Mesh | None,
           sharding_rules: Mapping[str, tuple[str, ...]] | None, started: set[int]) -> None:
    """Put `host` on the device(s) as `var`'s value (index None) or as layer `index` of the stacked `var`."""
    axes = var.get_metadata().get("logical_axes")
    if index is None:
        sharding = logical_to_sharding(host.shape, axes, mesh, sharding_rules) if mesh is not None else None
        var.set_value(jax.device_put(host, sharding) if sharding is not None else jax.device_put(host))
        return
    if id(var) not in started:  # first layer written: allocate the stack (on the mesh if there is one)
        want = var.get_value()
        sharding = logical_to_sharding(want.shape, axes, mesh, sharding_rules) if mesh is not None else None
        zeros = (jnp.zeros(want.shape, host.dtype) if sharding is None
                 else jax.jit(lambda: jnp.zeros(want.shape, host.dtype), out_shardings=sharding)())
        var.set_value(zeros)
        started.add(id(var))
    if mesh is not None:  # the layer lands split like the stack's other axes
        host = jax.device_put(host, logical_to_sharding(host.shape, tuple(axes)[1:], mesh, sharding_rules))
    var.set_value(_set_layer(var.get_value(), host, jnp.int32(index)))


def _load_into(model_fn: Callable[[], nnx.Module], rules: list[TensorRule], model_dir: Path, dtype: jnp.dtype,
               mesh: Mesh | None, sharding_rules: Mapping[str, tuple[str, ...]] | None,
               ignore: Callable[[str], bool], allow_missing: Callable[[Path_], bool], seed: int = 0) -> nnx.Module:
    abstract = nnx.eval_shape(model_fn)
    graphdef, state = nnx.split(abstract)
    variables: dict[Path_, nnx.Variable] = dict(nnx.to_flat_state(state))
    by_name = {r.hf_name: r for r in rules}
    slots = {p: _slot(p, variables) for r in rules for p in r.paths}
    filled: set[Path_] = set()  # rule paths written
    started: set[int] = set()  # stacked variables allocated
    for file in iter_checkpoint_files(model_dir):
        with SafetensorsFile(file) as st:
            for name in st.keys():
                rule = by_name.get(name)
                if rule is None:
                    if ignore(name) or name.endswith(_IGNORED_SUFFIXES):
                        continue
                    raise CheckpointError(
                        f"{file}: unexpected tensor {name!r} for a {abstract.config.model_type} "
                        f"{type(abstract).__name__}; the checkpoint does not match config.json "
                        f"(layers={abstract.config.num_hidden_layers}, tie_word_embeddings="
                        f"{abstract.config.tie_word_embeddings}).")
                parts = rule.load(st.get(name))
                for path, arr in zip(rule.paths, parts):
                    where, index = slots[path]
                    var = variables[where]
                    want = var.get_value().shape if index is None else var.get_value().shape[1:]
                    if tuple(arr.shape) != tuple(want):
                        raise CheckpointError(
                            f"{file}: tensor {name!r} has shape {list(st.shape(name))}, which maps to "
                            f"{list(arr.shape)} for parameter {'.'.join(map(str, path))}, expected "
                            f"{list(want)} from config.json.")
                    _place(np.asarray(arr, dtype=dtype), var, index, mesh, sharding_rules, started)
                    filled.add(path)
    covered = {where for where, _ in slots.values()}
    missing = [p for p in slots if p not in filled and not allow_missing(p)]
    missing += [p for p in variables if p not in covered and not allow_missing(p)]
    if missing:
        reverse = {p: r.hf_name for r in rules for p in r.paths}
        names = sorted({reverse.get(p, ".".join(map(str, p))) for p in missing})
        shown = ", ".join(repr(n) for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise CheckpointError(f"{model_dir}: missing tensor(s) {shown} in the safetensors files.")
    written = {slots[p][0] for p in filled}
    key = jax.random.key(seed)
    for path, var in variables.items():
        if path in written:
            continue
        # Allowed-missing parameters (a fresh reward head) start like HF's init: N(0, 0.02) weights, zero bias.
        key, sub = jax.random.split(key)
        want = var.get_value()
        value = (jax.random.normal(sub, want.shape, jnp.float32) * 0.02 if path[-1] == "kernel"
                 else jnp.zeros(want.shape, jnp.float32))
        var.set_value(value.astype(dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(list(variables.items())))


def load_causal_lm(model_dir: str | Path, *, dtype: Any = "float32", mesh: Mesh | None = None,
                   sharding_rules: Mapping[str, tuple[str, ...]] | None = None, scan_layers: bool = False
                   ) -> CausalLM:
    """A `CausalLM` from a local HF checkpoint directory (Llama, Mistral, Qwen2/3, GPT-NeoX). `scan_layers`:
    store the decoder layers stacked and scan over them (same values; see `prs_jax.models.transformer`)."""
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dt = resolve_dtype(dtype)
    rules = tensor_rules(cfg, "causal_lm")
    lm_head = "lm_head.weight" if cfg.family == "llama" else "embed_out.weight"
    # Tied checkpoints sometimes store the (identical) output matrix too; classification heads are not ours.
    ignore = (lambda n: n == lm_head) if cfg.tie_word_embeddings else (lambda n: False)
    return _load_into(lambda: CausalLM(cfg, dtype=dt, rngs=nnx.Rngs(0), scan_layers=scan_layers), rules, model_dir,
                      dt, mesh, sharding_rules, ignore, lambda p: False)


def load_reward_model(model_dir: str | Path, *, dtype: Any = "float32", mesh: Mesh | None = None,
                      head_name: str | None = None, init_head: bool = False, seed: int = 0,
                      sharding_rules: Mapping[str, tuple[str, ...]] | None = None, scan_layers: bool = False
                      ) -> RewardModel:
    """A `RewardModel` from an HF `*ForSequenceClassification` dir (head `score`) or a custom head name.

    With `init_head=True` a causal-LM checkpoint is accepted too: its `lm_head` is ignored and the scalar
    head starts from a fresh initialisation (the usual way to start a reward model from an SFT policy).
    `scan_layers`: store the decoder layers stacked and scan over them (see `prs_jax.models.transformer`).
    """
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    dt = resolve_dtype(dtype)
    head_name = head_name or cfg.hf_config.get("prs_jax_reward_head", "score")
    names = _checkpoint_names(model_dir)
    head_bias = f"{head_name}.bias" in names
    shape = None
    for file in {names[f"{head_name}.weight"]} if f"{head_name}.weight" in names else ():
        with SafetensorsFile(file) as st:
            shape = st.shape(f"{head_name}.weight")
    if shape is None and not init_head:
        raise CheckpointError(
            f"{model_dir}: no reward head tensor {head_name + '.weight'!r}. Pass head_name=... if the head has "
            "another name (e.g. 'regression_head'), or init_head=True to start a head on a causal-LM checkpoint.")
    num_labels = int(shape[0]) if shape is not None else 1
    rules = tensor_rules(cfg, "reward", head_name=head_name, head_bias=head_bias)
    lm_head = "lm_head.weight" if cfg.family == "llama" else "embed_out.weight"
    return _load_into(
        lambda: RewardModel(cfg, num_labels=num_labels, head_name=head_name, head_bias=head_bias, dtype=dt,
                            rngs=nnx.Rngs(seed), scan_layers=scan_layers),
        rules, model_dir, dt, mesh, sharding_rules, lambda n: init_head and n == lm_head,
        lambda p: init_head and p[0] == "head", seed=seed)


def from_pretrained(model_dir: str | Path, *, dtype: Any = "float32", mesh: Mesh | None = None,
                    **kwargs: Any) -> CausalLM | RewardModel:
    """Load by the checkpoint's declared architecture: `*ForSequenceClassification` -> RewardModel."""
    cfg = ModelConfig.from_dir(model_dir)
    arch = " ".join(cfg.hf_config.get("architectures") or [])
    if "ForSequenceClassification" in arch or "prs_jax_reward_head" in cfg.hf_config:
        return load_reward_model(model_dir, dtype=dtype, mesh=mesh, **kwargs)
    return load_causal_lm(model_dir, dtype=dtype, mesh=mesh, **kwargs)


def _copy_tokenizer(tokenizer: Any, out: Path) -> None:
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in found:
        if (src / name).resolve() != (out / name).resolve():
            shutil.copy2(src / name, out / name)
    if not found:
        raise CheckpointError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) to copy.")


def _host_value(flat: Mapping[Path_, nnx.Variable], path: Path_, dtype: jnp.dtype) -> np.ndarray:
    """The value of the rule path `path` on the host (a slice of a stacked parameter for a per-layer path)."""
    where, index = _slot(path, flat)
    value = flat[where].get_value()
    return np.asarray(jax.device_get(value if index is None else value[index])).astype(dtype)


def save_pretrained(model: CausalLM | RewardModel, out_dir: str | Path, *, tokenizer: Any = None,
                    dtype: Any = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` as an HF directory (config.json, safetensors shards + index, tokenizer) for transformers.
    A `scan_layers` model writes the same per-layer tensors (slice i of each stacked parameter)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ModelConfig = model.config
    if isinstance(model, RewardModel):
        rules = tensor_rules(cfg, "reward", head_name=model.head_name, head_bias=model.head.bias is not None)
        hf_cfg = cfg.to_hf_dict("sequence_classification", num_labels=model.num_labels)
        if model.head_name != "score":
            hf_cfg["prs_jax_reward_head"] = model.head_name
    else:
        rules = tensor_rules(cfg, "causal_lm")
        hf_cfg = cfg.to_hf_dict("causal_lm")
    flat = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    first = next(iter(flat.values())).get_value()
    out_dtype = resolve_dtype(dtype) if dtype is not None else first.dtype
    hf_cfg["dtype"] = jnp.dtype(out_dtype).name
    hf_cfg.pop("torch_dtype", None)

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for rule in rules:
        parts = [_host_value(flat, p, out_dtype) for p in rule.paths]
        arr = np.ascontiguousarray(rule.save(*parts))
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][rule.hf_name] = arr
        size += arr.nbytes
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            for name, arr in shard.items():
                weight_map[name] = fname
                total += arr.nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    _copy_tokenizer(tokenizer, out)
    return out
