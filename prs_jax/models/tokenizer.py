"""Tokenizer loading (local directories only) and chat-template rendering."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from prs_jax.errors import TokenizerError

Message = dict[str, str]


def load_tokenizer(path: str | Path) -> Any:
    """An HF tokenizer from a local directory; never touches the network."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: tokenizer directory does not exist.")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise TokenizerError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json).")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many types; name the directory
        raise TokenizerError(f"{path}: cannot load tokenizer: {type(e).__name__}: {e}") from e


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise TokenizerError("render_chat: the message list is empty.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"render_chat: message {i} must be a dict with 'role' and 'content', got {m!r}.")


def render_chat(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` through the tokenizer's chat template."""
    _check_messages(messages)
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "this tokenizer")
        raise TokenizerError(
            f"{name}: no chat template (tokenizer_config.json has no 'chat_template' and there is no "
            "chat_template.jinja). Use a raw prompt template instead, or add a chat template to the tokenizer.")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer: Any, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat (special tokens come from the template, none are added twice)."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
