"""Rewards for A2C runs: the `Reward` interface, adapters (a prs_jax scorer or a per-pair function as a
`Reward`), the run config's `reward` section (`RewardConfig`: a Python object or a reward-model directory), and
simple built-in rewards (`reward.callable: prs_jax.train.a2c_rewards:NAME`): deterministic text properties,
useful to check that RL moves a policy where a reward points; each is a batch reward (prompts, responses) ->
list of floats in [0, 1]."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from prs_jax.config import import_object
from prs_jax.errors import ConfigError

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


# ------------------------------------------------------------------------------------------------ built-in
@dataclasses.dataclass(frozen=True)
class CharFraction:
    """Share of the response's characters that are in `chars` (0 for an empty response)."""

    chars: str = "aeiou"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        wanted = set(self.chars)
        return [sum(c in wanted for c in r) / len(r) if r else 0.0 for r in responses]


@dataclasses.dataclass(frozen=True)
class WordCount:
    """min(words in the response, target) / target: rewards longer answers, up to `target` words."""

    target: int = 32

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ValueError(f"WordCount.target must be >= 1, got {self.target}.")

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [min(len(r.split()), self.target) / self.target for r in responses]


vowel_reward = CharFraction("aeiou")
length_reward = WordCount(32)
