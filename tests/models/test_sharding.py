"""A forward sharded over 8 simulated CPU devices (fsdp x tensor) equals the unsharded forward; the tree engine's
decode program keeps its KV sharded on kv heads (tensor) and rows (batch axes) as the configured rules say."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from prs_jax.models import MeshConfig, load_causal_lm, load_reward_model
    import sys

    path, rm_path = sys.argv[1], sys.argv[2]
    assert len(jax.devices()) == 8, jax.devices()
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 500, size=(4, 12)))
    mask = jnp.asarray(np.arange(12)[None, :] >= np.array([0, 3, 5, 11])[:, None])
    plain = load_causal_lm(path)
    ref, _ = plain(ids, attention_mask=mask)
    for shape in [dict(data=1, fsdp=2, tensor=4), dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=8, tensor=1)]:
        mesh = MeshConfig(**shape).make_mesh()
        model = load_causal_lm(path, mesh=mesh)
        q = model.model.layers[0].self_attn.q_proj.kernel[...]
        assert len(q.sharding.device_set) == 8, q.sharding
        with jax.set_mesh(mesh):
            out, _ = nnx.jit(lambda m, x, k: m(x, attention_mask=k))(model, ids, mask)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-4, rtol=0)
        print("ok", shape, q.sharding.spec)
    mesh = MeshConfig(fsdp=2, tensor=4).make_mesh()
    rm_ref = load_reward_model(rm_path)(ids, attention_mask=mask)
    with jax.set_mesh(mesh):
        rm_out = nnx.jit(lambda m, x, k: m(x, attention_mask=k))(load_reward_model(rm_path, mesh=mesh), ids, mask)
    np.testing.assert_allclose(np.asarray(rm_out), np.asarray(rm_ref), atol=1e-4, rtol=0)
    print("ALL OK")
""")


@pytest.mark.slow  # ~23 s: three 8-device meshes compiled in a subprocess
def test_sharded_forward_equals_unsharded(make_checkpoint):
    path = make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=4)
    rm_path = make_checkpoint("llama", task="reward")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(rm_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout
    assert "('fsdp', 'tensor')" in proc.stdout or "'tensor'" in proc.stdout


ENGINE_SCRIPT = textwrap.dedent(r"""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import json, re, sys
    import prs_jax.tree.engine as E
    from prs_jax.models import MeshConfig, load_causal_lm, load_tokenizer
    from prs_jax.tree.sampling import SamplingParams

    path = sys.argv[1]
    calls = {}

    class Spy:  # records the KV pool the engine's decode program returns and its lowered text (in the engine's scope)
        def __init__(self, fn):
            self.fn = fn

        def _cache_size(self):
            return self.fn._cache_size()

        def __call__(self, *args, **kwargs):
            out = self.fn(*args, **kwargs)
            calls["pool"] = out[-1]
            outer = args[10] if len(args) > 10 else kwargs.get("outer")
            calls["outer"] = None if outer is None else outer[0]  # the outer level's block table [S, nb]
            calls["text"] = self.fn.lower(*args, **kwargs).as_text()
            return out

    E.DECODE = Spy(E.DECODE)

    def spec(array):
        out = [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]
        return out + [None] * (array.ndim - len(out))

    report = {}
    for name, rules in (("default", {}), ("kv_replicated", {"kv_heads": []})):
        ctx = MeshConfig(data=2, fsdp=1, tensor=4, rules=rules).context()
        model = load_causal_lm(path, mesh=ctx.mesh, sharding_rules=ctx.rules)
        engine = E.TreeEngine(model, load_tokenizer(path), config=E.EngineConfig(attention_impl="reference"),
                              mesh_context=ctx if rules else None)  # default: found on the parameters
        roots = engine.add_prompts([[5, 6, 7, 8, 9], [10, 11, 12]])
        kids = engine.expand(roots, 2, SamplingParams(temperature=1.0), max_new_tokens=6)
        pool = calls["pool"]  # [L, 2, pages, page_size, kv_heads, head_dim]
        kv_constraints = re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<4x4x\d+x\d+xf32>",
                                    calls["text"])
        report[name] = dict(pool=spec(pool), shape=list(pool.shape), constraints=sorted(set(kv_constraints)),
                            n_kids=[len(k) for k in kids], engine_pool=spec(engine.kv_pool()))
    # multi-level cascade (prompt -> draft -> refinement) on the mesh equals the unsharded engine; the outer
    # level's KV [S, K, P0, D] is constrained whole on the batch axes and split by kv heads on tensor
    multi = {}
    for name, ctx in (("plain", None), ("mesh", MeshConfig(data=2, fsdp=1, tensor=4).context())):
        model = load_causal_lm(path) if ctx is None else load_causal_lm(path, mesh=ctx.mesh, sharding_rules=ctx.rules)
        engine = E.TreeEngine(model, load_tokenizer(path), seed=5, mesh_context=ctx, config=E.EngineConfig(
            attention_impl="reference", outer_level=True, page_size=16))
        roots = engine.add_prompts([list(range(5, 115)), list(range(40, 123))], ids=["a", "b"])
        drafts = engine.expand(roots, 3, SamplingParams(temperature=1.0), max_new_tokens=6)
        asks = engine.append([d for ds in drafts for d in ds], [[3, 4]] * 6)
        kids = engine.expand(asks, 2, SamplingParams(greedy=True), max_new_tokens=5)
        n_outer = int(calls["outer"].shape[0])
        pattern = r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<" + str(n_outer) + r"x4x\d+x16xf32>"
        found = re.findall(pattern, calls["text"]) if ctx is not None else []
        multi[name] = dict(tokens=[[list(map(int, k.tokens)) for k in ks] for ks in kids],
                           logprobs=[[list(map(float, k.logprobs)) for k in ks] for ks in kids],
                           outer_programs=engine.last_decode_stats["outer_programs"],
                           outer_constraints=sorted(set(found)))
    report["multilevel"] = multi
    print(json.dumps(report))
""")


@pytest.mark.slow  # ~20 s: engine programs compiled for 8 devices in a subprocess
def test_engine_kv_sharded_on_kv_heads(make_checkpoint):
    import json

    path = make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    default, replicated = report["default"], report["kv_replicated"]
    assert default["n_kids"] == [2, 2]
    # tensor parallelism: the decode program's rows' KV is constrained with rows on the batch axes (data) and
    # kv heads on tensor; the KV pool it returns keeps kv heads on tensor
    assert default["shape"][4] == 4
    assert default["pool"][4] == "tensor" and default["engine_pool"][4] == "tensor", default
    assert default["constraints"] and all(c.startswith('[{"data"') and c.endswith('}, {"tensor"}, {}, {}]')
                                          for c in default["constraints"]), default
    # the configured rules decide: kv_heads -> [] keeps the heads whole
    assert replicated["pool"][4] is None, replicated
    assert replicated["constraints"] and all(c.startswith('[{"data"') and c.endswith('}, {}, {}, {}]')
                                             for c in replicated["constraints"]), replicated
    plain, mesh = report["multilevel"]["plain"], report["multilevel"]["mesh"]
    assert plain["outer_programs"] == mesh["outer_programs"] == 1
    assert mesh["tokens"] == plain["tokens"]
    for a, b in zip(mesh["logprobs"], plain["logprobs"]):
        for x, y in zip(a, b):
            assert max(abs(u - v) for u, v in zip(x, y)) < 1e-4
    assert mesh["outer_constraints"] == ['[{}, {"tensor"}, {}, {}]'], mesh["outer_constraints"]
