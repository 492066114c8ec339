"""Prompt templates of the sampling strategies (our own wording; each can be replaced by text or `@file`),
and the helper that turns one more chat turn into fixed text appended on top of an existing tree node."""

from __future__ import annotations

import dataclasses
from typing import Any

from prs_jax.errors import TokenizerError
from prs_jax.models.tokenizer import has_chat_template, render_chat
from prs_jax.strategies.base import load_template
from prs_jax.tree.tree import Node

DEFAULT_PREFERENCE = ("I would like an answer that is informative, precise and relevant, goes into useful depth "
                      "and detail, and is creative where that helps.")

# Conversation mode: turns added after the policy's own answer (the tree keeps the KV of everything before).
FEEDBACK_TURN = ("Look back at your answer as a strict, fair reviewer. My preference is: {preference}\n"
                 "List short bullet points, each naming a part of your answer and how to change it so that the "
                 "answer fits my preference better. Do not rewrite the answer yet.")
REFINE_TURN = "Now write an improved answer that applies this feedback. Reply with the improved answer only."
REFINE_TURN_NO_FEEDBACK = ("Write an improved answer that fits my preference better: {preference}\n"
                           "Reply with the improved answer only.")

# Template mode: fresh prompts that quote the question and the answer (the layout the PRS paper describes).
FEEDBACK_TEMPLATE = ("You review answers fairly and carefully.\n\nQuestion:\n{question}\n\nAnswer to review:\n"
                     "{answer}\n\nThe user's preference:\n{preference}\n\nGive short bullet points, each pointing "
                     "at a part of the answer and saying how to change it to fit the preference better. Do not "
                     "rewrite the answer.")
REFINE_TEMPLATE = ("Improve the reference answer so that it fits the user's preference better, using the "
                   "feedback.\n\nQuestion:\n{question}\n\nReference answer:\n{answer}\n\nThe user's preference:\n"
                   "{preference}\n\nFeedback:\n{feedback}\n\nWrite only the improved answer.")
REFINE_TEMPLATE_NO_FEEDBACK = ("Improve the reference answer so that it fits the user's preference better.\n\n"
                               "Question:\n{question}\n\nReference answer:\n{answer}\n\nThe user's preference:\n"
                               "{preference}\n\nWrite only the improved answer.")


@dataclasses.dataclass(frozen=True)
class PRSTemplates:
    """All PRS texts; any field may be given inline or as `@path` to a file."""

    default_preference: str = DEFAULT_PREFERENCE
    feedback_turn: str = FEEDBACK_TURN
    refine_turn: str = REFINE_TURN
    refine_turn_no_feedback: str = REFINE_TURN_NO_FEEDBACK
    feedback_template: str = FEEDBACK_TEMPLATE
    refine_template: str = REFINE_TEMPLATE
    refine_template_no_feedback: str = REFINE_TEMPLATE_NO_FEEDBACK

    def resolved(self) -> "PRSTemplates":
        """A copy with every `@file` reference replaced by the file's text."""
        return PRSTemplates(**{f.name: load_template(getattr(self, f.name)) for f in dataclasses.fields(self)})


_SENTINEL = "\ue000"


def next_turn_text(tokenizer: Any, user_text: str, previous: Node | None = None) -> str | None:
    """Text that closes an assistant answer and opens one more user turn plus the generation prompt, as the
    tokenizer's chat template renders it, to append on top of the answer's tree node (nothing before it is
    re-encoded). The end-of-turn token the model generated itself (finish_reason "eos") is not repeated.
    None when the template re-renders earlier turns (the conversation must then be rendered afresh). Without a
    chat template: a plain "User:/Assistant:" layout."""
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"\n\nUser: {user_text}\n\nAssistant: "
    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    before = render_chat(tokenizer, convo, add_generation_prompt=False)
    after = render_chat(tokenizer, convo + [{"role": "user", "content": user_text}], add_generation_prompt=True)
    if _SENTINEL not in before or not after.startswith(before):
        return None
    text = before[before.index(_SENTINEL) + len(_SENTINEL):] + after[len(before):]
    if previous is not None and previous.finish_reason == "eos" and previous.tokens:
        end = tokenizer.decode([previous.tokens[-1]], skip_special_tokens=False)
        if end and text.startswith(end):
            text = text[len(end):]
    return text


def require_turn_text(tokenizer: Any, user_text: str, previous: Node | None = None) -> str:
    """`next_turn_text`, or a clear error when the chat template cannot be continued turn by turn."""
    text = next_turn_text(tokenizer, user_text, previous)
    if text is None:
        raise TokenizerError("the chat template re-renders earlier turns when a turn is added, so a turn cannot be "
                             "appended to the tree; use PRS mode='template' for this model.")
    return text
