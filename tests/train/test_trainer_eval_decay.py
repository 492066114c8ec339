"""Trainer.evaluate is the exact mean over rows (a remainder batch adds no padding bias), and AdamW decays only
weights of rank >= 2 (matrices and embeddings, not norms or biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prs_jax.models import load_causal_lm
from prs_jax.train.objectives import PreferenceLoss, Static, bucket_r_max
from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig, decay_mask, make_optimizer

T = 16


def pair_rows(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n preference pairs of random tokens with random precomputed reference log-probs (so rows differ)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}
    for _ in range(n):
        prompt = list(rng.integers(100, 400, size=int(rng.integers(3, 7))))
        for name in ("chosen", "rejected"):
            ids = prompt + list(rng.integers(20, 300, size=int(rng.integers(2, 8))))
            row = np.zeros(T, np.int32)
            row[:len(ids)] = ids
            out.setdefault(f"{name}_ids", []).append(row)
            out.setdefault(f"{name}_mask", []).append(np.arange(T) < len(ids))
            out.setdefault(f"{name}_loss_mask", []).append((np.arange(T) >= len(prompt)) & (np.arange(T) < len(ids)))
            out.setdefault(f"ref_{name}", []).append(np.float32(rng.normal(-40.0, 6.0)))
    return {k: np.stack(v) for k, v in out.items()}


def static_of(batch):
    return Static(r_max=bucket_r_max(batch["chosen_loss_mask"], batch["rejected_loss_mask"]), logprob_method="plain")


@pytest.mark.parametrize("n", [10, 11])  # batch 4: remainders 2 and 3 (3 does not divide 4)
def test_evaluate_is_the_exact_mean_over_rows_with_a_remainder_batch(llama_dir, tmp_path, n):
    arrays = pair_rows(n)
    loss = PreferenceLoss("sigmoid", beta=0.1)
    model = load_causal_lm(llama_dir)
    tr = Trainer(model, loss, TrainerConfig(out_dir=str(tmp_path / "run"), batch_size=4, progress=False,
                                            tensorboard=False), OptimConfig())
    got = tr.evaluate(ArraySource(arrays, static_of))  # batches of 4, 4 and a padded remainder
    static = Static(r_max=T - 1, logprob_method="plain")
    per_row = [loss(model, {k: v[i:i + 1] for k, v in arrays.items()}, static) for i in range(n)]
    want = {k: float(np.mean([float(m[k]) for _, m in per_row])) for k in per_row[0][1]}
    want["loss"] = float(np.mean([float(lo) for lo, _ in per_row]))
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    losses = np.array([float(lo) for lo, _ in per_row])
    assert losses.std() > 0.05  # the rows really differ
    if n == 11:  # the old scheme (padding by repeats, the padded batch's mean weighted by its 3 real rows) was off
        old = (losses[:8].sum() + losses[[8, 9, 10, 8]].mean() * 3) / n
        assert abs(old - want["loss"]) > 1e-3 * losses.std()
        assert abs(got["loss"] - old) > 100 * abs(got["loss"] - want["loss"])


def test_weight_decay_only_on_matrices():
    params = {"layer.kernel": jnp.ones((3, 4)), "layer.bias": jnp.ones((4,)), "norm.scale": jnp.ones((4,)),
              "embed": jnp.ones((5, 3)), "step_scale": jnp.ones(())}
    assert decay_mask(params) == {"layer.kernel": True, "layer.bias": False, "norm.scale": False, "embed": True,
                                  "step_scale": False}
    tx = make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, clip_norm=1.0), 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # zero gradients: Adam's step is 0, so only the decay moves a weight: x - lr * wd * x = 0.95
    np.testing.assert_allclose(np.asarray(new["layer.kernel"]), 0.95, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["embed"]), 0.95, rtol=1e-6)
    for k in ("layer.bias", "norm.scale", "step_scale"):
        np.testing.assert_array_equal(np.asarray(new[k]), np.asarray(params[k]))


def test_weight_decay_mask_on_a_model(llama_dir, tmp_path):
    model = load_causal_lm(llama_dir)
    tr = Trainer(model, PreferenceLoss(), TrainerConfig(out_dir=str(tmp_path / "run"), progress=False,
                                                        tensorboard=False), OptimConfig(lr=0.1, weight_decay=0.5))
    params = tr._params
    updates, _ = tr.tx.update(jax.tree.map(jnp.zeros_like, params), tr.tx.init(params), params)
    decayed = {k for k, u in updates.items() if float(jnp.max(jnp.abs(u))) > 0}
    norms = {k for k in params if "norm" in k}
    assert norms and not decayed & norms  # every RMSNorm scale is left alone
    assert decayed == {k for k, v in params.items() if v.ndim >= 2 and float(jnp.max(jnp.abs(v))) > 0}
    assert any("embed" in k for k in decayed) and any("kernel" in k for k in decayed)


MESH_SCRIPT = """
import jax
jax.config.update("jax_num_cpu_devices", 8)
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from prs_jax.models import MeshConfig, load_causal_lm
from prs_jax.train.objectives import PreferenceLoss
from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig
from test_trainer_eval_decay import pair_rows, static_of
src = ArraySource(pair_rows(11), static_of)
res = {}
for name, mesh in (("plain", None), ("d2f2t2", MeshConfig(data=2, fsdp=2, tensor=2))):
    tr = Trainer(load_causal_lm(sys.argv[1]), PreferenceLoss("sigmoid"), TrainerConfig(
        out_dir=sys.argv[3] + "/" + name, batch_size=4, mesh=mesh, progress=False, tensorboard=False), OptimConfig())
    res[name] = tr.evaluate(src)
for k in res["plain"]:
    np.testing.assert_allclose(res["plain"][k], res["d2f2t2"][k], rtol=1e-4, atol=1e-6, err_msg=k)
"""


@pytest.mark.slow
def test_masked_evaluate_on_a_mesh_equals_unsharded(llama_dir, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(llama_dir), str(Path(__file__).parent),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
