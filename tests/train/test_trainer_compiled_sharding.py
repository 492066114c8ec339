"""The sharding the trainer asks for is the sharding the compiled training step has (8 simulated CPU devices,
in a subprocess): FSDP/tensor-parallel parameters and optimizer state placed by the configured logical-axis
rules, activations constrained on the batch axes inside the step (the step is traced inside the mesh context),
no buffer holding an unsharded [B, T, vocab] logits tensor, and rules overridden from a config
(`mesh.rules.batch=[data]`) change all of these. The assertions read shardings and HLO, not numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(r"""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import json, re, sys
    import numpy as np
    import jax.numpy as jnp
    from prs_jax.config import apply_overrides, from_dict
    from prs_jax.models import load_causal_lm
    from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig

    path, out = sys.argv[1], sys.argv[2]
    B, T = 8, 16

    def loss_fn(model, batch, static):
        # full-vocabulary logits on purpose: the [B, T - 1, V] tensor the check below looks for
        hidden, _ = model.model(batch["ids"], attention_mask=batch["mask"])
        logits = model.unembed(hidden[:, :-1]).astype(jnp.float32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["ids"][:, 1:, None], -1)[..., 0]
        return -jnp.mean(lp), {}

    def spec(array):  # the PartitionSpec as a list, one entry per dim (trailing None kept)
        out = [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]
        return out + [None] * (array.ndim - len(out))

    rng = np.random.default_rng(0)
    arrays = {"ids": rng.integers(3, 400, (B, T)).astype(np.int32), "mask": np.ones((B, T), bool)}
    report = {}
    for name, overrides in (("default", []), ("rules", ["mesh.rules.batch=[data]", "mesh.rules.mlp=[]"])):
        data = apply_overrides({}, [f"out_dir={out}/{name}", "steps=1", f"batch_size={B}", "progress=false",
                                    "tensorboard=false", "async_checkpoint=false", "mesh.data=2", "mesh.fsdp=2",
                                    "mesh.tensor=2", *overrides])
        cfg = from_dict(TrainerConfig, data)
        tr = Trainer(load_causal_lm(path), loss_fn, cfg, OptimConfig(lr=1e-3))
        tr.start()
        batch = tr._device_batch(arrays)
        lowered = tr._train_step.lower(tr._params, tr._opt_state_tree, tr._rest, tr._frozen_states, batch,
                                       static=None)
        text = lowered.as_text()
        constraints = re.findall(r"sdy\.sharding_constraint %\S+ <@mesh, (\[.*?\])> : tensor<([0-9x]+)xf32>", text)
        compiled = lowered.compile()
        shapes = [tuple(int(d) for d in s.split(",")) for s in re.findall(r"f32\[([0-9,]+)\]", compiled.as_text())]
        # one step with the compiled program: the shardings of the parameters and optimizer state it returns
        new_params, new_opt, _ = compiled(tr._params, tr._opt_state_tree, tr._rest, tr._frozen_states, batch)
        params = {k: spec(v) for k, v in new_params.items()}
        mu = {jax.tree_util.keystr(p): spec(l)
              for p, l in jax.tree_util.tree_flatten_with_path(new_opt)[0] if ".mu" in jax.tree_util.keystr(p)}
        report[name] = dict(constraints=constraints, shapes=shapes, params=params, mu=mu,
                            batch=spec(batch["ids"]), vocab=tr.model.config.vocab_size,
                            intermediate=tr.model.config.intermediate_size, hidden=tr.model.config.hidden_size)
        tr.close()
    print(json.dumps(report))
""")


def _run(path, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Involuntary full rematerialization" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~25 s: two 8-device compilations in a subprocess
def test_compiled_train_step_follows_the_configured_rules(make_checkpoint, tmp_path):
    path = make_checkpoint("llama", num_attention_heads=4, num_key_value_heads=4)
    report = _run(path, tmp_path)
    b, t = 8, 16
    for name, batch_axes in (("default", '{"data", "fsdp"}'), ("rules", '{"data"}')):
        r = report[name]
        v, i, h = r["vocab"], r["intermediate"], r["hidden"]
        mlp = None if name == "rules" else "tensor"
        # parameters and optimizer state: FSDP on the embed dim, tensor on heads/mlp (or not, by the rules)
        up = "['model']['layers'][0]['mlp']['up_proj']['kernel'].value"
        q = "['model']['layers'][0]['self_attn']['q_proj']['kernel'].value"
        assert r["params"][up] == ["fsdp", mlp], r["params"][up]
        assert r["params"][q] == ["fsdp", "tensor"], r["params"][q]
        assert r["params"]["['model']['embed_tokens']['embedding'].value"] == ["tensor", "fsdp"]
        mu = {k: s for k, s in r["mu"].items() if up in k}
        assert list(mu.values()) == [["fsdp", mlp]], mu
        assert sum(s == ["fsdp", "tensor"] for s in r["mu"].values()) >= 5, r["mu"]
        # the host batch goes onto the rules' batch axes
        want_batch = [["data", "fsdp"], None] if name == "default" else ["data", None]
        assert r["batch"] == want_batch, r["batch"]
        # activations are constrained inside the traced step: residual stream [B, T, hidden] and the MLP
        # activations [B, T, intermediate] on the batch axes, the MLP's hidden dim on tensor unless the rules
        # replicate it
        cons = {(spec, shape) for spec, shape in r["constraints"]}
        residual = [spec for spec, shape in cons if shape == f"{b}x{t}x{h}"]
        assert residual and all(spec == f"[{batch_axes}, {{}}, {{}}]" for spec in residual), cons
        mlp_act = [spec for spec, shape in cons if shape == f"{b}x{t}x{i}"]
        want_mlp = f'[{batch_axes}, {{}}, {{"tensor"}}]' if name == "default" else f"[{batch_axes}, {{}}, {{}}]"
        assert mlp_act and all(spec == want_mlp for spec in mlp_act), cons
        # no device holds the [B, T - 1, V] logits whole: every per-device buffer over the T - 1 scored
        # positions is split on the batch axes (and its vocabulary dim on tensor)
        per_position = [s for s in r["shapes"] if len(s) == 3 and s[1] == t - 1]
        assert per_position and all(s[0] < b for s in per_position), (name, per_position)
        assert max(math.prod(s) for s in per_position) <= b * (t - 1) * v // 4, (name, per_position)
        assert not [s for s in r["shapes"] if v in s and len(s) == 3], (name, r["shapes"])
