"""Scanning over layers (`scan_layers`): the decoder layers are stored stacked (one Block, a leading layer axis)
and a cache-free forward scans over them. Loaded from the same HF checkpoint, a stacked model computes what the
per-layer model computes (logits, loss and gradients to float tolerance, with and without per-layer remat, Llama
and GPT-NeoX); cached forwards (prefill, decoding, the tree engine's cascade cache) match; save_pretrained
writes the same HF tensors; the layer axis is never sharded (on an 8-device mesh a stacked model computes the
same logits, and a Trainer step keeps its stacked parameters and AdamW moments split the same way); AdamW does
not decay stacked norms or biases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prs_jax.models import KVCache, load_causal_lm, load_tokenizer, save_pretrained
from prs_jax.models.hf_io import _slot
from prs_jax.models.safetensors_io import SafetensorsFile, iter_checkpoint_files
from prs_jax.models.sharding import DEFAULT_RULES, LAYER_AXIS, _spec_for
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.sampling import SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LAYERS = 3


def _inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 500, size=(3, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None, :] >= np.array([0, 2, 5])[:, None])
    return ids, mask


def _loss_and_grads(model, ids, mask, remat, scan=None):
    """Next-token loss and its gradients as {parameter path: array}."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        m = nnx.merge(graphdef, p, rest)
        hidden, _ = m.model(ids, attention_mask=mask, remat=remat, scan=scan)
        logp = jax.nn.log_softmax(m.unembed(hidden[:, :-1]), axis=-1)
        tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(mask[:, 1:], tok, 0.0))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), {p: v.get_value() for p, v in nnx.to_flat_state(grads)}


def _per_layer(grads_stacked: dict, paths) -> dict:
    """Stacked gradients mapped to the per-layer model's paths (layer i: slice i of the stack)."""
    out = {}
    for path in paths:
        where, index = _slot(path, grads_stacked)
        out[path] = grads_stacked[where] if index is None else grads_stacked[where][index]
    return out


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def pair(request, make_checkpoint):
    """(checkpoint, per-layer model, stacked model) loaded from one HF checkpoint."""
    path = make_checkpoint(request.param, num_hidden_layers=LAYERS)
    return path, load_causal_lm(path), load_causal_lm(path, scan_layers=True)


def test_stacked_storage(pair):
    _, plain, scanned = pair
    assert scanned.model.scan_layers and not plain.model.scan_layers
    stacked = dict(nnx.to_flat_state(nnx.state(scanned.model.layers, nnx.Param)))
    assert stacked and all(v.get_value().shape[0] == LAYERS for v in stacked.values())
    assert all(v.get_metadata()["logical_axes"][0] == LAYER_AXIS for v in stacked.values())
    one = dict(nnx.to_flat_state(nnx.state(plain.model.layers[0], nnx.Param)))
    assert set(one) == set(stacked)  # the same Block, one leading axis more
    for p, v in stacked.items():
        assert v.get_value().shape[1:] == one[p].get_value().shape
        assert v.get_metadata()["logical_axes"][1:] == one[p].get_metadata()["logical_axes"]
    n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert n(scanned) == n(plain)
    layer1 = nnx.state(scanned.model.layer(1), nnx.Param)
    for a, b in zip(jax.tree.leaves(layer1), jax.tree.leaves(nnx.state(plain.model.layers[1], nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_equals_unrolled(pair, remat):
    _, plain, scanned = pair
    ids, mask = _inputs()
    fwd = nnx.jit(lambda m, x, k: m(x, attention_mask=k)[0])
    want, got = np.asarray(fwd(plain, ids, mask)), np.asarray(fwd(scanned, ids, mask))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # the scanned program loops over the layers
    hlo = jax.jit(lambda s, x, k: nnx.merge(nnx.graphdef(scanned), s)(x, attention_mask=k)[0]).lower(
        nnx.state(scanned), ids, mask).as_text()
    assert "while" in hlo
    v0, g0 = _loss_and_grads(plain, ids, mask, remat=False)
    v, g = _loss_and_grads(scanned, ids, mask, remat=remat)
    assert v == pytest.approx(v0, rel=1e-5)
    g = _per_layer(g, g0)
    assert len(g) == len(g0) == len(jax.tree.leaves(nnx.state(plain, nnx.Param)))
    for p in g0:
        np.testing.assert_allclose(np.asarray(g[p]), np.asarray(g0[p]), atol=2e-5, rtol=1e-4, err_msg=str(p))
    # scan=False runs the stacked layers unrolled: the same loss
    v_unrolled, _ = _loss_and_grads(scanned, ids, mask, remat=remat, scan=False)
    assert v_unrolled == pytest.approx(v0, rel=1e-5)


def test_scan_needs_stacked_storage_and_no_cache(pair):
    _, plain, scanned = pair
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="scan=True runs cache-free forwards only"):
        scanned.model(ids, attention_mask=mask, cache=KVCache.init(scanned.config, 3, 16), scan=True)
    with pytest.raises(ValueError, match="build or load the model with scan_layers=True"):
        plain.model(ids, attention_mask=mask, scan=True)


def test_prefill_and_decode_match(pair):
    _, plain, scanned = pair
    ids, mask = _inputs()
    step = nnx.jit(lambda m, x, k, c: m(x, attention_mask=k, cache=c))
    caches = [KVCache.init(m.config, 3, 16) for m in (plain, scanned)]
    (want, c0), (got, c1) = (step(m, ids, mask, c) for m, c in zip((plain, scanned), caches))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    nxt = jnp.argmax(want[:, -1:], -1).astype(jnp.int32)
    one = jnp.ones((3, 1), bool)
    for _ in range(2):  # incremental decoding
        (want, c0), (got, c1) = step(plain, nxt, one, c0), step(scanned, nxt, one, c1)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
        nxt = jnp.argmax(want[:, -1:], -1).astype(jnp.int32)
    for a, b in zip(c0.k + c0.v, c1.k + c1.v):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=0)


def test_tree_engine_matches_unrolled(pair):
    path, plain, scanned = pair
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(7, 500, size=n)) for n in (9, 4, 6)]
    greedy = []
    for m in (plain, scanned):  # flat batch: one greedy child per prompt
        eng = TreeEngine(m, None, seed=0, eos_ids=(), pad_id=0)
        kids = eng.expand(eng.add_prompts(prompts), 1, SamplingParams(greedy=True), max_new_tokens=6)
        greedy.append([(k.tokens, k.logprobs) for (k,) in kids])
    for (t0, l0), (t1, l1) in zip(*greedy):
        assert list(t1) == list(t0)
        np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-4)
    tok = load_tokenizer(path)
    trees = []
    for m in (plain, scanned):  # shared-prefix expansion: the cascade cache
        eng = TreeEngine(m, tok, seed=0)
        roots = eng.add_prompts(["one two three", "four"])
        kids = eng.expand(roots, 3, SamplingParams(temperature=1.0), max_new_tokens=5)
        trees.append([[(k.tokens, k.logprobs) for k in ks] for ks in kids])
    for ks0, ks1 in zip(*trees):
        for (t0, l0), (t1, l1) in zip(ks0, ks1):
            assert list(t1) == list(t0)
            np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), atol=1e-4)


def test_save_pretrained_round_trip(pair, tmp_path):
    path, _, scanned = pair
    out = save_pretrained(scanned, tmp_path / "export")

    def tensors(d):
        found = {}
        for file in iter_checkpoint_files(d):
            with SafetensorsFile(file) as st:
                found.update({k: np.array(st.get(k)) for k in st.keys()})
        return found

    want, got = tensors(path), tensors(out)
    assert set(got) == set(want) and any(".layers.2." in k for k in got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_layer_axis_is_never_sharded():
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    spec = _spec_for((4, 64, 128), (LAYER_AXIS, "embed", "mlp"), mesh, DEFAULT_RULES)
    assert tuple(spec) == (None, "fsdp", "tensor")
    assert tuple(_spec_for((4, 64), (LAYER_AXIS, "norm"), mesh, DEFAULT_RULES)) == (None, None)


def test_weight_decay_skips_stacked_norms_and_biases(pair, tmp_path):
    from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig

    _, _, scanned = pair
    tr = Trainer(scanned, lambda m, b, s: (0.0, {}), TrainerConfig(out_dir=str(tmp_path / "run"), progress=False,
                                                                   tensorboard=False),
                 OptimConfig(lr=0.1, weight_decay=0.5))
    params = tr._params
    updates, _ = tr.tx.update(jax.tree.map(jnp.zeros_like, params), tr.tx.init(params), params)
    decayed = {k for k, u in updates.items() if float(jnp.max(jnp.abs(u))) > 0}
    stacked_norms = {k for k in params if "norm" in k and "'layers'" in k and params[k].ndim == 2}
    stacked_biases = {k for k in params if "['layers']" in k and "['bias']" in k}
    assert stacked_norms and not decayed & (stacked_norms | stacked_biases)
    kernels = {k for k in params if "['layers']" in k and "kernel" in k}
    assert kernels and kernels <= decayed


SHARDED_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import sys
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from prs_jax.models import KVCache, MeshConfig, load_causal_lm
    from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig

    path = sys.argv[1]
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 500, size=(4, 12)))
    mask = jnp.asarray(np.arange(12)[None, :] >= np.array([0, 3, 5, 11])[:, None])
    ref, _ = load_causal_lm(path)(ids, attention_mask=mask)
    mesh = MeshConfig(fsdp=2, tensor=4).make_mesh()
    model = load_causal_lm(path, mesh=mesh, scan_layers=True)
    q = model.model.layers.self_attn.q_proj.kernel[...]
    assert q.shape[0] == 3 and tuple(q.sharding.spec) == (None, "fsdp", "tensor"), q.sharding
    with jax.set_mesh(mesh):
        out, _ = nnx.jit(lambda m, x, k: m(x, attention_mask=k))(model, ids, mask)
        cached, _ = nnx.jit(lambda m, x, k, c: m(x, attention_mask=k, cache=c))(
            model, ids, mask, KVCache.init(model.config, 4, 16))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=0)
    real = np.asarray(mask)  # a cached prefill leaves padding positions undefined
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(ref)[real], atol=1e-4, rtol=0)

    def loss_fn(m, batch, static):
        hidden, _ = m.model(batch["ids"], attention_mask=batch["mask"], remat=True)
        lp = jax.nn.log_softmax(m.unembed(hidden[:, :-1]), -1)
        return -jnp.mean(jnp.take_along_axis(lp, batch["ids"][:, 1:, None], -1)), {}

    # a Trainer step on the mesh: stacked parameters and AdamW moments keep the layer axis whole
    arrays = {"ids": np.asarray(ids, np.int32), "mask": np.ones(ids.shape, bool)}
    want = float(loss_fn(load_causal_lm(path), arrays, None)[0])
    cfg = TrainerConfig(out_dir=sys.argv[2], steps=1, batch_size=4, progress=False, tensorboard=False,
                        async_checkpoint=False, mesh=MeshConfig(fsdp=2, tensor=4))
    tr = Trainer(model, loss_fn, cfg, OptimConfig(lr=1e-3, weight_decay=0.1))
    tr.start()
    params, opt, metrics = tr._train_step(tr._params, tr._opt_state_tree, tr._rest, tr._frozen_states,
                                          tr._device_batch(arrays), static=None)
    assert abs(float(metrics["loss"]) - want) < 1e-4, (float(metrics["loss"]), want)
    up = "['model']['layers']['mlp']['up_proj']['kernel'].value"
    assert tuple(params[up].sharding.spec) == (None, "fsdp", "tensor"), params[up].sharding
    mu = [l for p, l in jax.tree_util.tree_flatten_with_path(opt)[0]
          if ".mu" in jax.tree_util.keystr(p) and up in jax.tree_util.keystr(p)]
    assert len(mu) == 1 and tuple(mu[0].sharding.spec) == (None, "fsdp", "tensor"), mu
    tr.close()
    print("ALL OK")
""")


def test_stacked_model_sharded(make_checkpoint, tmp_path):
    path = make_checkpoint("llama", num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(path), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout


def test_reward_model_scans(make_checkpoint):
    from prs_jax.models import load_reward_model

    ids, mask = _inputs()
    for path, kw in ((make_checkpoint("llama", task="reward", num_hidden_layers=LAYERS), {}),
                     (make_checkpoint("gpt_neox", num_hidden_layers=LAYERS), {"init_head": True})):
        plain, scanned = (load_reward_model(path, scan_layers=s, **kw) for s in (False, True))
        fwd = nnx.jit(lambda m, x, k: m(x, attention_mask=k))
        want, got = (np.asarray(fwd(m, ids, mask)) for m in (plain, scanned))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_packed_sft_rows_through_the_scan(pair):
    """Segment masks (SFT packing) reach the scanned layers: packed log-probs of a stacked model equal the
    per-layer model's."""
    from prs_jax.data.sft import TokenizedSFT, collate_sft_packed
    from prs_jax.train.logprobs import sequence_logps

    _, plain, stacked = pair
    rng = np.random.default_rng(3)
    convs = [TokenizedSFT(rng.integers(3, 200, 4 + i).astype(np.int32), rng.integers(3, 200, 3 + i).astype(np.int32),
                          np.ones(3 + i, np.int32)) for i in range(5)]
    batch = collate_sft_packed([convs[:3], convs[3:]], max_length=64, multiple=8)
    np.testing.assert_allclose(np.asarray(sequence_logps(stacked, batch)[0]),
                               np.asarray(sequence_logps(plain, batch)[0]), rtol=2e-5, atol=2e-5)
