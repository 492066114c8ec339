"""A2C rollouts: n samples per prompt on the tree engine (siblings share the prompt's KV), packed into the
fixed-shape training batch, with the policy's and the reference's log-probs of the sampled tokens.

Temperature. The rollout samples from pi_T = softmax(logits / T) (T = `RolloutConfig.temperature`, 0.9 by
default), so the policy being trained IS pi_T: `old_logp` is log pi_T of each sampled token, kept by the engine
as it samples (`SamplingParams.tempered_logprobs`; by default the engine keeps the raw T = 1 log-prob), and the
training step scores the same tokens at the same T (`A2CLoss.temperature`). The reference is scored at T too:
the KL term is KL(pi_T || ref_T). That is the choice of TRL's PPO/RLOO and verl (they divide the reference's
logits by the rollout temperature as well): at the start (policy = reference) the KL is 0, and the penalty
measures how far training moved the policy, not how far sampling at T is from sampling at 1 (a KL against
ref_1 would push the policy to undo the temperature). top_k / top_p / min_p truncate the sampling distribution
further; the log-probs ignore the truncation (keep the defaults 0 / 1 / 0 for an unbiased policy gradient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.errors import ConfigError
from prs_jax.models.transformer import CausalLM
from prs_jax.train.logprobs import LogProbConfig, logps_from_hidden, response_hidden, tail_token_batch
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of the rollouts: n samples per prompt (siblings share the prompt's KV), temperature 0.9 (the
    policy's log-probs and the reference's are taken at this temperature too)."""

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
        if not self.temperature > 0:
            raise ConfigError(f"rollout.temperature must be > 0, got {self.temperature}.")

    def sampling(self) -> SamplingParams:
        """The engine's sampling parameters."""
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p)


@dataclasses.dataclass
class Rollout:
    """One batch of rollouts: texts per sequence and the fixed-shape arrays of the training batch."""

    prompts: list[str]
    responses: list[str]
    arrays: dict[str, np.ndarray]  # input_ids, attention_mask [B, P + R]; loss_mask, old_logp [B, R]
    finish_reasons: list[str]


def _tail_logps_fn(state, ids, mask, *, graphdef, r, method, temperature):
    model = nnx.merge(graphdef, state)
    config = LogProbConfig(method=method)
    h, targets = response_hidden(model, tail_token_batch(ids, mask, r))
    return logps_from_hidden(model, h, targets, config, temperature)[:, 0]


# log softmax(logits / T) of the last r tokens (the responses), only their hidden states reach the unembedding;
# one program per (graph, shape, method, T): the reference's log-probs of the rollouts
TAIL_LOGPS = jax.jit(_tail_logps_fn, static_argnames=("graphdef", "r", "method", "temperature"))


def tail_logps(model: CausalLM | tuple[Any, Any], arrays: dict[str, np.ndarray], r: int, *, method: str,
               temperature: float) -> np.ndarray:
    """log pi_T [B, r] of the last r tokens of `arrays["input_ids"]` under `model` (a module or its nnx.split)."""
    graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
    return np.asarray(TAIL_LOGPS(state, jnp.asarray(arrays["input_ids"]), jnp.asarray(arrays["attention_mask"]),
                                 graphdef=graphdef, r=r, method=method, temperature=float(temperature)))


def sample_rollouts(policy: CausalLM, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                    prompt_texts: Sequence[str], *, seed: int, n: int, sampling: SamplingParams, prompt_len: int,
                    response_len: int, pad_id: int, attention_impl: str = "auto") -> Rollout:
    """n responses per prompt from the current weights of `policy` on a fresh tree engine, as a fixed-shape batch
    (prompt left-padded to `prompt_len`, response right-padded to `response_len`) whose `old_logp` is
    log softmax(logits / T) of the sampled tokens under `policy` (T = sampling.temperature; 1 when greedy),
    kept by the engine while sampling (no extra forward)."""
    engine = TreeEngine(policy, tokenizer, seed=seed, pad_id=pad_id, config=EngineConfig(
        attention_impl=attention_impl, min_prefix_bucket=prompt_len, min_extend_bucket=prompt_len))
    roots = engine.add_prompts([list(p) for p in prompt_ids])
    kids = engine.expand(roots, n, dataclasses.replace(sampling, tempered_logprobs=True),
                         max_new_tokens=response_len)
    b, p, r = len(prompt_ids) * n, prompt_len, response_len
    ids = np.full((b, p + r), pad_id, np.int32)
    mask = np.zeros((b, p + r), bool)
    loss_mask = np.zeros((b, r), bool)
    old_logp = np.zeros((b, r), np.float32)
    prompts, responses, reasons = [], [], []
    for j, (prompt, text, children) in enumerate(zip(prompt_ids, prompt_texts, kids)):
        for c, node in enumerate(children):
            row = j * n + c
            ids[row, p - len(prompt):p] = prompt  # left-padded prompt: response starts at column p
            mask[row, p - len(prompt):p] = True
            toks = node.tokens
            ids[row, p:p + len(toks)] = toks
            mask[row, p:p + len(toks)] = True
            loss_mask[row, :len(toks)] = True
            old_logp[row, :len(toks)] = node.logprobs
            prompts.append(text)
            responses.append(node.text)
            reasons.append(node.finish_reason or "")
    return Rollout(prompts, responses, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
                                        "old_logp": old_logp}, reasons)
