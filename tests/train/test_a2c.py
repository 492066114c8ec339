"""A2C (RLAIF section RL): the loss against NumPy, log-probs at the sampling temperature, learning on a tiny
bandit-like task (reward up, value loss down), the KL term holding the policy near the reference, exact resume,
adapters and config errors, and the `prs-jax train a2c` command end to end.

One 1-layer random Llama (hidden 32) serves every run, so the engine's programs compile once for the module;
each Trainer compiles its own step (~10 s on 2 cores), hence few runs: the beta = 0 run is shared by the
learning, resume and KL tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prs_jax.cli import main
from prs_jax.errors import ConfigError, PrsJaxError
from prs_jax.models import load_causal_lm, load_reward_model, load_tokenizer
from prs_jax.train import a2c as a2c_module
from prs_jax.train.a2c import A2C, A2CConfig, RolloutConfig
from prs_jax.train.a2c_rewards import PairReward, RewardConfig, ScorerReward, WordCount, vowel_reward
from prs_jax.train.losses import a2c_loss, returns_to_go, shaped_rewards
from prs_jax.train.rollout import Rollout
from prs_jax.train.trainer import OptimConfig, TrainerConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "experiments"
PROMPTS = ["Describe a sunrise.", "How do I boil an egg?", "What is a prime number?", "Tell me a joke."]
ITERATIONS = 12


# ---------------------------------------------------------------------------------------------- pure math
def numpy_a2c(logp, values, old, ref, reward, mask, beta, kl_mode, scale_reward, value_coef, normalize):
    """Loop-by-loop NumPy version of the A2C loss pieces (independent of the JAX implementation)."""
    b, t = mask.shape
    n_tok = mask.sum()
    rewards = np.zeros((b, t))
    for i in range(b):
        length = int(mask[i].sum())
        for j in range(length):
            if kl_mode == "reward":
                rewards[i, j] -= beta * (old[i, j] - ref[i, j])
        rewards[i, length - 1] += (1 - beta if scale_reward else 1.0) * reward[i]
    returns = np.zeros((b, t))
    for i in range(b):
        acc = 0.0
        for j in reversed(range(int(mask[i].sum()))):
            acc += rewards[i, j]
            returns[i, j] = acc
    adv = (returns - values) * mask
    if normalize:
        mean = adv[mask].mean()
        adv = np.where(mask, (adv - mean) / (adv[mask].std() + 1e-8), 0.0)
    policy = -(logp * adv)[mask].sum() / n_tok
    value = value_coef * ((returns - values) ** 2)[mask].sum() / n_tok
    kl_loss = beta * (0.5 * (logp - ref) ** 2)[mask].sum() / n_tok if kl_mode == "loss" else 0.0
    grad_logp = np.where(mask, -adv / n_tok + (beta * (logp - ref) / n_tok if kl_mode == "loss" else 0.0), 0.0)
    grad_values = np.where(mask, -2 * value_coef * (returns - values) / n_tok, 0.0)
    return {"loss": policy + value + kl_loss, "policy_loss": policy, "value_loss": value, "kl_loss": kl_loss,
            "returns": returns, "grad_logp": grad_logp, "grad_values": grad_values}


@pytest.mark.parametrize("kl_mode,scale_reward,normalize", [("reward", True, False), ("reward", False, True),
                                                            ("loss", True, False)])
def test_a2c_loss_matches_numpy(kl_mode, scale_reward, normalize):
    rng = np.random.default_rng(0)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    logp, values, old, ref = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(4))
    reward = np.array([0.7, -1.2, 2.0], np.float32)
    beta, coef = 0.3, 0.5
    want = numpy_a2c(logp, values, old, ref, reward, mask, beta, kl_mode, scale_reward, coef, normalize)

    def f(lp, v):
        return a2c_loss(lp, v, old, ref, reward, mask, beta=beta, kl_mode=kl_mode, scale_reward=scale_reward,
                        value_coef=coef, normalize_advantages=normalize)

    (loss, metrics), (g_logp, g_values) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(logp, values)
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)
    for k in ("policy_loss", "value_loss", "kl_loss"):
        np.testing.assert_allclose(float(metrics[k]), want[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_logp), want["grad_logp"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_values), want["grad_values"], rtol=1e-5, atol=1e-7)
    # the pieces: shaped per-token rewards and their return to go
    kl = np.where(mask, old - ref, 0.0)
    r = shaped_rewards(reward, kl, mask, beta=beta, kl_in_reward=kl_mode == "reward", scale_reward=scale_reward)
    np.testing.assert_allclose(np.asarray(returns_to_go(r, mask)), want["returns"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), kl.sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward"]), reward.mean(), rtol=1e-6)


def test_returns_hand_values():
    # one row, 3 tokens, reward 2 at the last, beta 0.5, kl per token [1, 0, -2], (1 - beta) weighting:
    # r = [-0.5, 0, 1 + 1] -> R = [1.5, 2, 2]
    r = shaped_rewards(jnp.array([2.0]), jnp.array([[1.0, 0.0, -2.0, 9.0]]), jnp.array([[1, 1, 1, 0]], bool),
                       beta=0.5, kl_in_reward=True, scale_reward=True)
    np.testing.assert_allclose(np.asarray(r), [[-0.5, 0.0, 2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(returns_to_go(r, jnp.array([[1, 1, 1, 0]], bool))), [[1.5, 2.0, 2.0, 0.0]])


def test_a2c_loss_shape_errors_name_the_argument():
    mask = np.ones((2, 3), bool)
    x = np.zeros((2, 3), np.float32)
    ok = dict(logp_bt=x, values_bt=x, old_logp_bt=x, ref_logp_bt=x, reward_b=np.zeros(2, np.float32), mask_bt=mask)
    a2c_loss(**ok, beta=0.1)
    for bad, match in ((dict(values_bt=np.zeros((2, 4), np.float32)), r"a2c_loss: values_bt must have shape \[2, 3\]"),
                       (dict(reward_b=np.zeros(3, np.float32)), r"a2c_loss: reward_b must have shape \[2\]"),
                       (dict(logp_bt=np.zeros(6, np.float32)), r"a2c_loss: logp_bt must have rank 2"),
                       (dict(ref_logp_bt=np.zeros((2, 3), np.int32)), r"a2c_loss: ref_logp_bt must be a floating"),
                       (dict(mask_bt=np.ones((3, 3), bool)), r"a2c_loss: mask_bt must have shape")):
        with pytest.raises(ValueError, match=match):
            a2c_loss(**{**ok, **bad}, beta=0.1)
    # the checks read shapes only: under jit they run once, at trace time, and raise the same error
    with pytest.raises(ValueError, match="a2c_loss: values_bt"):
        jax.jit(lambda v: a2c_loss(**{**ok, "values_bt": v}, beta=0.1))(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="kl_mode must be one of"):
        a2c_loss(**ok, beta=0.1, kl_mode="penalty")
    with pytest.raises(ValueError, match="shaped_rewards: reward_b must have shape"):
        shaped_rewards(np.zeros(3), x, mask, beta=0.1, kl_in_reward=True, scale_reward=True)
    # the names A2C users imported from prs_jax.train.a2c before the split are still there
    assert a2c_module.a2c_loss is a2c_loss and a2c_module.Rollout is Rollout
    assert {"RewardConfig", "ScorerReward", "PairReward", "A2CLoss", "ActorCritic", "TAIL_LOGPS"} <= set(dir(a2c_module))


# ---------------------------------------------------------------------------------------------- rewards, config
def test_rewards_and_adapters():
    from prs_jax.strategies.base import CallableScorer

    assert vowel_reward(["p"], ["aab", ""]) == pytest.approx([2 / 3, 0.0])
    assert WordCount(4)(["p", "p"], ["a b", "a b c d e"]) == [0.5, 1.0]
    assert ScorerReward(CallableScorer(lambda p, r, z: len(r) + (z is None)))(["p"], ["abc"]) == [4.0]
    assert PairReward(lambda p, r: float(p == r))(["x", "y"], ["x", "z"]) == [1.0, 0.0]
    built = RewardConfig(callable="prs_jax.train.a2c_rewards:CharFraction", kwargs={"chars": "b"}).build()
    assert built(["p"], ["ab"]) == [0.5]
    assert RewardConfig(callable="prs_jax.train.a2c_rewards:length_reward").build() is not None
    with pytest.raises(ConfigError, match="reward.callable"):
        RewardConfig(callable="prs_jax.train.a2c_rewards").build()
    with pytest.raises(ConfigError, match="has no attribute"):
        RewardConfig(callable="prs_jax.train.a2c_rewards:nope").build()
    with pytest.raises(ConfigError, match="reward.reward_model"):
        RewardConfig().build()


@pytest.fixture(scope="module")
def small_dir(make_checkpoint) -> Path:
    return make_checkpoint("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64)


def test_config_errors(small_dir, tmp_path):
    tok = load_tokenizer(small_dir)
    with pytest.raises(ConfigError, match="multiple of rollout.n"):
        A2C(load_causal_lm(small_dir), tok, vowel_reward, PROMPTS, rollout=RolloutConfig(n=3),
            trainer=TrainerConfig(batch_size=8, out_dir=str(tmp_path)))
    with pytest.raises(ConfigError, match="steps_per_iteration"):
        A2C(load_causal_lm(small_dir), tok, vowel_reward, PROMPTS, config=A2CConfig(steps_per_iteration=2),
            trainer=TrainerConfig(steps=5, batch_size=4, out_dir=str(tmp_path)), rollout=RolloutConfig(n=4))
    with pytest.raises(ConfigError, match="beta"):
        A2CConfig(beta=1.5)
    a = A2C(load_causal_lm(small_dir), tok, lambda p, r: [1.0], PROMPTS, rollout=RolloutConfig(n=2),
            trainer=TrainerConfig(batch_size=4, out_dir=str(tmp_path)))
    fake = Rollout(["p", "p"], ["a", "b"], {}, ["eos", "eos"])
    with pytest.raises(PrsJaxError, match="1 values for 2 responses"):
        a.score(fake)
    a.reward = lambda p, r: [1.0, float("nan")]
    with pytest.raises(PrsJaxError, match="must be finite"):
        a.score(fake)


# ---------------------------------------------------------------------------------------------- training runs
def make_a2c(model_dir: Path, out_dir: Path, beta: float = 0.0) -> A2C:
    return A2C(load_causal_lm(model_dir), load_tokenizer(model_dir), vowel_reward, PROMPTS,
               config=A2CConfig(beta=beta, scale_reward=False, logprob_method="plain"),
               rollout=RolloutConfig(n=8, max_new_tokens=4),
               trainer=TrainerConfig(out_dir=str(out_dir), steps=ITERATIONS, batch_size=32, save_every=4,
                                     progress=False, tensorboard=False, async_checkpoint=False),
               optim=OptimConfig(lr=3e-2, clip_norm=1.0))


def rows_of(out_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _logp_at(logits_btv: np.ndarray, targets_bt: np.ndarray, temperature: float) -> np.ndarray:
    z = logits_btv.astype(np.float64) / temperature
    z = z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(-1, keepdims=True)
    return np.take_along_axis(z, targets_bt[..., None], -1)[..., 0]


def test_logps_are_at_the_sampling_temperature(small_dir, tmp_path):
    """Rollouts sample from softmax(logits / T): old_logp, the training forward and the reference are all
    log softmax(logits / T) of a plain forward (the old code scored them at T = 1)."""
    a = make_a2c(small_dir, tmp_path)  # the training runs' shapes: their engine and forward programs are reused
    t = a.rollout_config.temperature
    assert t == 0.9
    roll = a.rollout(range(len(PROMPTS)), seed=3)
    ids, mask, lm = (roll.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask"))
    r = lm.shape[1]
    logits, _ = a.model.policy(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    logits = np.asarray(logits)[:, -r - 1:-1]
    want, raw = _logp_at(logits, ids[:, -r:], t), _logp_at(logits, ids[:, -r:], 1.0)
    assert lm.sum() > 4 and np.all(roll.arrays["old_logp"][~lm] == 0)

    def on(x):
        return np.asarray(x)[lm]

    np.testing.assert_allclose(on(roll.arrays["old_logp"]), on(want), atol=2e-5)
    assert np.max(np.abs(on(raw) - on(want))) > 1e-2  # what the old behaviour stored: visibly different
    # the training forward (the loss object scores at the rollout temperature) and the reference agree
    assert a.trainer.loss_fn.temperature == t
    logp, _ = a.model.logps_and_values(jnp.asarray(ids), jnp.asarray(mask), r, a._static, temperature=t)
    np.testing.assert_allclose(on(logp), on(want), atol=2e-5)
    np.testing.assert_allclose(on(a.reference_logps(roll.arrays)), on(want), atol=2e-5)  # ref_T (ref = policy)
    np.testing.assert_allclose(on(a.reference_logps(roll.arrays, 1.0)), on(raw), atol=2e-5)


@pytest.fixture(scope="module")
def beta0_run(small_dir, tmp_path_factory):
    """12 iterations, 4 prompts x 8 rollouts of 4 tokens, reward = share of vowels, beta = 0."""
    out = tmp_path_factory.mktemp("a2c") / "beta0"
    a = make_a2c(small_dir, out)
    before = a.evaluate(n=8, seed=123)
    compilations = []
    rollout = a.rollout

    def counted(*args, **kwargs):  # engine programs compiled per rollout (a fresh engine each iteration)
        import prs_jax.tree.engine as E

        sizes = E.DECODE._cache_size() + E.EXTEND._cache_size()
        out = rollout(*args, **kwargs)
        compilations.append(E.DECODE._cache_size() + E.EXTEND._cache_size() - sizes)
        return out

    a.rollout = counted
    a.train()
    a.rollout = rollout
    after = a.evaluate(n=8, seed=123)
    return {"a2c": a, "before": before, "after": after, "rows": rows_of(out), "out": out,
            "compilations": compilations}


def test_a2c_raises_reward_and_fits_value(beta0_run):
    before, after, rows = beta0_run["before"], beta0_run["after"], beta0_run["rows"]
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    assert after["reward"] > before["reward"] + 0.2, (before, after)
    # the value head tracks the rising reward: over the last iterations its loss (value_coef 0.5 x MSE; with
    # beta = 0 the return is the reward) stays far below a zero predictor's. (Whether it also halves within 12
    # iterations depends on the sampling stream: it did under the old keys, not under the position-keyed ones.)
    late = rows[-4:]
    assert np.mean([r["value_loss"] for r in late]) < 0.5 * 0.5 * np.mean([r["reward"] ** 2 for r in late]), rows
    # the training forward reproduces the sampler's log-probs (the policy gradient is on-policy)
    assert max(abs(r["logp_minus_rollout"]) for r in rows) < 1e-4
    # new weights every iteration, no new programs: only the first rollout compiled anything
    assert sum(beta0_run["compilations"][1:]) == 0
    assert beta0_run["a2c"].iteration == ITERATIONS


def test_kl_term_keeps_policy_near_reference(beta0_run, small_dir, tmp_path):
    a = make_a2c(small_dir, tmp_path / "beta1", beta=1.0)
    a.train()
    kl_free, kl_held = beta0_run["after"]["kl"], a.evaluate(n=8, seed=123)["kl"]
    assert kl_free > 5.0 and kl_held < 0.3 * kl_free, (kl_free, kl_held)


def test_resume_continues_identically(beta0_run, small_dir, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(beta0_run["out"], run)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["12", "8"]
    shutil.rmtree(ckpts / "12")  # as if killed after iteration 8
    a = make_a2c(small_dir, run)
    a.train()
    assert a.trainer.restored_meta["a2c_iteration"] == 8
    rows = rows_of(run)  # the steps logged after the restored checkpoint were dropped, then logged again
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    resumed = rows[8:]
    for r, want in zip(resumed, beta0_run["rows"][8:]):
        for k in ("loss", "reward", "kl", "value_loss", "grad_norm"):
            assert r[k] == want[k], (k, r["step"])  # bitwise on CPU: same RNG, prompts, params, optimizer state
    for x, y in zip(jax.tree.leaves(a.trainer._params), jax.tree.leaves(beta0_run["a2c"].trainer._params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_train_a2c_separate_critic_kl_loss(small_dir, tmp_path):
    cfg = EXAMPLES / "configs" / "train_a2c_tiny.yaml"
    args = ["train", "a2c", str(cfg), f"model={small_dir}", f"prompts.path={EXAMPLES / 'data' / 'tiny_prompts.jsonl'}",
            "value.head=separate", f"value.export_dir={tmp_path / 'critic'}", "a2c.kl_mode=loss",
            "rollout.max_new_tokens=8", f"trainer.out_dir={tmp_path / 'run'}", "trainer.steps=2",
            "trainer.batch_size=8", "trainer.save_every=0", "trainer.progress=false", "trainer.tensorboard=false",
            f"export_dir={tmp_path / 'export'}"]
    assert main(args) == 0
    rows = rows_of(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # policy = reference at the first step
    assert load_causal_lm(tmp_path / "export").config.hidden_size == 32
    assert load_reward_model(tmp_path / "critic").num_labels == 1
    assert main(["train", "a2c", str(cfg), f"model={small_dir}", "trainer.batch_size=6"]) == 2  # 6 % n=4
