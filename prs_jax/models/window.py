"""Context-window checks made before any work, so an input that cannot fit fails at once, naming its id."""

from __future__ import annotations

from typing import Any

from prs_jax.errors import DataError
from prs_jax.models.tokenizer import encode_chat, has_chat_template

__all__ = ["ContextError", "window_of", "check_fits", "policy_prompt_ids"]


class ContextError(DataError):
    """An input does not fit a model's context window; `index` is its position in the batch when known."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def window_of(model: Any) -> int:
    """The context window (config.json max_position_embeddings) of a loaded model."""
    return int(model.config.max_position_embeddings)


def check_fits(n_tokens: int, window: int, *, what: str, model: str, fix: str, index: int | None = None) -> None:
    """Raise ContextError when `n_tokens` exceed `window`; `what` names the input, `model` the model's role."""
    if n_tokens > window:
        raise ContextError(f"{what}: needs {n_tokens} tokens but the {model}'s context window is {window} "
                           f"(config.json max_position_embeddings); {fix}", index)


def policy_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """The ids a policy sees for a prompt text: a user chat turn when the tokenizer has a chat template."""
    if has_chat_template(tokenizer):
        return encode_chat(tokenizer, [{"role": "user", "content": text}])
    return list(tokenizer(text)["input_ids"])
