"""Reference log-probs computed once per data set and cached on disk (safetensors), keyed by a hash of the
reference weights, the tokenised data and the tokenizer. A run with a cache hit never loads the reference."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from prs_jax.models.safetensors_io import SafetensorsFile, iter_checkpoint_files, save_file
from prs_jax.data.batches import PairBatch
from prs_jax.models.transformer import CausalLM
from prs_jax.train.logprobs import LogProbConfig
from prs_jax.train.objectives import pair_logps

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")


def _update_file(h: "hashlib._Hash", path: Path, chunk: int = 1 << 24) -> None:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)


def cache_key(ref_dir: str | Path, arrays: Mapping[str, np.ndarray], tokenizer_dir: str | Path | None = None,
              extra: Iterable[str] = ()) -> str:
    """sha256 over the reference checkpoint (config + every weight byte), the data arrays and the tokenizer."""
    h = hashlib.sha256()
    ref_dir = Path(ref_dir)
    _update_file(h, ref_dir / "config.json")
    for f in iter_checkpoint_files(ref_dir):
        _update_file(h, f)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    tok_dir = Path(tokenizer_dir or ref_dir)
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            _update_file(h, tok_dir / name)
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:32]


def batch_arrays(batch: Any) -> dict[str, np.ndarray]:
    """The leaves of a batch pytree by path (e.g. "x.tokens"), as NumPy arrays: what `cache_key` hashes."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v) for p, v in leaves}


@functools.lru_cache(maxsize=8)
def _pair_logps_program(config: LogProbConfig):
    """One jitted (chosen, rejected) program per log-prob config; the graph definition is a static argument, so
    every model of the same architecture (e.g. the policies of a study) reuses its compiled shapes."""
    return jax.jit(lambda graphdef, state, batch, aug: pair_logps(nnx.merge(graphdef, state), batch, config,
                                                                  aug=aug)[:2], static_argnums=(0, 3))


def compute_reference(ref: CausalLM, data: PairBatch, *, batch_size: int = 8, augmented: bool = False,
                      config: LogProbConfig = LogProbConfig(), progress: bool = True) -> dict[str, np.ndarray]:
    """ref_chosen / ref_rejected (and *_aug) sequence log-probs [N] of a host PairBatch over N pairs, in batches
    of `batch_size` (the last one padded with repeats)."""
    n = len(jax.tree.leaves(data.x)[0])
    graphdef, state = nnx.split(ref)
    views = (False, True) if augmented else (False,)
    run = _pair_logps_program(config)
    out = {f"ref_{side}{'_aug' if a else ''}": np.zeros(n, np.float32) for a in views
           for side in ("chosen", "rejected")}
    for start in tqdm(range(0, n, batch_size), desc="reference log-probs", unit="batch", disable=not progress):
        idx = np.arange(start, min(start + batch_size, n))
        pad = np.concatenate([idx, np.resize(idx, batch_size - len(idx))]) if len(idx) < batch_size else idx
        for a in views:
            view = data.aug if a else data.x
            c, r = run(graphdef, state, jax.tree.map(lambda v: jnp.asarray(v[pad]), view), a)
            out[f"ref_chosen{'_aug' if a else ''}"][idx] = np.asarray(c)[:len(idx)]
            out[f"ref_rejected{'_aug' if a else ''}"][idx] = np.asarray(r)[:len(idx)]
    return out


def cached_reference(cache_dir: str | Path, key: str, compute) -> tuple[dict[str, np.ndarray], bool]:
    """Load `cache_dir/ref-logps-{key}.safetensors` or compute and write it; returns (arrays, was_cached)."""
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.is_file():
        with SafetensorsFile(path) as st:
            return {k: np.array(st.get(k)) for k in st.keys()}, True
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(arrays, tmp, metadata={"key": key})
    tmp.replace(path)
    return arrays, False
