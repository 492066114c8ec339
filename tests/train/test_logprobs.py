"""Memory-efficient token log-probs (chunked, pallas) against plain log_softmax + gather; sequence sums."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.train.logprobs import sequence_logprobs, token_logprobs


def _numpy_plain(hidden_btd, w_dv, targets_bt, cot_bt):
    """float64 log_softmax + gather, and the exact grads of sum(cot * logp): (onehot - softmax) * cot."""
    b, t, d = hidden_btd.shape
    h, w = np.asarray(hidden_btd, np.float64).reshape(b * t, d), np.asarray(w_dv, np.float64)
    tg = np.asarray(targets_bt).reshape(-1)
    logits = h @ w
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    rows = np.arange(b * t)
    onehot = np.zeros_like(logits)
    onehot[rows, tg] = 1.0
    dlogits = np.asarray(cot_bt, np.float64).reshape(-1, 1) * (onehot - np.exp(logits - lse[:, None]))
    return (logits[rows, tg] - lse).reshape(b, t), (dlogits @ w.T).reshape(b, t, d), h.T @ dlogits


def _problem(seed, b, t, d, v, dtype=np.float32):
    """NumPy inputs (no JAX compiles); targets cover 0 and v-1."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((b, t, d)).astype(dtype)
    w = (rng.standard_normal((d, v)) * (2.0 / np.sqrt(d))).astype(dtype)
    targets = rng.integers(0, v, (b, t)).astype(np.int32)
    targets[0, 0], targets[-1, -1] = v - 1, 0
    cot = rng.standard_normal((b, t)).astype(np.float32)
    return hidden, w, targets, cot


def _value_and_grads(fn, hidden, w, targets, cot):
    """logp and (d hidden, d w) of sum(cot * fn(hidden, w, targets)) via jax.grad, jitted."""
    def loss(h, w_, tg, c):
        logp = fn(h, w_, tg)
        return jnp.sum(c * logp), logp

    (_, logp), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, w, targets, cot)
    return logp, grads


def _assert_matches_plain(method, hidden, w, targets, cot, atol=3e-5, rtol=3e-5, **kw):
    fn = lambda h, w_, tg: token_logprobs(h, w_, tg, method=method, **kw)  # noqa: E731
    logp, (dh, dw) = _value_and_grads(fn, hidden, w, targets, cot)
    assert logp.shape == targets.shape and logp.dtype == jnp.float32
    assert dh.dtype == hidden.dtype and dw.dtype == w.dtype
    for got, want in zip((logp, dh, dw), _numpy_plain(hidden, w, targets, cot)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=atol, rtol=rtol)


_CASES = [
    (2, 8, 16, 256, 64),     # chunk divides V
    (3, 5, 16, 300, 64),     # ragged: the last chunk overlaps the previous one
    (2, 4, 8, 100, 512),     # chunk larger than V
    (1, 3, 8, 129, 128),     # last chunk holds a single new column
]
# The kernel's own tests cover its shapes; here two cases check the dispatch (interpret mode compiles slowly).
_PALLAS_CASES = [_CASES[1], _CASES[2]]


@pytest.mark.parametrize(
    "method,b,t,d,v,chunk",
    [("plain", *c) for c in _CASES] + [("chunked", *c) for c in _CASES] + [("pallas", *c) for c in _PALLAS_CASES],
)
def test_methods_match_plain(method, b, t, d, v, chunk):
    _assert_matches_plain(method, *_problem(0, b, t, d, v), chunk_size=chunk)


@settings(max_examples=10, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 9),
    d=st.integers(1, 32),
    v=st.integers(2, 600),
    chunk=st.integers(1, 700),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_plain_random_shapes(b, t, d, v, chunk, seed):
    _assert_matches_plain("chunked", *_problem(seed, b, t, d, v), chunk_size=chunk)


def test_chunked_bf16_inputs():
    hidden, w, targets, cot = _problem(1, 2, 6, 32, 400, ml_dtypes.bfloat16)
    fn = lambda h, w_, tg: token_logprobs(h, w_, tg, method="chunked", chunk_size=96)  # noqa: E731
    logp, (dh, dw) = _value_and_grads(fn, hidden, w, targets, cot)
    assert logp.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref_logp, ref_dh, ref_dw = _numpy_plain(hidden.astype(np.float32), w.astype(np.float32), targets, cot)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dh, np.float64), ref_dh, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw, atol=2e-2, rtol=2e-2)


def test_chunked_large_logits_are_stable():
    hidden, w, targets, cot = _problem(2, 2, 4, 8, 300)
    hidden = hidden * 300.0  # logits in the thousands: a naive exp overflows
    logp = jax.jit(lambda h, w_, tg: token_logprobs(h, w_, tg, chunk_size=64))(hidden, w, targets)
    assert np.all(np.isfinite(logp)) and np.all(np.asarray(logp) <= 0.0)
    np.testing.assert_allclose(logp, _numpy_plain(hidden, w, targets, cot)[0], atol=1e-3, rtol=1e-5)


def test_chunked_temp_memory_is_well_below_plain():
    b, t, d, v = 4, 64, 64, 8192  # N = 256 rows; the [N, V] float32 logits are 8 MiB
    hidden, w, targets, cot = _problem(3, b, t, d, v)

    def temp_bytes(method, **kw):
        loss = lambda h, w_, tg, c: jnp.sum(c * token_logprobs(h, w_, tg, method=method, **kw))  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, w, targets, cot).compile()
        stats = compiled.memory_analysis()
        return None if stats is None else stats.temp_size_in_bytes

    plain = temp_bytes("plain")
    chunked = temp_bytes("chunked", chunk_size=512)
    if plain is None or chunked is None:
        pytest.skip("compiled.memory_analysis() reports nothing on this backend")
    logits_bytes = b * t * v * 4
    assert plain >= logits_bytes  # plain keeps at least the full logits
    # Chunked keeps a few [N, chunk] tiles (0.5 MiB each): at least 4x below plain (measured about 16x).
    assert chunked * 4 < plain, (chunked, plain)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)


def test_tied_embedding_transpose():
    hidden, w, targets, cot = _problem(4, 2, 3, 8, 50)
    embedding_vd = np.ascontiguousarray(w.T)  # a tied embedding table is [V, D]; pass its transpose
    got = jax.jit(lambda h, e, tg: token_logprobs(h, e.T, tg, chunk_size=16))(hidden, embedding_vd, targets)
    np.testing.assert_allclose(got, _numpy_plain(hidden, w, targets, cot)[0], atol=3e-5, rtol=3e-5)


def test_token_logprobs_rejects_bad_inputs():
    hidden, w, targets, _ = _problem(5, 2, 3, 8, 20)
    with pytest.raises(ValueError, match="unknown method"):
        token_logprobs(hidden, w, targets, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Dense"):
        token_logprobs(hidden, w.T, targets)
    with pytest.raises(ValueError, match="must match"):
        token_logprobs(hidden, w, targets[:, :2])
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(hidden, w, targets.astype(np.float32))
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, w, targets, chunk_size=-1)


def test_sequence_logprobs_masked_sums_and_counts():
    logps = np.array([[-1.0, -2.0, -np.inf, -4.0],
                      [-0.5, np.nan, -1.5, -2.5],
                      [-3.0, -3.0, -3.0, -3.0]], np.float32)
    mask = np.array([[1, 1, 0, 1],
                     [1, 0, 1, 0],
                     [0, 0, 0, 0]], np.int32)
    sums, counts = jax.jit(sequence_logprobs)(logps, mask)
    np.testing.assert_allclose(sums, [-7.0, -2.0, 0.0])
    np.testing.assert_allclose(counts, [3.0, 2.0, 0.0])
    assert sums.dtype == jnp.float32 and counts.dtype == jnp.float32
    # Boolean masks work the same; gradients reach kept positions only and no NaN leaks from dropped ones.
    grad = jax.jit(jax.grad(lambda x: jnp.sum(sequence_logprobs(x, mask.astype(bool))[0])))(logps)
    np.testing.assert_array_equal(grad, mask.astype(np.float32))
    with pytest.raises(ValueError, match="must both be"):
        sequence_logprobs(logps, mask[:, :2])


def test_sequence_logprobs_of_token_logprobs_match_plain_sums():
    hidden, w, targets, cot = _problem(6, 3, 7, 16, 120)
    mask = np.arange(7)[None, :] < np.array([7, 3, 0])[:, None]
    run = jax.jit(lambda h, w_, tg, m: sequence_logprobs(token_logprobs(h, w_, tg, chunk_size=32), m))
    sums, counts = run(hidden, w, targets, mask)
    ref = np.where(mask, _numpy_plain(hidden, w, targets, cot)[0], 0.0).sum(-1)
    np.testing.assert_allclose(sums, ref, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(counts, [7.0, 3.0, 0.0])
