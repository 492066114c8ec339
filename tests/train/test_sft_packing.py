"""SFT sequence packing: the plan (every conversation once, rows within max_length, keyed by the seed only) and
exactness (a packed row gives each conversation the log-probs, and the batch the loss and gradients, it has
unpacked), on tiny Llama and GPT-NeoX with ragged lengths; plus the train CLI with data.packing."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from prs_jax.cli import main
from prs_jax.data.sft import TokenizedSFT, collate_sft, collate_sft_packed, pack_plan
from prs_jax.errors import DataError
from prs_jax.models.config import ModelConfig
from prs_jax.models.tiny import randomize, tiny_hf_config
from prs_jax.models.transformer import CausalLM
from prs_jax.train.logprobs import sequence_logps
from prs_jax.train.objectives import SFTLoss

EXAMPLES = Path(__file__).resolve().parents[2] / "experiments"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=80), st.integers(40, 64), st.integers(0, 3))
def test_pack_plan_covers_every_example_once_within_capacity(lengths, max_length, seed):
    plan = pack_plan(lengths, max_length, seed=seed)
    flat = sorted(i for row in plan for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_length for row in plan)
    # best fit decreasing never needs more rows than twice the lower bound (+1)
    assert len(plan) <= 2 * -(-sum(lengths) // max_length) + 1
    assert plan == pack_plan(lengths, max_length, seed=seed)  # a pure function of (lengths, seed)


def test_pack_plan_fills_rows_and_names_the_too_long_example():
    lengths = [30, 10, 25, 15, 40, 20, 20, 12, 28]  # 200 tokens that fill five rows of 40 exactly
    plan = pack_plan(lengths, 40)
    assert len(plan) == 5 and all(sum(lengths[i] for i in r) == 40 for r in plan)
    with pytest.raises(DataError, match="example 1 has 41 tokens.*max_length=40"):
        pack_plan([3, 41], 40)


def _convs(n: int, seed: int) -> list[TokenizedSFT]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(3, 500, int(rng.integers(1, 10))).astype(np.int32)
        r = rng.integers(3, 500, int(rng.integers(1, 12))).astype(np.int32)
        m = (rng.random(len(r)) < 0.8).astype(np.int32)
        m[0] = 1
        out.append(TokenizedSFT(p, r, m, where=f"conv {i}"))
    return out


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_packed_rows_give_the_unpacked_logps_loss_and_gradients(family):
    cfg = ModelConfig.from_hf_dict(tiny_hf_config(family), source="test")
    model = randomize(CausalLM(cfg, rngs=nnx.Rngs(0)), 0)
    convs = _convs(9, seed=1)
    plan = pack_plan([len(c.input_ids) for c in convs], max_length=32, seed=0)
    assert len(plan) < len(convs)  # something was packed together
    packed = collate_sft_packed([[convs[i] for i in row] for row in plan], max_length=32, multiple=8)
    plain = collate_sft(convs, multiple=8)
    ps, pc = (np.asarray(x) for x in sequence_logps(model, packed))
    us, uc = (np.asarray(x) for x in sequence_logps(model, plain))
    got = {}
    for r, row in enumerate(plan):
        for k, i in enumerate(row):
            got[i] = (ps[r, k], pc[r, k])
        assert np.all(pc[r, len(row):] == 0)  # the empty filler sequences score nothing
    np.testing.assert_allclose([got[i][0] for i in range(len(convs))], us[:, 0], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal([got[i][1] for i in range(len(convs))], uc[:, 0])

    def grads(batch):
        g = nnx.grad(lambda m: SFTLoss()(m, batch)[0])(model)
        return jax.tree.leaves(nnx.state(g, nnx.Param))

    (lp, _), (lu, _) = SFTLoss()(model, packed), SFTLoss()(model, plain)
    assert float(lp) == pytest.approx(float(lu), rel=1e-5)
    for a, b in zip(grads(packed), grads(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


def test_collate_sft_packed_rejects_empty_rows():
    with pytest.raises(DataError, match="empty packed row"):
        collate_sft_packed([[]])


def test_train_sft_with_packing(llama_dir, tmp_path, capsys):
    args = ["train", "sft", str(EXAMPLES / "configs" / "train_sft_tiny.yaml"), f"model={llama_dir}",
            f"data.train={EXAMPLES / 'data' / 'tiny_sft.jsonl'}", "data.packing=true",
            "trainer.steps=2", "trainer.progress=false", "trainer.tensorboard=false"]
    assert main(args + [f"trainer.out_dir={tmp_path / 'sft'}"]) == 0
    assert "packing:" in capsys.readouterr().out
    assert main(["train", "rm", f"model={llama_dir}", f"data.train={EXAMPLES / 'data' / 'tiny_pairs.jsonl'}",
                 "data.packing=true", f"trainer.out_dir={tmp_path / 'rm'}"]) == 2
    assert "data.packing" in capsys.readouterr().err
