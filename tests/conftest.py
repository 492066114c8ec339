"""Shared fixtures: tiny HF-format checkpoints built on the fly (random weights, local tokenizer), offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# One persistent XLA compilation cache per test session (subprocesses inherit it through the environment): the
# suite builds the same tiny models' programs in many tests and processes, and a cache hit skips the compile
# (measured: the rlaif smoke in a second process, 60 s -> 21 s). Set before jax is imported; a cache directory
# given by the caller is kept (e.g. a warm one between CI runs of the same versions).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="prs_jax_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests' models are tiny, so their time is XLA compiling, not running: LLVM's optimisation level 0 compiles
# about 1.4-1.7x faster (measured: the sr_dpo smoke 42 -> 30 s, the smoke world build 78 -> 46 s). Only the
# tests do this; a flag the caller already gave wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from prs_jax.models.tiny import build_checkpoint, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer directory with a chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """Factory: make_checkpoint(model_type, **config_overrides) -> checkpoint dir (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(model_type: str = "llama", *, task: str = "causal_lm", seed: int = 0, head_name: str = "score",
             **overrides) -> Path:
        key = (model_type, task, seed, head_name, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{model_type}-{task}")
            cache[key] = build_checkpoint(out, model_type, seed=seed, task=task, head_name=head_name,
                                          tokenizer_dir=tokenizer_dir, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(make_checkpoint) -> Path:
    """The default tiny Llama (GQA 4:2, untied)."""
    return make_checkpoint("llama")


class HFReference:
    """transformers' PyTorch implementation run on the same checkpoint: the independent reference."""

    @staticmethod
    def causal_lm(path: Path):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                    attn_implementation="eager").eval()

    @staticmethod
    def sequence_classifier(path: Path):
        import torch
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()

    @staticmethod
    def run(model, ids, mask=None, positions=None):
        """Model outputs (logits) as float32 NumPy."""
        import numpy as np
        import torch

        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(np.asarray(mask, dtype=np.int64))
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(np.asarray(positions, dtype=np.int64))
        with torch.no_grad():
            return model(torch.tensor(np.asarray(ids, dtype=np.int64)), **kwargs).logits.float().numpy()


@pytest.fixture(scope="session")
def hf_ref() -> HFReference:
    return HFReference()


@pytest.fixture(scope="session")
def run_padded():
    """run_padded(module, token_list) -> outputs of one jitted call, right-padded to a fixed 128-token shape.

    Eager NNX calls compile every primitive per new shape (seconds each on 2 cores); one jitted call on a
    fixed shape compiles once. Right padding does not change the outputs at real positions (causal mask), and
    reward models read the last real token.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    @nnx.jit
    def call(module, ids, mask):
        out = module(ids, attention_mask=mask)
        return out[0] if isinstance(out, tuple) else out

    def run(module, tokens, length: int = 128):
        tokens = list(tokens)
        assert len(tokens) <= length
        ids = np.zeros((1, length), np.int32)
        ids[0, :len(tokens)] = tokens
        mask = np.arange(length)[None, :] < len(tokens)
        out = np.asarray(call(module, jnp.asarray(ids), jnp.asarray(mask)))
        return out[0, :len(tokens)] if out.ndim == 3 else out[0]

    return run


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. One pytest process compiles thousands of XLA:CPU
    programs, each holding its own memory mappings; without this the suite approaches the kernel's
    vm.max_map_count (65530) and XLA's compiler crashed (SIGSEGV) near the end of the run."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    """Report the process's memory mappings (the resource the fixture above keeps bounded)."""
    try:
        with open("/proc/self/maps") as fh:
            print(f"\n[conftest] memory mappings at the end of the session: {sum(1 for _ in fh)}")
    except OSError:
        pass


@pytest.fixture(scope="session")
def smoke_world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root directory holding the smoke-size synthetic world, built once per test session and shared by every
    study's smoke test and the quickstart; pass it as `source.world.root` (or `--world-root`) with preset "smoke"."""
    from filelock import FileLock

    from prs_jax.experiments.common import WorldSpec, build_world_from

    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers share one build (the first builds it)
        root = tmp_path_factory.getbasetemp().parent / "worlds"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("worlds")
    with FileLock(str(root / ".build.lock")):
        build_world_from(WorldSpec(preset="smoke", root=str(root)))
    return root


@pytest.fixture(scope="session")
def smoke_world(smoke_world_root: Path):
    """The BuiltWorld of the smoke preset (policy, reward model, tokenizer, held-out prompts)."""
    from prs_jax.experiments.common import WorldSpec, build_world_from

    return build_world_from(WorldSpec(preset="smoke", root=str(smoke_world_root)))
