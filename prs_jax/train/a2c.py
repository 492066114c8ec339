"""A2C / REINFORCE with a learned value baseline against any reward (RLAIF, Lee et al. 2023, section RL): the
loop, its configs and the `prs-jax train a2c` runner.

The pieces live apart: the pure loss math (`returns_to_go`, `shaped_rewards`, `a2c_loss`) in
prs_jax.train.losses, the policy + value module and the trainer's loss object in prs_jax.train.a2c_model, the
rollouts (sampling, batch packing, log-probs at the sampling temperature) in prs_jax.train.rollout, the reward
interface, adapters and `RewardConfig` in prs_jax.train.a2c_rewards. Their public names are re-exported here.

Objective: J = E[(1 - beta) r(x, y) - beta KL(pi_T || pi_ref,T)], beta = 0.05 by default (`scale_reward=False`
drops the (1 - beta) factor); pi_T = softmax(logits / T) is the policy at the rollout temperature T
(`rollout.temperature`, 0.9), the distribution the samples come from, and every log-prob below (policy, rollout,
reference) is taken at T (see prs_jax.train.rollout for why the reference is tempered too). One iteration:

  1. rollout    `prompts_per_iteration = trainer.batch_size / rollout.n` prompts, n samples each, from the
                CURRENT policy on the tree engine (siblings share the prompt's KV); the engine keeps
                log pi_T of each sampled token: `old_logp`.
  2. reward     any `Reward`: (prompts, responses) -> floats (a reward model, a direct-RLAIF judge, a Python
                function).
  3. reference  log pi_ref,T of the sampled tokens: one forward of the frozen reference model whose hidden
                states reach the vocabulary projection at response positions only.
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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from tqdm import tqdm

from prs_jax.config import check_ranges, import_object  # noqa: F401  (import_object lived here)
from prs_jax.errors import ConfigError, DataError, PrsJaxError
from prs_jax.models.tokenizer import encode_chat
from prs_jax.models.transformer import CausalLM, RewardModel
from prs_jax.models.window import check_fits, window_of
from prs_jax.train.a2c_model import A2CLoss, ActorCritic
from prs_jax.train.a2c_rewards import PairReward, Reward, RewardConfig, ScorerReward
from prs_jax.train.losses import KLMode, a2c_loss, returns_to_go, shaped_rewards
from prs_jax.train.logprobs import LogProbConfig
from prs_jax.train.rollout import TAIL_LOGPS, Rollout, RolloutConfig, sample_rollouts, tail_logps
from prs_jax.train.trainer import (
    OptimConfig,
    Trainer,
    TrainerConfig,
    TrainingError,
    data_order,
)
from prs_jax.tree.engine import bucket
from prs_jax.tree.sampling import SamplingParams

# the names this module held before the split (imported from here by users and tests)
__all__ = ["A2C", "A2CConfig", "A2CLoss", "A2CRunConfig", "ActorCritic", "KLMode", "PairReward", "PromptsConfig",
           "Reward", "RewardConfig", "Rollout", "RolloutConfig", "ScorerReward", "TAIL_LOGPS", "ValueConfig",
           "a2c_loss", "read_prompts", "returns_to_go", "run_a2c", "shaped_rewards"]


# ------------------------------------------------------------------------------------------------ configs
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

    def loss(self, temperature: float = 1.0) -> A2CLoss:
        """The trainer's loss object, scoring the policy at the rollout `temperature`."""
        return A2CLoss(self.beta, self.kl_mode, self.scale_reward, self.value_coef, self.normalize_advantages,
                       temperature)


# ------------------------------------------------------------------------------------------------ the loop
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
        self.trainer = Trainer(self.model, config.loss(rollout.temperature), trainer, optim, run_config=run_config)
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
        self._static = LogProbConfig(method=config.logprob_method, remat=config.remat)
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
        """Sample n responses per prompt from the current weights of `self.model.policy` on a fresh tree engine;
        `old_logp` is their log pi_T at the sampling temperature T."""
        rc = self.rollout_config
        return sample_rollouts(self.model.policy, self.tokenizer, [self._prompt_ids[i] for i in indices],
                               [self.prompts[i] for i in indices], seed=seed, n=rc.n if n is None else n,
                               sampling=sampling or rc.sampling(), prompt_len=self.prompt_len,
                               response_len=self.response_len, pad_id=self.pad_id, attention_impl=rc.attention_impl)

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

    def reference_logps(self, arrays: Mapping[str, np.ndarray], temperature: float | None = None) -> np.ndarray:
        """log pi_ref,T [B, R] of the response tokens at T (default: the rollout temperature); response positions
        only reach the unembedding."""
        t = self.rollout_config.temperature if temperature is None else temperature
        return tail_logps((self._ref_graphdef, self._ref_state), dict(arrays), self.response_len,
                          method=self.config.logprob_method, temperature=t)

    def evaluate(self, indices: Sequence[int] | None = None, *, n: int | None = None, seed: int = 0,
                 temperature: float = 1.0) -> dict[str, float]:
        """Mean reward, sequence KL(pi_T || ref_T) estimate and length of fresh samples from the current policy
        at `temperature` (1 by default); the policy's and the reference's log-probs are taken at the same
        temperature, so the KL estimate is unbiased at any temperature."""
        self.trainer.sync_model()
        indices = list(range(len(self.prompts))) if indices is None else list(indices)
        roll = self.rollout(indices, seed, n=n, sampling=dataclasses.replace(
            self.rollout_config.sampling(), temperature=temperature))
        rewards = self.score(roll)
        m = roll.arrays["loss_mask"]
        ref = self.reference_logps(roll.arrays, temperature)
        kl = np.sum(np.where(m, roll.arrays["old_logp"] - ref, 0.0), axis=-1)
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
