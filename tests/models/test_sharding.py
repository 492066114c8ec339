"""A forward sharded over 8 simulated CPU devices (fsdp x tensor) equals the unsharded forward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def test_sharded_forward_equals_unsharded(make_checkpoint):
    path = make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=4)
    rm_path = make_checkpoint("llama", task="reward")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(rm_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout
    assert "('fsdp', 'tensor')" in proc.stdout or "'tensor'" in proc.stdout
