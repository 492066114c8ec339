"""Direct RLAIF (d-RLAIF): the labeler rates one response from 1 to 10; the reward is the expected score
s = sum_i i * P(i) over the normalised probabilities of the score labels, mapped to [-1, 1] by (s - 5.5) / 4.5.

"10" is often two tokens ("1" + "0"): its log-prob is teacher-forced over both, and "1" then means "1 not
followed by 0" (see probs.py). Responses to the same context share the context's prompt prefix on the tree.
`DirectScorer` is a strategy `Scorer` and a plain reward callable: scorer(prompts, responses) -> rewards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from prs_jax.feedback.probs import expected_score, normalize, rescale_score
from prs_jax.feedback.prompts import (
    PromptBuilder,
    PromptConfig,
    context_text,
    response_text,
)
from prs_jax.feedback.reader import LabelReader, ReaderConfig, read_texts
from prs_jax.tree.engine import EngineConfig, TreeEngine

SCORES = tuple(str(i) for i in range(1, 11))


@dataclasses.dataclass(frozen=True)
class DirectConfig:
    """d-RLAIF settings: prompt, score labels (their numeric values), the rescaling range, batching."""

    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    labels: tuple[str, ...] = SCORES
    low: float = 1.0
    high: float = 10.0
    exclusive: bool = True
    max_rows: int = 128
    min_row_bucket: int = 16
    min_prefix_bucket: int = 64
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"

    def __post_init__(self) -> None:
        try:
            [float(x) for x in self.labels]
        except ValueError:
            raise ValueError(f"direct.labels must be numbers written as text (got {self.labels}).") from None
        if self.high <= self.low:
            raise ValueError(f"direct.high ({self.high}) must be above direct.low ({self.low}).")


@dataclasses.dataclass(frozen=True)
class DirectScore:
    """Distribution over the score labels, its expectation `score`, and `reward` = score rescaled to [-1, 1]."""

    dist: np.ndarray
    score: float
    reward: float


class DirectScorer:
    """Rates responses with a causal-LM labeler; callable as a reward function."""

    def __init__(self, model: Any, tokenizer: Any, config: DirectConfig = DirectConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prompts = PromptBuilder.build(config.prompt, "direct", tokenizer)
        self.values = np.asarray([float(x) for x in config.labels], np.float64)
        self.compilations = 0

    @classmethod
    def from_pretrained(cls, path: str, config: DirectConfig = DirectConfig(), dtype: str = "float32"
                        ) -> DirectScorer:
        """A direct scorer on a local HF causal-LM checkpoint."""
        from prs_jax.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path, dtype=dtype), load_tokenizer(path), config)

    def score(self, contexts: Sequence[Any], responses: Sequence[Any]) -> list[DirectScore]:
        """Score distribution, expected score and reward of each (context, response)."""
        if len(contexts) != len(responses):
            raise ValueError(f"DirectScorer: {len(contexts)} contexts but {len(responses)} responses.")
        c = self.config
        by_ctx: dict[str, list[int]] = {}
        ctx = [context_text(x) for x in contexts]
        for i, x in enumerate(ctx):
            by_ctx.setdefault(x, []).append(i)
        order = list(by_ctx.values())
        texts = [[self.prompts.render(ctx[i], [response_text(responses[i])]) for i in idx] for idx in order]
        engine = TreeEngine(self.model, self.tokenizer,
                            config=EngineConfig(attention_impl=c.attention_impl, min_prefix_bucket=c.min_prefix_bucket))
        reader = LabelReader(engine, ReaderConfig(max_rows=c.max_rows, min_row_bucket=c.min_row_bucket))
        lps = read_texts(reader, texts, c.labels, chat=self.prompts.chat, exclusive=c.exclusive)
        self.compilations += engine.compilations + reader.compilations
        out: list[DirectScore | None] = [None] * len(ctx)
        for idx, group in zip(order, lps):
            for i, lp in zip(idx, group):
                dist = normalize(lp)
                s = float(expected_score(dist, self.values))
                out[i] = DirectScore(dist=dist, score=s, reward=float(rescale_score(s, c.low, c.high)))
        return out  # type: ignore[return-value]

    def __call__(self, prompts: Sequence[Any], responses: Sequence[Any],
                 preferences: Sequence[str | None] | None = None) -> list[float]:
        """Rewards in [-1, 1] (the strategy Scorer protocol). A prompt's preference z, when given, is part of the
        context the labeler rates against (with_preference): PRS with a d-RLAIF scorer selects for z."""
        if preferences is not None:
            if len(preferences) != len(prompts):
                raise ValueError(f"DirectScorer: {len(prompts)} prompts but {len(preferences)} preferences.")
            prompts = [with_preference(x, z) for x, z in zip(prompts, preferences)]
        return [s.reward for s in self.score(prompts, responses)]


def with_preference(prompt: Any, preference: str | None) -> Any:
    """The context with preference z joined to the user's request the way the policy sees it (x, a blank line,
    z): a string prompt directly, a message list in its last user message; unchanged without a preference."""
    from prs_jax.strategies.base import join_preference

    if not preference:
        return prompt
    if isinstance(prompt, str):
        return join_preference(prompt, preference)
    msgs = [dict(m) for m in prompt]
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        raise ValueError("DirectScorer: a message-list prompt without a user message cannot carry the preference; "
                         "give the prompt as text or add the user turn.")
    msgs[last]["content"] = join_preference(str(msgs[last]["content"]), preference)
    return msgs
