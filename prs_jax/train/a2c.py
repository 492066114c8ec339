"""A2C / REINFORCE with a learned value baseline against any reward (RLAIF, Lee et al. 2023, section RL).

Objective: J = E[(1 - beta) r(x, y) - beta KL(pi || pi_ref)], beta = 0.05 by default (`scale_reward=False`
drops the (1 - beta) factor). One iteration of the outer loop:

  1. rollout    `prompts_per_iteration = trainer.batch_size / rollout.n` prompts, n samples each, from the
                CURRENT policy on the tree engine (siblings share the prompt's KV; temperature 0.9). The
                engine keeps each sampled token's log-prob under the raw policy: `old_logp`.
  2. reward     any `Reward`: (prompts, responses) -> floats (a reward model, a direct-RLAIF judge, a Python
                function).
  3. reference  log pi_ref of the sampled tokens: one forward of the frozen reference model whose hidden states
                reach the vocabulary projection at response positions only.
  4. update     `steps_per_iteration` optimizer steps on that batch through the shared Trainer (optax chain,
                gradient accumulation, NaN guard, JSONL/TensorBoard logs, Orbax checkpoints).

Per response token t (action a_t, state s_t = prompt + a_<t), gamma = 1, the sequence reward at the last token:

    kl_mode="reward":  r_t = -beta (old_logp_t - ref_logp_t) + [t = last] w r      (w = 1 - beta, or 1)
    kl_mode="loss":    r_t = [t = last] w r, and the loss gains beta * 1/2 (logp_t - ref_logp_t)^2; on on-policy
                       samples its gradient is the gradient of KL(pi(.|s_t) || pi_ref(.|s_t)) at each state
    R_t = sum_{t' >= t} r_t'   (return to go; no GAE, no clipping, no importance ratio)
    policy loss = -sum_t logp_t * sg(R_t - V(s_t)),   value loss = value_coef * sum_t (R_t - V(s_t))^2

Normalisation: every sum runs over all response tokens of the batch and is divided by the number of response
tokens in it (under gradient accumulation, each micro-batch's own count): a token mean, so the loss scale does
not depend on the batch size or the response length.

V(s_t) is read from the hidden state that predicts a_t: a Dense head on the policy's backbone
(`ValueConfig.head="shared"`, zero-initialised so the first advantages are the returns) or a separate critic
(a reward-model backbone + scalar head, from the SFT checkpoint by default) trained by the same optimizer.

Batches have fixed shapes (prompt part left-padded to a bucket of the longest prompt of the set, responses
right-padded to `max_new_tokens`), so the training step, the reference forward and the engine's programs each
compile once per run. The engine is rebuilt on the policy module each iteration after `Trainer.sync_model`:
its compiled programs are keyed on the graph, not the weights, so new weights cost no compilation.

Resume: each checkpoint stores the iteration counter and the RNG key next to the parameters and optimizer
state; prompt order is a function of (seed, iteration). Rerunning the same command continues bitwise as the
uninterrupted run would on CPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from tqdm import tqdm

from prs_jax.config import check_ranges, import_object  # noqa: F401  (import_object lived here)
from prs_jax.errors import ConfigError, DataError, PrsJaxError
from prs_jax.models.layers import Dense
from prs_jax.models.tokenizer import encode_chat
from prs_jax.models.transformer import CausalLM, RewardModel
from prs_jax.models.window import check_fits, window_of
from prs_jax.train.logprobs import token_logprobs
from prs_jax.train.objectives import Static, unembed_matrix
from prs_jax.train.trainer import (
    OptimConfig,
    Trainer,
    TrainerConfig,
    TrainingError,
    data_order,
)
from prs_jax.tree.engine import EngineConfig, TreeEngine, bucket
from prs_jax.tree.sampling import SamplingParams

Metrics = dict[str, jax.Array]
KLMode = Literal["reward", "loss"]


# ------------------------------------------------------------------------------------------------ pure math
def returns_to_go(rewards_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Undiscounted return to go R_t = sum_{t' >= t} r_t' over the masked positions (gamma = 1), 0 elsewhere."""
    mask = mask_bt.astype(bool)
    r = jnp.where(mask, rewards_bt.astype(jnp.float32), 0.0)
    return jnp.where(mask, jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1), 0.0)


def shaped_rewards(reward_b: jax.Array, kl_bt: jax.Array, mask_bt: jax.Array, *, beta: float | jax.Array,
                   kl_in_reward: bool, scale_reward: bool) -> jax.Array:
    """Per-token rewards [B, T]: w * reward at each row's last masked token (w = 1 - beta if scale_reward else 1),
    minus beta * kl_t on every masked token when the KL penalty is folded into the reward."""
    mask = mask_bt.astype(bool)
    last = jnp.sum(mask, axis=-1) - 1
    at_last = (jnp.arange(mask.shape[1])[None, :] == last[:, None]) & mask
    w = (1.0 - beta) if scale_reward else 1.0
    r = jnp.where(at_last, w * reward_b.astype(jnp.float32)[:, None], 0.0)
    if kl_in_reward:
        r = r - beta * jnp.where(mask, kl_bt.astype(jnp.float32), 0.0)
    return r


def a2c_loss(logp_bt: jax.Array, values_bt: jax.Array, old_logp_bt: jax.Array, ref_logp_bt: jax.Array,
             reward_b: jax.Array, mask_bt: jax.Array, *, beta: float | jax.Array, kl_mode: KLMode = "reward",
             scale_reward: bool = True, value_coef: float = 0.5, normalize_advantages: bool = False
             ) -> tuple[jax.Array, Metrics]:
    """The A2C loss (see the module docstring) as a token mean over the batch, and its metrics.

    logp_bt: policy log-probs of the sampled tokens (with gradient); values_bt: V(s_t) (with gradient);
    old_logp_bt: log-probs at rollout time; ref_logp_bt: reference log-probs; reward_b: sequence rewards;
    mask_bt: response tokens. All [B, T] except reward_b [B]."""
    mask = mask_bt.astype(bool)
    m = mask.astype(jnp.float32)
    n_tok = jnp.maximum(jnp.sum(m), 1.0)
    logp = logp_bt.astype(jnp.float32)
    values = values_bt.astype(jnp.float32)
    ref = ref_logp_bt.astype(jnp.float32)
    kl_old = jnp.where(mask, old_logp_bt.astype(jnp.float32) - ref, 0.0)  # k1 estimate per sampled token
    rewards = shaped_rewards(reward_b, kl_old, mask, beta=beta, kl_in_reward=kl_mode == "reward",
                             scale_reward=scale_reward)
    returns = returns_to_go(rewards, mask)
    adv_raw = jax.lax.stop_gradient(returns - values)
    adv = adv_raw
    if normalize_advantages:
        mean = jnp.sum(adv * m) / n_tok
        std = jnp.sqrt(jnp.sum(jnp.square(adv - mean) * m) / n_tok)
        adv = (adv - mean) / (std + 1e-8)
    policy_loss = -jnp.sum(jnp.where(mask, logp * adv, 0.0)) / n_tok
    value_loss = value_coef * jnp.sum(jnp.where(mask, jnp.square(returns - values), 0.0)) / n_tok
    loss = policy_loss + value_loss
    kl_loss = jnp.float32(0.0)
    if kl_mode == "loss":
        kl_loss = beta * jnp.sum(jnp.where(mask, 0.5 * jnp.square(logp - ref), 0.0)) / n_tok
        loss = loss + kl_loss
    reward = reward_b.astype(jnp.float32)
    adv_mean = jnp.sum(adv_raw * m) / n_tok
    metrics = {
        "policy_loss": policy_loss, "value_loss": value_loss, "kl_loss": kl_loss,
        "reward": jnp.mean(reward), "reward_std": jnp.std(reward),
        "kl": jnp.mean(jnp.sum(kl_old, axis=-1)),  # sequence KL(pi || ref) estimate at the rollout
        "return": jnp.sum(returns * m) / n_tok, "value": jnp.sum(values * m) / n_tok,
        "advantage": adv_mean, "advantage_std": jnp.sqrt(jnp.sum(jnp.square(adv_raw - adv_mean) * m) / n_tok),
        # ~0 on the first step after a rollout: the training forward agrees with the sampler's log-probs
        "logp_minus_rollout": jnp.sum(jnp.where(mask, logp - old_logp_bt, 0.0)) / n_tok,
        "response_len": jnp.mean(jnp.sum(m, axis=-1)),
    }
    return loss, metrics


# ------------------------------------------------------------------------------------------------ models
class ActorCritic(nnx.Module):
    """What the trainer optimises: the policy and its value function (a head on the policy's backbone, or a
    separate critic = reward-model backbone + scalar head)."""

    def __init__(self, policy: CausalLM, critic: RewardModel | None = None, *, seed: int = 0):
        self.policy = policy
        self.critic = critic
        head = None
        if critic is None:
            dtype = policy.model.embed_tokens.embedding[...].dtype
            head = Dense(policy.config.hidden_size, 1, ("embed", None), bias=True, dtype=dtype, rngs=nnx.Rngs(seed))
            head.kernel.set_value(jnp.zeros_like(head.kernel.get_value()))
        self.value_head = head

    def logps_and_values(self, ids: jax.Array, mask: jax.Array, r: int, static: Static
                         ) -> tuple[jax.Array, jax.Array]:
        """Log-probs [B, r] of the last r tokens and the values [B, r] of the states before them (only those r
        hidden states reach the vocabulary projection)."""
        hidden, _ = self.policy.model(ids, attention_mask=mask, remat=static.remat)
        h = hidden[:, -r - 1:-1]
        logp = token_logprobs(h, unembed_matrix(self.policy).astype(h.dtype), ids[:, -r:],
                              method=static.logprob_method)
        if self.critic is None:
            values = self.value_head(h)[..., 0]
        else:
            hc, _ = self.critic.model(ids, attention_mask=mask, remat=static.remat)
            values = self.critic.head(hc[:, -r - 1:-1])[..., 0]
        return logp, values.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class A2CLoss:
    """The trainer's loss object: batch (input_ids, attention_mask, loss_mask, old_logp, ref_logp, reward) ->
    `a2c_loss`."""

    beta: float = 0.05
    kl_mode: KLMode = "reward"
    scale_reward: bool = True
    value_coef: float = 0.5
    normalize_advantages: bool = False

    def __call__(self, model: ActorCritic, batch: dict[str, jax.Array], static: Static) -> tuple[jax.Array, Metrics]:
        r = batch["loss_mask"].shape[1]
        logp, values = model.logps_and_values(batch["input_ids"], batch["attention_mask"], r, static)
        return a2c_loss(logp, values, batch["old_logp"], batch["ref_logp"], batch["reward"], batch["loss_mask"],
                        beta=self.beta, kl_mode=self.kl_mode, scale_reward=self.scale_reward,
                        value_coef=self.value_coef, normalize_advantages=self.normalize_advantages)


def _tail_logps_fn(state, ids, mask, *, graphdef, r, method):
    model = nnx.merge(graphdef, state)
    hidden, _ = model.model(ids, attention_mask=mask)
    h = hidden[:, -r - 1:-1]
    return token_logprobs(h, unembed_matrix(model).astype(h.dtype), ids[:, -r:], method=method)


# log-probs of the last r tokens (the response), for the frozen reference; shared by every A2C run
TAIL_LOGPS = jax.jit(_tail_logps_fn, static_argnames=("graphdef", "r", "method"))


# ------------------------------------------------------------------------------------------------ rewards
class Reward(Protocol):
    """Rewards for responses to prompts: any callable (prompts, responses) -> floats."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


@dataclasses.dataclass
class ScorerReward:
    """Adapter: a strategies `Scorer` (RewardModelScorer, CallableScorer, an AI judge taking (prompts, responses,
    preferences)) as a `Reward`; preferences are None (the policy's prompt already holds any preference)."""

    scorer: Callable[[Sequence[str], Sequence[str], Sequence[str | None]], Sequence[float]]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(x) for x in self.scorer(prompts, responses, [None] * len(prompts))]


@dataclasses.dataclass
class PairReward:
    """Adapter: a per-pair function fn(prompt, response) -> float as a `Reward`."""

    fn: Callable[[str, str], float]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]


# ------------------------------------------------------------------------------------------------ configs
@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of the rollouts: n samples per prompt (siblings share the prompt's KV), temperature 0.9."""

    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    chat: bool | None = None  # prompts as a user chat turn; None: when the tokenizer has a chat template
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"rollout.n ({self.n}) and rollout.max_new_tokens ({self.max_new_tokens}) must be "
                              "positive.")

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


@dataclasses.dataclass(frozen=True)
class A2CConfig:
    """The method: KL strength beta, how KL enters (`reward`: per-token penalty; `loss`: a loss term), the
    (1 - beta) reward weight of the paper, value-loss weight, optimizer steps per rollout batch."""

    beta: float = 0.05
    kl_mode: KLMode = "reward"
    scale_reward: bool = True
    value_coef: float = 0.5
    normalize_advantages: bool = False
    steps_per_iteration: int = 1  # > 1 reuses a rollout batch (off-policy after the first step; not the paper)
    logprob_method: Literal["plain", "chunked", "pallas"] = "chunked"
    remat: bool = False

    def __post_init__(self) -> None:
        if not self.beta >= 0 or (self.scale_reward and self.beta > 1):
            raise ConfigError(f"a2c.beta must be >= 0 (and <= 1 with scale_reward, the reward weight is 1 - beta); "
                              f"got {self.beta}.")
        if self.steps_per_iteration < 1:
            raise ConfigError(f"a2c.steps_per_iteration must be >= 1, got {self.steps_per_iteration}.")
        if self.value_coef < 0:
            raise ConfigError(f"a2c.value_coef must be >= 0, got {self.value_coef}.")

    def loss(self) -> A2CLoss:
        """The trainer's loss object."""
        return A2CLoss(self.beta, self.kl_mode, self.scale_reward, self.value_coef, self.normalize_advantages)


# ------------------------------------------------------------------------------------------------ the loop
@dataclasses.dataclass
class Rollout:
    """One batch of rollouts: texts per sequence and the fixed-shape arrays of the training batch."""

    prompts: list[str]
    responses: list[str]
    arrays: dict[str, np.ndarray]  # input_ids, attention_mask [B, P + R]; loss_mask, old_logp [B, R]
    finish_reasons: list[str]


def _copy_module(module: nnx.Module) -> nnx.Module:
    # fresh buffers: the trainer donates the policy's parameter buffers, a reference sharing them would die
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


class A2C:
    """A2C against a reward: rollouts on the tree engine, reference log-probs, steps through the shared Trainer.

    `trainer.batch_size` is sequences per optimizer step (= prompts per iteration x rollout.n) and
    `trainer.steps` counts optimizer steps (= iterations x a2c.steps_per_iteration); `trainer.save_every` must be
    a multiple of steps_per_iteration so checkpoints fall between iterations."""

    def __init__(self, policy: CausalLM, tokenizer: Any, reward: Reward, prompts: Sequence[str], *,
                 config: A2CConfig = A2CConfig(), rollout: RolloutConfig = RolloutConfig(),
                 trainer: TrainerConfig = TrainerConfig(), optim: OptimConfig = OptimConfig(),
                 ref: CausalLM | None = None, critic: RewardModel | None = None,
                 run_config: Mapping[str, Any] | None = None):
        k = config.steps_per_iteration
        if trainer.batch_size % rollout.n:
            raise ConfigError(f"trainer.batch_size ({trainer.batch_size}) must be a multiple of rollout.n "
                              f"({rollout.n}): each step trains on (prompts per iteration) x n rollouts.")
        if trainer.steps % k or (trainer.save_every and trainer.save_every % k):
            raise ConfigError(f"trainer.steps ({trainer.steps}) and trainer.save_every ({trainer.save_every}) must "
                              f"be multiples of a2c.steps_per_iteration ({k}).")
        if not prompts:
            raise DataError("a2c: no prompts.")
        self.config, self.rollout_config, self.tokenizer, self.reward = config, rollout, tokenizer, reward
        self.prompts = list(prompts)
        self.prompts_per_iteration = trainer.batch_size // rollout.n
        self.iterations = trainer.steps // k
        self.ref = ref if ref is not None else _copy_module(policy)
        self._ref_graphdef, self._ref_state = nnx.split(self.ref)
        self.model = ActorCritic(policy, critic, seed=trainer.seed)
        self.trainer = Trainer(self.model, config.loss(), trainer, optim, run_config=run_config)
        self._chat = rollout.chat if rollout.chat is not None else bool(getattr(tokenizer, "chat_template", None))
        self._prompt_ids = [self._encode(p, i) for i, p in enumerate(self.prompts)]
        window = window_of(policy)
        for i, ids in enumerate(self._prompt_ids):  # before any work: every rollout must fit the policy
            check_fits(len(ids) + rollout.max_new_tokens, window, model="policy",
                       what=f"a2c prompt {i} ({self.prompts[i][:40]!r}): prompt ({len(ids)} tokens) + "
                            f"rollout.max_new_tokens ({rollout.max_new_tokens})",
                       fix="lower rollout.max_new_tokens, shorten or drop the prompt (prompts.max_prompts), or use "
                           "a longer-context policy.")
        # fixed shapes for the whole run: prompt part = bucket of the longest prompt, response = max_new_tokens
        self.prompt_len = bucket(max(len(t) for t in self._prompt_ids), 16)
        self.response_len = rollout.max_new_tokens
        self._static = Static(r_max=self.response_len, logprob_method=config.logprob_method, remat=config.remat)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                          (policy.config.pad_token_id or 0))
        self._key = jax.random.key(trainer.seed)
        self.iteration = 0

    def _encode(self, prompt: str, i: int) -> list[int]:
        if self._chat:
            ids = encode_chat(self.tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise DataError(f"a2c: prompt {i} is empty after tokenisation: {prompt!r:.80}")
        return ids

    def prompt_indices(self, iteration: int) -> np.ndarray:
        """The prompts of an iteration: epochs over fresh permutations seeded by (seed, epoch), as the trainer."""
        return data_order(len(self.prompts), self.trainer.config.seed, iteration, self.prompts_per_iteration)

    def rollout(self, indices: Sequence[int], seed: int, *, n: int | None = None,
                sampling: SamplingParams | None = None) -> Rollout:
        """Sample n responses per prompt from the current weights of `self.model.policy` on a fresh tree engine."""
        rc = self.rollout_config
        n = rc.n if n is None else n
        engine = TreeEngine(self.model.policy, self.tokenizer, seed=seed, pad_id=self.pad_id, config=EngineConfig(
            attention_impl=rc.attention_impl, min_prefix_bucket=self.prompt_len, min_extend_bucket=self.prompt_len))
        roots = engine.add_prompts([self._prompt_ids[i] for i in indices])
        kids = engine.expand(roots, n, sampling or rc.sampling(), max_new_tokens=self.response_len)
        b, p, r = len(indices) * n, self.prompt_len, self.response_len
        ids = np.full((b, p + r), self.pad_id, np.int32)
        mask = np.zeros((b, p + r), bool)
        loss_mask = np.zeros((b, r), bool)
        old_logp = np.zeros((b, r), np.float32)
        prompts, responses, reasons = [], [], []
        for j, (i, children) in enumerate(zip(indices, kids)):
            prompt = self._prompt_ids[i]
            for c, node in enumerate(children):
                row = j * n + c
                ids[row, p - len(prompt):p] = prompt  # left-padded prompt: response starts at column p
                mask[row, p - len(prompt):p] = True
                toks = node.tokens
                ids[row, p:p + len(toks)] = toks
                mask[row, p:p + len(toks)] = True
                loss_mask[row, :len(toks)] = True
                old_logp[row, :len(toks)] = node.logprobs
                prompts.append(self.prompts[i])
                responses.append(node.text)
                reasons.append(node.finish_reason or "")
        return Rollout(prompts, responses, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
                                            "old_logp": old_logp}, reasons)

    def score(self, rollout: Rollout) -> np.ndarray:
        """Rewards [B] of a rollout batch (checked: one finite number per response)."""
        out = np.asarray(self.reward(rollout.prompts, rollout.responses), np.float32).reshape(-1)
        if out.shape[0] != len(rollout.responses):
            raise PrsJaxError(f"a2c: the reward returned {out.shape[0]} values for {len(rollout.responses)} "
                              "responses; it must return one float per (prompt, response).")
        if not np.all(np.isfinite(out)):
            bad = int(np.argmax(~np.isfinite(out)))
            raise PrsJaxError(f"a2c: the reward returned {out[bad]} for response {bad} "
                              f"({rollout.responses[bad]!r:.80}); rewards must be finite.")
        return out

    def reference_logps(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """log pi_ref [B, R] of the response tokens (response positions only reach the unembedding)."""
        return np.asarray(TAIL_LOGPS(self._ref_state, jnp.asarray(arrays["input_ids"]),
                                     jnp.asarray(arrays["attention_mask"]), graphdef=self._ref_graphdef,
                                     r=self.response_len, method=self.config.logprob_method))

    def evaluate(self, indices: Sequence[int] | None = None, *, n: int | None = None, seed: int = 0,
                 temperature: float = 1.0) -> dict[str, float]:
        """Mean reward, sequence KL(pi || ref) estimate and length of fresh samples from the current policy
        (temperature 1 by default: then the KL estimate is unbiased)."""
        self.trainer.sync_model()
        indices = list(range(len(self.prompts))) if indices is None else list(indices)
        roll = self.rollout(indices, seed, n=n, sampling=dataclasses.replace(
            self.rollout_config.sampling(), temperature=temperature))
        rewards = self.score(roll)
        m = roll.arrays["loss_mask"]
        kl = np.sum(np.where(m, roll.arrays["old_logp"] - self.reference_logps(roll.arrays), 0.0), axis=-1)
        return {"reward": float(rewards.mean()), "kl": float(kl.mean()), "response_len": float(m.sum(-1).mean())}

    def train(self) -> dict[str, float]:
        """Run to `trainer.steps` optimizer steps (resuming from the latest checkpoint); returns the last metrics."""
        tr, k = self.trainer, self.config.steps_per_iteration
        if tr.start():
            meta = tr.restored_meta or {}
            self.iteration = int(meta.get("a2c_iteration", tr.step // k))
            if "a2c_rng" in meta:
                self._key = jax.random.wrap_key_data(np.asarray(meta["a2c_rng"], np.uint32))
            if tr.step != self.iteration * k:
                tr.close()  # releases the run directory's lock
                raise TrainingError(f"{tr.out_dir}: checkpoint at step {tr.step} is not at an iteration boundary "
                                    f"(iteration {self.iteration} x {k} steps); use another out_dir.")
            tqdm.write(f"resumed from iteration {self.iteration} (step {tr.step}, {tr.out_dir / 'checkpoints'})")
        bar = tqdm(total=self.iterations, initial=self.iteration, desc="a2c", unit="iter",
                   disable=not tr.config.progress)
        last: dict[str, float] = {}
        try:
            while self.iteration < self.iterations:
                self._key, sub = jax.random.split(self._key)
                seed = int(jax.random.randint(sub, (), 0, np.iinfo(np.int32).max))
                tr.sync_model()  # the engine samples from the current weights
                t0 = time.perf_counter()
                roll = self.rollout(self.prompt_indices(self.iteration), seed)
                t1 = time.perf_counter()
                rewards = self.score(roll)
                t2 = time.perf_counter()
                arrays = {**roll.arrays, "reward": rewards, "ref_logp": self.reference_logps(roll.arrays)}
                t3 = time.perf_counter()
                # a checkpoint written by this iteration's last step resumes at the next iteration
                tr.checkpoint_meta = {"a2c_iteration": self.iteration + 1,
                                      "a2c_rng": np.asarray(jax.random.key_data(self._key)).tolist()}
                extra = {"iteration": float(self.iteration + 1), "rollout_s": t1 - t0, "reward_s": t2 - t1,
                         "reference_s": t3 - t2}
                for _ in range(k):
                    last = tr.train_on(arrays, self._static, extra_metrics=extra)
                self.iteration += 1
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['kl']:.3f}",
                                value_loss=f"{last['value_loss']:.3f}")
        finally:
            bar.close()
            tr.close()
        return last


# ------------------------------------------------------------------------------------------------ run config
@dataclasses.dataclass(frozen=True)
class PromptsConfig:
    """Where the prompts are (any prompt set of prs_jax.data.prompt_sets; `generic` reads `prompt_column`)."""

    path: str = ""
    format: str = "generic"
    split: str | None = None
    prompt_column: str = "prompt"
    id_column: str = "id"
    max_prompts: int | None = None
    include_preference: bool = False  # policy and reward see x, a blank line, z (column `preference`)

    def __post_init__(self) -> None:
        check_ranges(self, "prompts", {"max_prompts": ">= 1"})


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward: a Python object `callable: package.module:name` or a reward-model directory.

    interface: "batch" fn(prompts, responses) -> floats; "pair" fn(prompt, response) -> float; "scorer"
    fn(prompts, responses, preferences) -> floats (prs_jax scorers, AI judges). With `kwargs` the object is a
    factory called with them to build the reward (e.g. a judge class and its model directory)."""

    callable: str | None = None
    kwargs: dict[str, Any] | None = None
    interface: Literal["batch", "pair", "scorer"] = "batch"
    reward_model: str | None = None
    head_name: str | None = None
    formatter: Literal["chat", "template"] = "chat"
    template: str = "Human: {prompt}\n\nAssistant: {response}"

    def build(self) -> Reward:
        """The `Reward` this section describes."""
        if self.callable and self.reward_model:
            raise ConfigError("reward: set either `reward.callable` or `reward.reward_model`, not both.")
        if self.callable:
            obj = import_object(self.callable)
            if self.kwargs is not None:
                obj = obj(**self.kwargs)
            if not callable(obj):
                raise ConfigError(f"reward.callable: {self.callable!r} is not callable.")
            if self.interface == "pair":
                return PairReward(obj)
            return ScorerReward(obj) if self.interface == "scorer" else obj
        if not self.reward_model:
            raise ConfigError("reward: set `reward.callable` (package.module:name) or `reward.reward_model` (a "
                              "reward-model checkpoint directory).")
        from prs_jax.models import load_reward_model, load_tokenizer
        from prs_jax.strategies.base import RewardModelScorer
        from prs_jax.tree.scoring import RewardFormatter, RewardScorer

        rm = load_reward_model(self.reward_model, head_name=self.head_name)
        scorer = RewardScorer(rm, load_tokenizer(self.reward_model), RewardFormatter(self.formatter, self.template))
        return ScorerReward(RewardModelScorer(scorer))


@dataclasses.dataclass(frozen=True)
class ValueConfig:
    """The value function: a head on the policy's backbone (`shared`) or a separate critic (`separate`: a
    reward-model backbone + head from `model`, default the policy's SFT checkpoint with a fresh head)."""

    head: Literal["shared", "separate"] = "shared"
    model: str | None = None
    head_name: str | None = None
    export_dir: str | None = None  # write the trained separate critic as an HF reward-model directory


@dataclasses.dataclass(frozen=True)
class A2CRunConfig:
    """`prs-jax train a2c`: the SFT policy, reference, prompts, reward, rollouts, method, optimizer, loop."""

    model: str = ""
    ref_model: str | None = None  # default: the policy's starting checkpoint
    tokenizer: str | None = None  # default: the model directory
    dtype: Literal["float32", "bfloat16"] = "float32"
    prompts: PromptsConfig = PromptsConfig()
    reward: RewardConfig = RewardConfig()
    rollout: RolloutConfig = RolloutConfig()
    a2c: A2CConfig = A2CConfig()
    value: ValueConfig = ValueConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    export_dir: str | None = None


def read_prompts(cfg: PromptsConfig) -> list[str]:
    """Prompt texts of the configured prompt set (x, or x + blank line + z with include_preference)."""
    from prs_jax.data.prompt_sets import load_prompt_set
    from prs_jax.strategies.base import join_preference

    if not cfg.path:
        raise ConfigError("a2c: `prompts.path` (a JSONL / Parquet / datasets source of prompts) is required.")
    options: dict[str, Any] = {"limit": cfg.max_prompts}
    if cfg.format in ("generic", "jsonl"):
        options.update(prompt_column=cfg.prompt_column, id_column=cfg.id_column,
                       preference_column="preference" if cfg.include_preference else None)
    items = load_prompt_set(cfg.format, cfg.path, cfg.split, **options)
    if not items:
        raise DataError(f"{cfg.path}: no prompts.")
    return [join_preference(it.prompt, it.preference) if cfg.include_preference else it.prompt for it in items]


def run_a2c(cfg: A2CRunConfig, console: Console | None = None) -> dict[str, float]:
    """Build everything from the run config, train, export the policy; returns the last training metrics."""
    from prs_jax.config import to_dict
    from prs_jax.models import (
        load_causal_lm,
        load_reward_model,
        load_tokenizer,
        save_pretrained,
    )

    console = console or Console()
    if not cfg.model:
        raise ConfigError("train a2c: `model` (the SFT policy, a local HF checkpoint directory) is required.")
    tok_dir = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tok_dir)
    prompts = read_prompts(cfg.prompts)
    reward = cfg.reward.build()
    policy = load_causal_lm(cfg.model, dtype=cfg.dtype)
    ref = load_causal_lm(cfg.ref_model or cfg.model, dtype=cfg.dtype)
    critic = None
    if cfg.value.head == "separate":
        critic = load_reward_model(cfg.value.model or cfg.model, dtype=cfg.dtype, head_name=cfg.value.head_name,
                                   init_head=True, seed=cfg.trainer.seed)
    elif cfg.value.model or cfg.value.export_dir:
        raise ConfigError("value.model / value.export_dir apply to `value.head: separate` only.")
    console.print(f"a2c: {len(prompts)} prompts, {cfg.trainer.batch_size // cfg.rollout.n} per iteration x "
                  f"n={cfg.rollout.n}, {cfg.trainer.steps // cfg.a2c.steps_per_iteration} iterations, "
                  f"beta={cfg.a2c.beta} (KL in the {cfg.a2c.kl_mode}), value head {cfg.value.head}", markup=False)
    a2c = A2C(policy, tokenizer, reward, prompts, config=cfg.a2c, rollout=cfg.rollout, trainer=cfg.trainer,
              optim=cfg.optim, ref=ref, critic=critic, run_config={"task": "a2c", **to_dict(cfg)})
    last = a2c.train()
    if cfg.export_dir:
        out = save_pretrained(a2c.model.policy, cfg.export_dir, tokenizer=tok_dir)
        console.print(f"export: policy written to {out}", markup=False)
    if critic is not None and cfg.value.export_dir:
        out = save_pretrained(a2c.model.critic, cfg.value.export_dir, tokenizer=tok_dir)
        console.print(f"export: critic written to {out}", markup=False)
    console.print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(last.items())), markup=False)
    return last
