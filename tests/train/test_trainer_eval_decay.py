"""Trainer.evaluate is the exact mean over rows (a remainder batch adds no padding bias), and AdamW decays only
weights of rank >= 2 (matrices and embeddings, not norms or biases)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prs_jax.models import load_causal_lm
from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig, decay_mask, make_optimizer

T = 12


def row_arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n rows of random tokens of random lengths, each with its own weight (so the per-row losses differ)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, T + 1, size=n)
    return {"input_ids": rng.integers(3, 200, size=(n, T)).astype(np.int32),
            "attention_mask": np.arange(T)[None, :] < lengths[:, None],
            "weight": rng.uniform(0.2, 3.0, size=n).astype(np.float32)}


def weighted_nll(model, batch, static):
    """A loss that is a mean over rows: weight_b x (mean NLL of row b's tokens); metrics likewise per row."""
    logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    tok = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0]
    m = batch["attention_mask"][:, 1:]
    nll_b = -jnp.sum(jnp.where(m, tok, 0.0), -1) / jnp.maximum(jnp.sum(m, -1), 1)
    return jnp.mean(batch["weight"] * nll_b), {"nll": jnp.mean(nll_b), "max_weight": jnp.max(batch["weight"])}


@pytest.mark.parametrize("n", [10, 11])  # batch 4: remainders 2 and 3 (3 does not divide 4)
def test_evaluate_is_the_exact_mean_over_rows_with_a_remainder_batch(llama_dir, tmp_path, n):
    arrays = row_arrays(n)
    model = load_causal_lm(llama_dir)
    tr = Trainer(model, weighted_nll, TrainerConfig(out_dir=str(tmp_path / "run"), batch_size=4, progress=False,
                                                    tensorboard=False), OptimConfig())
    got = tr.evaluate(ArraySource(arrays, lambda b: None))  # batches of 4, 4 and a padded remainder
    per_row = [weighted_nll(model, {k: v[i:i + 1] for k, v in arrays.items()}, None) for i in range(n)]
    losses = np.array([float(lo) for lo, _ in per_row])
    want = {k: float(np.mean([float(m[k]) for _, m in per_row])) for k in per_row[0][1]}
    want["loss"] = float(losses.mean())
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    assert losses.std() > 0.1 * losses.mean()  # the rows really differ
    if n == 11:  # the old scheme (padding by repeats, the padded batch's mean weighted by its 3 real rows) was off
        old = (losses[:8].sum() + losses[[8, 9, 10, 8]].mean() * 3) / n
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
    tr = Trainer(model, weighted_nll, TrainerConfig(out_dir=str(tmp_path / "run"), progress=False,
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
from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig
from test_trainer_eval_decay import row_arrays, weighted_nll
src = ArraySource(row_arrays(11), lambda b: None)
res = {}
for name, mesh in (("plain", None), ("d2f2t2", MeshConfig(data=2, fsdp=2, tensor=2))):
    tr = Trainer(load_causal_lm(sys.argv[1]), weighted_nll, TrainerConfig(
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
