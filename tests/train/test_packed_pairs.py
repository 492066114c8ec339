"""Prompt-shared preference forwards: a packed row [prompt | chosen | rejected] (block mask, positions of
rejected restarting after the prompt) gives the same log-probs AND gradients as the unshared forward (one row
per response, right or left padded) and as an unpadded per-sequence reference, on tiny Llama and GPT-NeoX with
ragged lengths; plus the one log-prob API (temperature, per-token) and the typed batches' collation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prs_jax.data.batches import PairBatch, RowSpec, TokenBatch, pack_rows
from prs_jax.data.pairs import TokenizedPair, collate_pairs
from prs_jax.data.sft import TokenizedSFT, collate_sft
from prs_jax.models.config import ModelConfig
from prs_jax.models.tiny import randomize, tiny_hf_config
from prs_jax.models.transformer import CausalLM
from prs_jax.train.logprobs import (
    LogProbConfig, logps_from_hidden, response_hidden, sequence_logps, tail_token_batch, token_logprobs, token_logps,
    unembed_matrix,
)
from prs_jax.train.objectives import PreferenceLoss, SFTLoss, pair_logps


def _model(family: str, seed: int = 0, **kw) -> CausalLM:
    cfg = ModelConfig.from_hf_dict(tiny_hf_config(family, **kw), source="test")
    return randomize(CausalLM(cfg, rngs=nnx.Rngs(seed)), seed)


def _pairs(n: int = 4, seed: int = 0, aug: bool = False) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(3, 500, int(rng.integers(1 if i else 0, 12))).astype(np.int32)  # one empty prompt
        c = rng.integers(3, 500, int(rng.integers(1, 9))).astype(np.int32)
        r = rng.integers(3, 500, int(rng.integers(1, 9))).astype(np.int32)
        pair = TokenizedPair(p, c, r, where=f"pair {i}")
        if aug:
            pair = TokenizedPair(p, c, r, where=f"pair {i}",
                                 augmented=TokenizedPair(np.concatenate([[7, 8, 9], p]).astype(np.int32), c, r))
        out.append(pair)
    return out


def _reference_logps(model: CausalLM, prompts: list[np.ndarray], resps: list[np.ndarray]) -> np.ndarray:
    """Sums of log p(resp | prompt) from FULL logits of a plain right-padded batch (attention_mask path, no
    segments, no gather): an independent reference. The first token of a row has no prediction."""
    seqs = [np.concatenate([p, r]).astype(np.int32) for p, r in zip(prompts, resps)]
    t = max(len(x) for x in seqs)
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), bool)
    for i, x in enumerate(seqs):
        ids[i, :len(x)], mask[i, :len(x)] = x, True
    logits, _ = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    return np.array([sum(logp[i, j - 1, ids[i, j]] for j in range(max(len(p), 1), len(x)))
                     for i, (p, x) in enumerate(zip(prompts, seqs))])


def _as_jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_packed_equals_unshared_logps_and_gradients(family):
    model = _model(family)
    pairs = _pairs()
    cfg = LogProbConfig(method="plain")
    batches = {"packed": collate_pairs(pairs, multiple=8),
               "separate": collate_pairs(pairs, multiple=8, layout="separate"),
               "separate_left": collate_pairs(pairs, multiple=8, layout="separate", padding_side="left"),
               "packed_left": collate_pairs(pairs, multiple=8, padding_side="left")}
    if family == "llama":  # the default lane: three compilations, not four (the slow lane runs all four)
        del batches["packed_left"]
    assert batches["packed"].x.tokens.shape[1] == 1 and batches["separate"].x.tokens.shape[1] == 2
    # the packed row is shorter than two unshared rows together
    assert batches["packed"].x.tokens.shape[2] < 2 * batches["separate"].x.tokens.shape[2]

    want_c = _reference_logps(model, [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs])
    want_r = _reference_logps(model, [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params, batch):
        c, r, nc, nr = pair_logps(nnx.merge(graphdef, params, rest), batch, cfg)
        return jnp.sum(c) - 0.7 * jnp.sum(r) + 0.01 * jnp.sum(c * r), (c, r, nc, nr)

    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    results = {name: grad_fn(params, _as_jnp(b)) for name, b in batches.items()}
    for name, ((_, (c, r, nc, nr)), _) in results.items():
        np.testing.assert_allclose(c, want_c, rtol=1e-5, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(r, want_r, rtol=1e-5, atol=1e-4, err_msg=name)
        # the empty prompt's first response token has no prediction: not scored
        np.testing.assert_array_equal(nc, [len(p.chosen_ids) - (len(p.prompt_ids) == 0) for p in pairs])
        np.testing.assert_array_equal(nr, [len(p.rejected_ids) - (len(p.prompt_ids) == 0) for p in pairs])
    g_ref = results["separate"][1]
    for name, (_, g) in results.items():
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name} {jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_packed_chunked_and_sliding_window():
    """The chunked method on packed rows, and a sliding window measured in positions, not slots."""
    model = _model("llama", seed=1, sliding_window=4)
    pairs = _pairs(3, seed=2)
    packed = _as_jnp(collate_pairs(pairs, multiple=8))
    separate = _as_jnp(collate_pairs(pairs, multiple=8, layout="separate"))
    a = pair_logps(model, packed, LogProbConfig(method="chunked", chunk_size=128))
    b = pair_logps(model, separate, LogProbConfig(method="plain"))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_sr_views_and_dpo_loss_same_in_both_layouts():
    model, ref = _model("llama", seed=3), _model("llama", seed=4)
    pairs = _pairs(4, seed=5, aug=True)
    out = {}
    for layout in ("packed", "separate"):
        batch = _as_jnp(collate_pairs(pairs, multiple=8, layout=layout))
        assert batch.aug is not None and batch.aug.tokens.shape[2] >= batch.x.tokens.shape[2]
        loss, metrics = PreferenceLoss("sr_dpo", beta=0.3)(model, batch, frozen={"ref": ref})
        out[layout] = (float(loss), pair_logps(model, batch, aug=True))
    assert out["packed"][0] == pytest.approx(out["separate"][0], rel=1e-5)
    for x, y in zip(out["packed"][1], out["separate"][1]):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)


def test_temperature_and_per_token_api():
    model = _model("llama", seed=6)
    batch = _as_jnp(collate_sft([TokenizedSFT(np.array([5, 6, 7], np.int32), np.array([8, 9, 10, 11], np.int32),
                                              np.array([1, 0, 1, 1], np.int32))], multiple=8))
    assert isinstance(batch, TokenBatch) and batch.seqs_per_example == 1
    ids = jnp.asarray([[5, 6, 7, 8, 9, 10, 11]])
    logits, _ = model(ids)
    for temp in (1.0, 0.7):
        logp = jax.nn.log_softmax(logits[0] / temp, axis=-1)
        want = [float(logp[j - 1, ids[0, j]]) for j in (3, 5, 6)]
        tok = token_logps(model, batch, LogProbConfig(), temperature=temp)
        assert tok.shape == (1, 1, 8)
        np.testing.assert_allclose(tok[0, 0, :3], want, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(tok[0, 0, 3:]).sum()) == 0.0
        sums, counts = sequence_logps(model, batch, temperature=temp)
        np.testing.assert_allclose(sums, [[sum(want)]], rtol=1e-5)
        np.testing.assert_array_equal(counts, [[3.0]])
    loss, metrics = SFTLoss()(model, batch)
    assert float(loss) == pytest.approx(-float(sequence_logps(model, batch)[0][0, 0]) / 3, rel=1e-6)
    assert float(metrics["tokens"]) == 3.0
    with pytest.raises(ValueError, match="temperature"):
        token_logps(model, batch, temperature=0.0)


def test_pack_rows_layout_and_errors():
    b = pack_rows([[RowSpec(np.array([1, 2]), ((np.array([3, 4]), np.array([1, 1])),
                                               (np.array([5]), np.array([1]))))]], multiple=8)
    np.testing.assert_array_equal(b.tokens[0, 0, :5], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(b.segment_ids[0, 0, :6], [1, 1, 2, 2, 3, 0])
    np.testing.assert_array_equal(b.positions[0, 0, :5], [0, 1, 2, 3, 2])  # rejected restarts after the prompt
    np.testing.assert_array_equal(b.target_slot[0, 0, :3], [2, 3, 4])
    np.testing.assert_array_equal(b.context_slot[0, 0, :3], [1, 2, 1])  # rejected is predicted by the prompt
    np.testing.assert_array_equal(b.target_seq[0, 0, :4], [0, 0, 1, -1])
    assert b.seqs_per_row == 2 and b.target_slot.shape == (1, 1, 8)
    # the static field is part of the tree structure (jit specialises on it), not a leaf
    assert len(jax.tree.leaves(b)) == 6
    from prs_jax.errors import DataError
    with pytest.raises(DataError, match="rows of"):
        pack_rows([[RowSpec(np.array([1]), ((np.array([2]), np.array([1])),))],
                   [RowSpec(np.array([1]), ())]])
    with pytest.raises(DataError, match="max_length"):
        collate_pairs(_pairs(2), max_length=4)
    assert isinstance(collate_pairs(_pairs(2)), PairBatch)


def test_tail_batch_matches_the_rollout_layout_at_temperature():
    """A2C's layout (left-padded prompt + r response slots): the API on tail_token_batch equals the hidden states
    of the plain forward at the r positions before the tail, scored at temperature T."""
    model = _model("llama", seed=7)
    ids = jnp.asarray([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 0]], jnp.int32)
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]], bool)
    resp = jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)
    r, temp = 3, 0.9
    hidden, _ = model.model(ids, attention_mask=mask)
    want = token_logprobs(hidden[:, -r - 1:-1] / temp, unembed_matrix(model), ids[:, -r:], method="plain")
    batch = tail_token_batch(ids, mask, r, resp)
    h, targets = response_hidden(model, batch)
    np.testing.assert_allclose(h[:, 0], hidden[:, -r - 1:-1], rtol=1e-5, atol=1e-5)
    got = logps_from_hidden(model, h, targets, LogProbConfig(method="chunked", chunk_size=100), temperature=temp)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-5)
    tok = token_logps(model, batch, temperature=temp)
    np.testing.assert_allclose(tok[:, 0], jnp.where(resp, want, 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_reward_loss_same_in_both_layouts():
    """The reward at each response's last token: packed rows give the separate rows' rewards."""
    from prs_jax.models.transformer import RewardModel
    from prs_jax.train.objectives import RewardLoss

    cfg = ModelConfig.from_hf_dict(tiny_hf_config("llama"), source="test")
    rm = randomize(RewardModel(cfg, rngs=nnx.Rngs(0)), 8)
    pairs = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, margin=0.5) for p in _pairs(4, seed=9)]
    out = [RewardLoss()(rm, _as_jnp(collate_pairs(pairs, multiple=8, layout=lay))) for lay in ("packed", "separate")]
    assert float(out[0][0]) == pytest.approx(float(out[1][0]), rel=1e-5)
    # and equal to the model's own reward (last real token of the plain row)
    ids = [np.concatenate([p.prompt_ids, p.chosen_ids]) for p in pairs]
    t = max(map(len, ids))
    arr = np.zeros((len(ids), t), np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
        arr[i, :len(x)], mask[i, :len(x)] = x, True
    want = rm(jnp.asarray(arr), attention_mask=jnp.asarray(mask))
    batch = _as_jnp(collate_pairs(pairs, multiple=8))
    h, _ = rm.model(batch.x.tokens[:, 0], positions=batch.x.positions[:, 0], segment_ids=batch.x.segment_ids[:, 0])
    last = [len(p.prompt_ids) + len(p.chosen_ids) - 1 for p in pairs]
    got = rm.head(h[jnp.arange(len(pairs)), jnp.asarray(last)])[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt_neox", marks=pytest.mark.slow)])
def test_cascade_equals_packed_logps_and_gradients(family):
    """Layout "cascade" (prompt once, responses through cascade attention with gradients) equals "packed"."""
    model = _model(family, seed=10)
    pairs = [p for p in _pairs(5, seed=11) if len(p.prompt_ids)]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params, batch):
        c, r, nc, nr = pair_logps(nnx.merge(graphdef, params, rest), batch, LogProbConfig(method="plain"))
        return jnp.sum(c) - 0.7 * jnp.sum(r) + 0.01 * jnp.sum(c * r), (c, r, nc, nr)

    grad_fn = jax.jit(jax.value_and_grad(objective, has_aux=True))
    (_, a), ga = grad_fn(params, _as_jnp(collate_pairs(pairs, multiple=8, layout="cascade")))
    (_, b), gb = grad_fn(params, _as_jnp(collate_pairs(pairs, multiple=8)))
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    from prs_jax.errors import DataError
    with pytest.raises(DataError, match="empty prompt"):
        collate_pairs([TokenizedPair(np.zeros(0, np.int32), np.array([3], np.int32), np.array([4], np.int32))],
                      layout="cascade")
