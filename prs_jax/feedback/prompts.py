"""Labeler prompts for AI feedback (RLAIF): preamble, optional few-shot exemplars, the sample, an ending.

Layout of a pairwise prompt (every text is our own wording and can be replaced inline or by `@path/to/file`):

    body  = preamble + [exemplar blocks] + sample (+ the chain-of-thought instruction)
    reply = ending (e.g. "Better summary=") -- or, for chain of thought, the rationale opener ("Rationale:")

With a chat template the body is one user turn and the reply opener starts the assistant's answer, so the
label token is the first token the assistant writes after the ending; in raw mode body and opener are joined
by a blank line. A direct-scoring (d-RLAIF) prompt has the same layout with one response and a 1-10 rating.

Exemplars come from a JSONL file: pairwise rows {"context", "response_1", "response_2", "preferred": 1|2,
"rationale"?}; direct rows {"context", "response", "score": 1..10, "rationale"?}.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prs_jax.errors import ConfigError, DataError
from prs_jax.models.tokenizer import has_chat_template, render_chat

Task = Literal["summarize", "helpful", "harmless"]
Variant = Literal["base", "detailed"]

# Names used inside the sample: (context name, candidate name).
NAMES: dict[str, tuple[str, str]] = {
    "summarize": ("Text", "Summary"),
    "helpful": ("Conversation", "Response"),
    "harmless": ("Conversation", "Response"),
}

PAIR_PREAMBLES: dict[tuple[str, str], str] = {
    ("summarize", "base"): (
        "Below are a text and two summaries of it. Decide which summary is better and answer with its number, "
        "1 or 2."),
    ("summarize", "detailed"): (
        "You are reviewing summaries. Below are a text and two candidate summaries of it, numbered 1 and 2. "
        "Compare them on the following points.\n"
        "- Coherence: the summary reads as one clear, well-ordered piece rather than a heap of loose facts.\n"
        "- Accuracy: everything it states is backed by the text; nothing is made up or twisted.\n"
        "- Coverage: it keeps what a reader most needs to know and drops minor details.\n"
        "- Overall quality: all things considered, it is the summary a careful reader would rather get.\n"
        "Weigh these points together and answer with the number of the better summary, 1 or 2."),
    ("helpful", "base"): (
        "Below are a conversation between a user and an AI assistant and two possible next replies of the "
        "assistant. Decide which reply is more helpful and answer with its number, 1 or 2."),
    ("helpful", "detailed"): (
        "You are reviewing replies of an AI assistant. Below are a conversation and two candidate next replies, "
        "numbered 1 and 2. Compare them on the following points.\n"
        "- Relevance: the reply deals with what the user actually asked for.\n"
        "- Correctness: its facts, steps and reasoning are right.\n"
        "- Completeness: it covers the request fully, without padding.\n"
        "- Clarity: it is easy to follow and well organised.\n"
        "- Overall helpfulness: all things considered, it is the reply the user would rather get.\n"
        "Weigh these points together and answer with the number of the more helpful reply, 1 or 2."),
    ("harmless", "base"): (
        "Below are a conversation between a user and an AI assistant and two possible next replies of the "
        "assistant. Decide which reply is less harmful and answer with its number, 1 or 2."),
    ("harmless", "detailed"): (
        "You are reviewing replies of an AI assistant for harm. Below are a conversation and two candidate next "
        "replies, numbered 1 and 2. Compare them on the following points.\n"
        "- Safety: the reply gives no help with dangerous, violent or illegal acts.\n"
        "- Respect: it contains no insults, slurs, stereotypes or demeaning remarks.\n"
        "- Honesty: it does not deceive or manipulate the user.\n"
        "- Care: it treats sensitive topics responsibly and, when it declines, does so politely and points to "
        "safer help.\n"
        "Weigh these points together and answer with the number of the less harmful reply, 1 or 2."),
}

DIRECT_PREAMBLES: dict[tuple[str, str], str] = {
    ("summarize", "base"): (
        "Below are a text and a summary of it. Rate the summary from 1 (very poor) to 10 (excellent) and answer "
        "with the number only."),
    ("summarize", "detailed"): (
        "You are reviewing a summary. Below are a text and a summary of it. Judge how coherent, accurate and "
        "complete the summary is and how good it is overall, then rate it from 1 (very poor) to 10 (excellent) "
        "and answer with the number only."),
    ("helpful", "base"): (
        "Below are a conversation between a user and an AI assistant and the assistant's next reply. Rate how "
        "helpful the reply is from 1 (not at all) to 10 (extremely) and answer with the number only."),
    ("helpful", "detailed"): (
        "You are reviewing a reply of an AI assistant. Below are a conversation and the assistant's next reply. "
        "Judge whether it addresses the request, is correct, complete and clear, then rate its helpfulness from "
        "1 (not at all) to 10 (extremely) and answer with the number only."),
    ("harmless", "base"): (
        "Below are a conversation between a user and an AI assistant and the assistant's next reply. Rate how "
        "harmless the reply is from 1 (very harmful) to 10 (completely harmless) and answer with the number only."),
    ("harmless", "detailed"): (
        "You are reviewing a reply of an AI assistant for harm. Below are a conversation and the assistant's next "
        "reply. Judge whether it avoids helping with dangerous or illegal acts, avoids insults and stereotypes, "
        "is honest, and handles sensitive topics with care, then rate how harmless it is from 1 (very harmful) "
        "to 10 (completely harmless) and answer with the number only."),
}

COT_INSTRUCTIONS: dict[str, str] = {
    "base": "Before you answer, explain which {candidate} is better and why.",
    "detailed": "Before you answer, go through the points above one by one for both {candidates}, then say which "
                "{candidate} is better overall and why.",
}

PAIR_SAMPLE = "{context_name}:\n{context}\n\n{candidate_name} 1:\n{first}\n\n{candidate_name} 2:\n{second}"
DIRECT_SAMPLE = "{context_name}:\n{context}\n\n{candidate_name}:\n{response}"
EXEMPLARS_HEADER = "Solved examples:"
TASK_HEADER = "Now the case to judge:"


def load_text(value: str) -> str:
    """A text given inline or as `@path/to/file` (read from the file)."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise ConfigError(f"{path}: text file not found (given as {value!r}); give the text inline or an "
                              "existing @path.")
        return path.read_text(encoding="utf-8")
    return value


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """What the labeler reads. Unset texts take the defaults of `task` and `variant`; any text may be `@file`."""

    task: Task = "helpful"
    variant: Variant = "base"
    preamble: str | None = None
    ending: str | None = None  # default "Better summary=" / "Better response=" (pairwise), "Rating=" (direct)
    exemplars: str | None = None  # JSONL file of solved examples (see the module docstring)
    exemplar_rationales: bool = False
    max_exemplars: int | None = None
    cot_instruction: str | None = None
    cot_start: str = "Rationale:"
    cot_separator: str = "\n"  # between the decoded rationale and the ending
    chat: bool | None = None  # None: the labeler's chat template when it has one, else raw text
    system: str | None = None
    context_name: str | None = None
    candidate_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """One solved example: a context, its response(s), the answer and an optional rationale."""

    context: str
    responses: tuple[str, ...]
    answer: str
    rationale: str | None = None


def _names(cfg: PromptConfig) -> tuple[str, str]:
    ctx, cand = NAMES[cfg.task]
    return cfg.context_name or ctx, cfg.candidate_name or cand


def _exemplars(cfg: PromptConfig, kind: Literal["pair", "direct"]) -> list[Exemplar]:
    if not cfg.exemplars:
        return []
    path = Path(cfg.exemplars.removeprefix("@"))
    if not path.is_file():
        raise ConfigError(f"prompt.exemplars: {path} not found; give a JSONL file of solved examples.")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}).") from None
        keys = ("context", "response_1", "response_2", "preferred") if kind == "pair" else (
            "context", "response", "score")
        missing = [k for k in keys if k not in row]
        if missing:
            raise DataError(f"{where}: exemplar misses {missing}; a {kind} exemplar needs {list(keys)} "
                            "(and optionally 'rationale').")
        answer = str(row[keys[-1]]).strip()
        valid = ("1", "2") if kind == "pair" else tuple(str(i) for i in range(1, 11))
        if answer not in valid:
            raise DataError(f"{where}: {keys[-1]!r} must be one of {list(valid)}, got {row[keys[-1]]!r}.")
        if cfg.exemplar_rationales and not row.get("rationale"):
            raise DataError(f"{where}: exemplar_rationales is on but this exemplar has no 'rationale'.")
        out.append(Exemplar(context=str(row["context"]), responses=tuple(str(row[k]) for k in keys[1:-1]),
                            answer=answer, rationale=row.get("rationale")))
    return out[:cfg.max_exemplars] if cfg.max_exemplars is not None else out


def context_text(prompt: Any) -> str:
    """A prompt as plain text: a string as is, a message list as "User: ..." / "Assistant: ..." turns."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in prompt)


def response_text(response: Any) -> str:
    """A response as plain text: a string as is, a message list as the contents of its messages."""
    if isinstance(response, str):
        return response
    return "\n\n".join(str(m["content"]) for m in response)


@dataclasses.dataclass(frozen=True)
class PromptBuilder:
    """Renders labeler prompts for one tokenizer (chat template or raw text) from a PromptConfig."""

    config: PromptConfig
    kind: Literal["pair", "direct"]
    tokenizer: Any = None
    preamble: str = ""
    ending: str = ""
    cot_instruction: str = ""
    exemplars: tuple[Exemplar, ...] = ()
    chat: bool = False

    @classmethod
    def build(cls, config: PromptConfig, kind: Literal["pair", "direct"], tokenizer: Any = None) -> PromptBuilder:
        """Resolve defaults and `@file` texts, load exemplars, and pick chat or raw rendering."""
        key = (config.task, config.variant)
        table = PAIR_PREAMBLES if kind == "pair" else DIRECT_PREAMBLES
        if key not in table:
            raise ConfigError(f"prompt: no default preamble for task={config.task!r}, variant={config.variant!r}; "
                              f"tasks {sorted(NAMES)}, variants ['base', 'detailed'] (or set prompt.preamble).")
        _, cand = _names(config)
        default_end = f"Better {cand.lower()}=" if kind == "pair" else "Rating="
        cot = config.cot_instruction if config.cot_instruction is not None else COT_INSTRUCTIONS[
            config.variant].format(candidate=cand.lower(), candidates=cand.lower() + "s")
        chat = config.chat if config.chat is not None else (tokenizer is not None and has_chat_template(tokenizer))
        if chat and (tokenizer is None or not has_chat_template(tokenizer)):
            raise ConfigError("prompt.chat is true but the labeler's tokenizer has no chat template; set "
                              "prompt.chat=false (raw text) or use a model with a chat template.")
        ending = load_text(config.ending) if config.ending is not None else default_end
        if not ending.strip():
            raise ConfigError("prompt.ending is empty; the label is read right after it, so it needs text "
                              "(e.g. 'Better response=').")
        return cls(config=config, kind=kind, tokenizer=tokenizer,
                   preamble=load_text(config.preamble) if config.preamble is not None else table[key],
                   ending=ending, cot_instruction=load_text(cot), exemplars=tuple(_exemplars(config, kind)),
                   chat=chat)

    def sample(self, context: str, responses: Sequence[str]) -> str:
        """The sample block: the context and the response(s) to judge."""
        ctx_name, cand = _names(self.config)
        if self.kind == "pair":
            return PAIR_SAMPLE.format(context_name=ctx_name, context=context, candidate_name=cand,
                                      first=responses[0], second=responses[1])
        return DIRECT_SAMPLE.format(context_name=ctx_name, context=context, candidate_name=cand,
                                    response=responses[0])

    def _exemplar_block(self, ex: Exemplar) -> str:
        parts = [self.sample(ex.context, ex.responses)]
        if self.config.exemplar_rationales and ex.rationale:
            parts.append(f"{self.config.cot_start} {ex.rationale.strip()}")
        parts.append(self.ending + ex.answer)
        return "\n\n".join(parts)

    def body(self, context: str, responses: Sequence[str], cot: bool = False) -> str:
        """Preamble, exemplars, sample (and the chain-of-thought instruction)."""
        parts = [self.preamble.strip()]
        if self.exemplars:
            parts.append(EXEMPLARS_HEADER)
            parts.extend(self._exemplar_block(ex) for ex in self.exemplars)
            parts.append(TASK_HEADER)
        parts.append(self.sample(context, responses))
        if cot:
            parts.append(self.cot_instruction.strip())
        return "\n\n".join(parts)

    def render(self, context: str, responses: Sequence[str], cot: bool = False) -> str:
        """The full prompt text, ending with the label ending (or the rationale opener when `cot`)."""
        opener = self.config.cot_start if cot else self.ending
        body = self.body(context, responses, cot)
        if not self.chat:
            return f"{body}\n\n{opener}"
        msgs = ([{"role": "system", "content": self.config.system}] if self.config.system else [])
        msgs.append({"role": "user", "content": body})
        return render_chat(self.tokenizer, msgs, add_generation_prompt=True) + opener

    def after_rationale(self, rest: str = "") -> str:
        """The text appended after a decoded rationale (`rest`: rationale text not covered by kept tokens)."""
        return rest + self.config.cot_separator + self.ending
