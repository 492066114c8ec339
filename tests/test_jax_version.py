"""The installed jax does not carry a known silent CPU miscompile into prs_jax's processes.

jax/jaxlib 0.10.2 return wrong values from a jitted, vmapped matrix-vector product followed by a reduction once
the batch passes 2^15 rows in float32 (jax-ml/jax#39103; 0.10.1 is correct). The fault is 0.10.2's YNNPACK reduce
fusion; importing prs_jax disables that fusion type (prs_jax/xla_workarounds.py). The reproduction runs in a fresh
process that imports prs_jax first, as a user's script does, with no XLA_FLAGS of its own."""

import os
import subprocess
import sys
import textwrap

import pytest

from prs_jax import xla_workarounds as xw

REPRO = textwrap.dedent("""
    import prs_jax  # noqa: F401  (first, as in a user's script)
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 32_769
    i = jnp.arange(n, dtype=jnp.float32)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    eye = jnp.eye(3, dtype=jnp.float32)
    got = np.asarray(jax.jit(jax.vmap(lambda row: jnp.sum((eye @ row) ** 2)))(x))
    bad = np.flatnonzero(got != np.arange(n, dtype=np.float32) ** 2)
    print(jax.__version__, bad.size, bad[:1].tolist())
""")


def test_jitted_vmapped_matvec_reduction_is_exact_after_importing_prs_jax():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # compile it here, not from a cache written under other flags
    out = subprocess.run([sys.executable, "-c", REPRO], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    version, bad, first = out.stdout.split(maxsplit=2)
    assert bad == "0", (f"jax {version}: jit(vmap(matvec + sum)) is wrong at {bad} rows (first {first}) even after "
                        "importing prs_jax; this is jax-ml/jax#39103, see prs_jax/xla_workarounds.py")


def test_workaround_flag_only_for_the_affected_jaxlib(monkeypatch):
    monkeypatch.setattr(xw, "jaxlib_version", lambda: "0.10.2")
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
    assert xw.apply(env)
    assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0 " + xw.YNN_REDUCE_OFF
    assert not xw.apply(env)  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"}
    assert not xw.apply(mine) and mine["XLA_FLAGS"].endswith("TYPE_DOT")  # the caller's own choice wins
    monkeypatch.setattr(xw, "jaxlib_version", lambda: "0.10.1")
    clean: dict = {}
    assert not xw.apply(clean) and clean == {}
    assert [xw.needs_ynn_reduce_off(v) for v in ("0.10.2", "0.10.2.post1", "0.10.2.dev20261201", "0.10.20",
                                                 "0.10.1", None)] == [True, True, True, False, False, False]


def test_no_flag_once_jax_is_initialised(monkeypatch):
    """Too late to take effect, and the compilation cache keys programs by XLA_FLAGS: warn, leave it alone."""
    monkeypatch.setattr(xw, "jaxlib_version", lambda: "0.10.2")
    monkeypatch.setattr(xw, "_compiled_already", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    with pytest.warns(RuntimeWarning, match="39103"):
        assert not xw.apply()
    assert os.environ["XLA_FLAGS"] == "--xla_backend_optimization_level=0"


@pytest.mark.skipif(not xw.needs_ynn_reduce_off(xw.jaxlib_version()), reason="jaxlib is not 0.10.2")
def test_this_process_carries_the_flag():
    assert "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", "")
