"""Scanning over layers (`scan_layers`) computes what the unrolled layer loop computes: logits and gradients to
float tolerance, with and without per-layer remat, for a HF checkpoint loaded into a scanned model; cached
forwards run unrolled and `scan=True` with a cache is refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prs_jax.models import KVCache, load_causal_lm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 500, size=(3, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] >= np.array([0, 2, 5])[:, None])
    return ids, mask


def _loss_and_grads(model, ids, mask, remat):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        hidden, _ = m.model(ids, attention_mask=mask, remat=remat)
        logp = jax.nn.log_softmax(m.unembed(hidden[:, :-1]), axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask[:, 1:], tok, 0.0))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), jax.tree.leaves(grads)


@pytest.mark.parametrize("family,remat", [("llama", True), ("gpt_neox", False)])
def test_scanned_equals_unrolled(make_checkpoint, family, remat):
    path = make_checkpoint(family, num_hidden_layers=3)
    plain = load_causal_lm(path)
    scanned = load_causal_lm(path, scan_layers=True)  # an HF checkpoint loads into a scanned model
    assert scanned.model.scan_layers and not plain.model.scan_layers
    ids, mask = _inputs()
    fwd = nnx.jit(lambda m, x, k: m(x, attention_mask=k)[0])
    want, got = np.asarray(fwd(plain, ids, mask)), np.asarray(fwd(scanned, ids, mask))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # the scanned program really loops over the layers
    hlo = jax.jit(lambda s, x, k: nnx.merge(nnx.graphdef(scanned), s)(x, attention_mask=k)[0]).lower(
        nnx.state(scanned), ids, mask).as_text()
    assert "while" in hlo
    # gradients reach every layer's own parameters (remat: the scan body is checkpointed per layer)
    v0, g0 = _loss_and_grads(plain, ids, mask, remat=False)
    v, g = _loss_and_grads(scanned, ids, mask, remat=remat)
    assert v == pytest.approx(v0, rel=1e-5)
    assert len(g) == len(g0)
    for a, b in zip(g, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)


def test_scan_with_cache(make_checkpoint):
    path = make_checkpoint("llama", num_hidden_layers=3)
    scanned = load_causal_lm(path, scan_layers=True)
    plain = load_causal_lm(path)
    ids, mask = _inputs()
    cache = KVCache.init(scanned.config, 3, 16)
    with pytest.raises(ValueError, match="scan=True runs cache-free forwards only"):
        scanned.model(ids, attention_mask=mask, cache=cache, scan=True)
    # scan_layers models prefill and decode through the unrolled loop: same logits as the plain model
    got, _ = scanned(ids, attention_mask=mask, cache=cache)
    want, _ = plain(ids, attention_mask=mask, cache=KVCache.init(plain.config, 3, 16))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
