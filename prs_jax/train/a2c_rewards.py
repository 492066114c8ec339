"""Simple built-in rewards for A2C runs (`reward.callable: prs_jax.train.a2c_rewards:NAME`): deterministic text
properties, useful to check that RL moves a policy where a reward points. Each is a batch reward
(prompts, responses) -> list of floats in [0, 1]."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


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
