"""Prompt templates of the sampling strategies (our own wording; each can be replaced by text or `@file`),
and the helper that turns one more chat turn into fixed text appended on top of an existing tree node."""

from __future__ import annotations

import dataclasses
from typing import Any

from prs_jax.errors import TokenizerError
from prs_jax.models.tokenizer import has_chat_template, render_chat
from prs_jax.strategies.base import load_template

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


def next_turn_text(tokenizer: Any, user_text: str, previous_ended_with_eos: bool) -> str:
    """Text that continues a rendered conversation after an assistant answer with one more user turn and the
    generation prompt, so it can be appended to the answer's tree node (no re-encoding of what came before).

    With a chat template the text is the template's own rendering of the extra turn; without one, a plain
    "\\n\\nUser: ...\\n\\nAssistant: " layout is used."""
    if tokenizer is None or not has_chat_template(tokenizer):
        return f"\n\nUser: {user_text}\n\nAssistant: "
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    prev = render_chat(tokenizer, base, add_generation_prompt=False)
    full = render_chat(tokenizer, base + [{"role": "user", "content": user_text}], add_generation_prompt=True)
    if not full.startswith(prev) or _SENTINEL not in prev:
        raise TokenizerError("the chat template re-renders earlier turns when a turn is added, so a turn cannot be "
                             "appended to the tree; use PRS mode='template' for this model.")
    after_answer = prev[prev.index(_SENTINEL) + 1:]
    text = after_answer + full[len(prev):]
    eos = getattr(tokenizer, "eos_token", None)
    if previous_ended_with_eos and eos and text.startswith(eos):
        text = text[len(eos):]
    return text
