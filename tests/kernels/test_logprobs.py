"""The Pallas token log-prob kernel (interpret mode on CPU) against a float64 NumPy reference and plain JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.kernels.logprobs import token_logprobs_pallas, token_logprobs_reference


def _numpy_reference(hidden, w, targets, cot):
    """float64 log_softmax(h @ w)[t] and the exact grads of sum(cot * logp): (onehot - softmax) * cot."""
    h, w_ = np.asarray(hidden, np.float64), np.asarray(w, np.float64)
    logits = h @ w_
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    rows = np.arange(len(targets))
    logp = logits[rows, targets] - lse
    onehot = np.zeros_like(logits)
    onehot[rows, targets] = 1.0
    dlogits = np.asarray(cot, np.float64)[:, None] * (onehot - np.exp(logits - lse[:, None]))
    return logp, dlogits @ w_.T, h.T @ dlogits


def _problem(seed: int, n: int, d: int, v: int, dtype=np.float32):
    """NumPy inputs (no JAX compiles): hidden [n, d], w [d, v], targets [n] covering 0 and v-1, cotangent [n]."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((d, v)) * (2.0 / np.sqrt(d))).astype(dtype)
    targets = rng.integers(0, v, n).astype(np.int32)
    targets[0] = v - 1  # the last id lies in the padded last vocabulary block
    targets[-1] = 0
    cot = rng.standard_normal(n).astype(np.float32)
    return hidden, w, targets, cot


def _value_and_grads(fn, hidden, w, targets, cot):
    """logp and (d hidden, d w) of sum(cot * fn(hidden, w, targets)), jitted."""
    def loss(h, w_, t, c):
        logp = fn(h, w_, t)
        return jnp.sum(c * logp), logp

    (_, logp), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, w, targets, cot)
    return logp, grads


def _assert_close(got, want, atol, rtol):
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), r, atol=atol, rtol=rtol)


def _check(n, d, v, block_rows, block_vocab, seed=0, atol=3e-5, rtol=3e-5):
    hidden, w, targets, cot = _problem(seed, n, d, v)
    kernel = lambda h, w_, t: token_logprobs_pallas(h, w_, t, block_rows=block_rows,  # noqa: E731
                                                    block_vocab=block_vocab)
    logp, (dh, dw) = _value_and_grads(kernel, hidden, w, targets, cot)
    assert logp.shape == (n,) and logp.dtype == jnp.float32
    assert dh.shape == hidden.shape and dh.dtype == jnp.float32
    assert dw.shape == w.shape and dw.dtype == jnp.float32
    _assert_close((logp, dh, dw), _numpy_reference(hidden, w, targets, cot), atol, rtol)


@pytest.mark.parametrize(
    "n,d,v,block_rows,block_vocab",
    [
        (32, 16, 256, 16, 64),    # divisible in both directions
        (37, 16, 300, 16, 64),    # ragged rows and vocabulary
        (5, 8, 1000, 8, 128),     # one row block, many vocab blocks, ragged last one
        (1, 8, 7, 8, 16),         # single row, tiny vocabulary
    ],
)
def test_kernel_matches_reference(n, d, v, block_rows, block_vocab):
    _check(n, d, v, block_rows, block_vocab)


# Each example compiles the interpreted kernels afresh (about 1-2 s on 2 cores): keep the count small.
@settings(max_examples=6, deadline=None)
@given(
    n=st.integers(1, 70),
    d=st.integers(1, 40),
    v=st.integers(2, 700),
    block_rows=st.sampled_from([8, 16, 32]),
    block_vocab=st.sampled_from([16, 32, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_random_shapes(n, d, v, block_rows, block_vocab, seed):
    _check(n, d, v, block_rows, block_vocab, seed=seed)


def test_jax_reference_matches_numpy():
    hidden, w, targets, cot = _problem(1, 13, 8, 70)
    logp, grads = _value_and_grads(token_logprobs_reference, hidden, w, targets, cot)
    _assert_close((logp, *grads), _numpy_reference(hidden, w, targets, cot), 3e-5, 3e-5)


def test_kernel_bf16_inputs():
    hidden, w, targets, cot = _problem(3, 24, 32, 333, ml_dtypes.bfloat16)
    kernel = lambda h, w_, t: token_logprobs_pallas(h, w_, t, block_rows=8, block_vocab=64)  # noqa: E731
    logp, (dh, dw) = _value_and_grads(kernel, hidden, w, targets, cot)
    assert logp.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    ref_logp, ref_dh, ref_dw = _numpy_reference(hidden.astype(np.float32), w.astype(np.float32), targets, cot)
    # bf16 inputs, f32 accumulation: log-probs are close; cotangents are rounded to bf16.
    np.testing.assert_allclose(logp, ref_logp, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(dh, np.float64), ref_dh, atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), ref_dw, atol=2e-2, rtol=2e-2)


def test_kernel_large_logits_are_stable():
    hidden, w, targets, cot = _problem(4, 16, 8, 200)
    hidden = hidden * 300.0  # logits in the thousands: a naive exp overflows
    logp = token_logprobs_pallas(hidden, w, targets, block_rows=8, block_vocab=32)
    assert np.all(np.isfinite(logp)) and np.all(np.asarray(logp) <= 0.0)
    np.testing.assert_allclose(logp, _numpy_reference(hidden, w, targets, cot)[0], atol=1e-3, rtol=1e-5)


def test_interpret_default_on_cpu_and_default_blocks():
    hidden, w, targets, cot = _problem(5, 20, 8, 100)
    # Default block sizes (128 x 512) exceed the problem; interpret=None picks interpret mode on CPU.
    logp = token_logprobs_pallas(hidden, w, targets)
    np.testing.assert_allclose(logp, _numpy_reference(hidden, w, targets, cot)[0], atol=3e-5, rtol=3e-5)


def test_kernel_rejects_bad_shapes():
    hidden, w, targets, _ = _problem(6, 8, 4, 16)
    with pytest.raises(ValueError, match="shapes disagree"):
        token_logprobs_pallas(hidden, w.T, targets)
    with pytest.raises(ValueError, match="expected hidden"):
        token_logprobs_pallas(hidden[None], w, targets)
    with pytest.raises(ValueError, match="integer"):
        token_logprobs_pallas(hidden, w, targets.astype(np.float32))
