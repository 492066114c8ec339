"""Training sharded over 8 simulated CPU devices gives the unsharded loss trajectory (rtol 1e-4: reductions
are split differently across devices, so float sums differ in the last bits)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import json, sys
    import numpy as np
    from prs_jax.models import MeshConfig, load_causal_lm
    from prs_jax.data.pairs import TokenizedPair, collate_pairs
    from prs_jax.train.objectives import PreferenceLoss
    from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig

    path, out = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    n = 16
    # random responses: the loss stays away from 0, where relative float differences mean nothing
    pairs = [TokenizedPair(*(rng.integers(100, 400, size=8).astype(np.int32) for _ in range(3))) for _ in range(n)]
    src = ArraySource(collate_pairs(pairs, multiple=8))
    traj = {}
    for name, mesh in (("plain", None), ("fsdp2_tensor4", MeshConfig(data=1, fsdp=2, tensor=4)),
                       ("data2_fsdp2_tensor2", MeshConfig(data=2, fsdp=2, tensor=2))):
        cfg = TrainerConfig(out_dir=f"{out}/{name}", steps=4, batch_size=8, grad_accum=2, mesh=mesh,
                            progress=False, tensorboard=False, async_checkpoint=False)
        tr = Trainer(load_causal_lm(path), PreferenceLoss("sigmoid", beta=0.5), cfg, OptimConfig(lr=3e-3),
                     frozen={"ref": load_causal_lm(path)})
        tr.fit(src)
        traj[name] = [json.loads(l)["loss"] for l in open(f"{out}/{name}/metrics.jsonl")]
        if mesh is not None:
            k = tr.model.model.layers[0].mlp.up_proj.kernel[...]
            assert len(k.sharding.device_set) == 8, k.sharding
    print(json.dumps(traj))
""")


@pytest.mark.slow  # ~60 s: three trainers (plain + two 8-device meshes) in a subprocess
def test_sharded_training_matches_unsharded(make_checkpoint, tmp_path):
    import json

    import numpy as np

    path = make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    traj = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(traj["plain"]) == 4
    for name in ("fsdp2_tensor4", "data2_fsdp2_tensor2"):
        np.testing.assert_allclose(traj[name], traj["plain"], rtol=1e-4)
