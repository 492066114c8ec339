"""What A2C optimises: the policy with its value function (`ActorCritic`), and the trainer's loss object
(`A2CLoss`: batch -> log-probs at the rollout temperature and values -> the pure `losses.a2c_loss`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from prs_jax.models.layers import Dense
from prs_jax.models.transformer import CausalLM, RewardModel
from prs_jax.train.logprobs import LogProbConfig, logps_from_hidden, response_hidden, tail_token_batch
from prs_jax.train.losses import KLMode, a2c_loss

Metrics = dict[str, jax.Array]


class ActorCritic(nnx.Module):
    """The policy and its value function (a head on the policy's backbone, or a separate critic = reward-model
    backbone + scalar head)."""

    def __init__(self, policy: CausalLM, critic: RewardModel | None = None, *, seed: int = 0):
        self.policy = policy
        self.critic = critic
        head = None
        if critic is None:
            dtype = policy.model.embed_tokens.embedding[...].dtype
            head = Dense(policy.config.hidden_size, 1, ("embed", None), bias=True, dtype=dtype, rngs=nnx.Rngs(seed))
            head.kernel.set_value(jnp.zeros_like(head.kernel.get_value()))
        self.value_head = head

    def logps_and_values(self, ids: jax.Array, mask: jax.Array, r: int, config: LogProbConfig,
                         temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
        """Log-probs [B, r] of the last r tokens under softmax(logits / temperature) and the values [B, r] of the
        states before them, through the trainer's log-prob API (`tail_token_batch`, `response_hidden`,
        `logps_from_hidden`: only those r hidden states reach the vocabulary projection)."""
        batch = tail_token_batch(ids, mask, r)
        h, targets = response_hidden(self.policy, batch, config.remat)  # [B, 1, r, D], [B, 1, r]
        logp = logps_from_hidden(self.policy, h, targets, config, temperature)[:, 0]
        if self.critic is None:
            values = self.value_head(h[:, 0])[..., 0]
        else:
            hc, _ = response_hidden(self.critic, batch, config.remat)
            values = self.critic.head(hc[:, 0])[..., 0]
        return logp, values.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class A2CLoss:
    """The trainer's loss object: batch (input_ids, attention_mask, loss_mask, old_logp, ref_logp, reward) ->
    `losses.a2c_loss`, the policy's log-probs taken at the rollout temperature (see prs_jax.train.rollout)."""

    beta: float = 0.05
    kl_mode: KLMode = "reward"
    scale_reward: bool = True
    value_coef: float = 0.5
    normalize_advantages: bool = False
    temperature: float = 1.0

    def __call__(self, model: ActorCritic, batch: dict[str, jax.Array], static: LogProbConfig
                 ) -> tuple[jax.Array, Metrics]:
        r = batch["loss_mask"].shape[1]
        logp, values = model.logps_and_values(batch["input_ids"], batch["attention_mask"], r, static,
                                              temperature=self.temperature)
        return a2c_loss(logp, values, batch["old_logp"], batch["ref_logp"], batch["reward"], batch["loss_mask"],
                        beta=self.beta, kl_mode=self.kl_mode, scale_reward=self.scale_reward,
                        value_coef=self.value_coef, normalize_advantages=self.normalize_advantages)
