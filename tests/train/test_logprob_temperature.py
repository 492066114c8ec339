"""token_logprobs(..., temperature=T) is log softmax(logits / T)[target] for every method, gradients included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.train.logprobs import token_logprobs


def _reference(h, w, y, t):
    logits = (h @ w) / t
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[..., None], -1)[..., 0]


@pytest.mark.parametrize("method", ["plain", "chunked"])
@pytest.mark.parametrize("t", [0.7, 1.0, 1.3])
def test_token_logprobs_at_temperature(method, t):
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 300)) * 0.5, jnp.float32)
    y = jnp.asarray(rng.integers(0, 300, size=(2, 5)), jnp.int32)
    got = token_logprobs(h, w, y, method=method, chunk_size=128, temperature=t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_reference(h, w, y, t)), rtol=1e-5, atol=1e-5)
    if t != 1.0:  # the temperature really enters
        assert np.max(np.abs(np.asarray(got - token_logprobs(h, w, y, method=method, chunk_size=128)))) > 1e-2
    g = jax.grad(lambda h, w: jnp.sum(token_logprobs(h, w, y, method=method, chunk_size=128, temperature=t)),
                 argnums=(0, 1))(h, w)
    g_ref = jax.grad(lambda h, w: jnp.sum(_reference(h, w, y, t)), argnums=(0, 1))(h, w)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_temperature_must_be_positive():
    h, w, y = jnp.zeros((1, 2, 4)), jnp.zeros((4, 8)), jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(h, w, y, temperature=0.0)


def test_engine_sample_keeps_tempered_logprobs_on_request():
    from prs_jax.tree.sampling import SamplingParams, sample

    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 50)) * 3, jnp.float32)
    u = jnp.asarray(rng.uniform(size=3), jnp.float32)
    for params, t in ((SamplingParams(temperature=0.5, tempered_logprobs=True), 0.5),
                      (SamplingParams(temperature=0.5), 1.0),  # default: the raw log-prob
                      (SamplingParams(greedy=True, tempered_logprobs=True), 1.0)):
        tok, lp = sample(logits, u, params)
        want = jnp.take_along_axis(jax.nn.log_softmax(logits / t, -1), tok[:, None], -1)[:, 0]
        np.testing.assert_allclose(np.asarray(lp), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the flag changes what is kept, never what is drawn
    assert np.array_equal(np.asarray(sample(logits, u, SamplingParams(temperature=0.5))[0]),
                          np.asarray(sample(logits, u, SamplingParams(temperature=0.5, tempered_logprobs=True))[0]))
