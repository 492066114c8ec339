"""The installed jax does not carry a known silent CPU miscompile.

jax/jaxlib 0.10.2 return wrong values from a jitted, vmapped matrix-vector product followed by a reduction once
the batch passes 2^15 rows in float32 (jax-ml/jax#39103; 0.10.1 is correct). pyproject.toml excludes 0.10.2; this
test fails loudly where an environment installs it anyway (e.g. a pinned lock file)."""

import jax
import jax.numpy as jnp
import numpy as np


def test_jitted_vmapped_matvec_reduction_is_exact():
    n = 32_769
    i = jnp.arange(n, dtype=jnp.float32)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    eye = jnp.eye(3, dtype=jnp.float32)

    def f(rows):
        return jax.vmap(lambda row: jnp.sum((eye @ row) ** 2))(rows)

    expected = np.arange(n, dtype=np.float32) ** 2  # i*i + 0 + 0: one correctly rounded float32 product per row
    got = np.asarray(jax.jit(f)(x))
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (f"jax {jax.__version__}: jit(vmap(matvec + sum)) is wrong at {bad.size} of {n} rows "
                           f"(first: row {bad[0]}, {got[bad[0]]} != {expected[bad[0]]}); this is jax-ml/jax#39103, "
                           "install another jax version (pyproject.toml excludes 0.10.2)")
