"""Preference pairs in TRL's column conventions: read, validate, tokenise with prompt masking, truncate, collate.

Rows have `prompt`, `chosen`, `rejected`, each either
  - a string (standard format: prompt text, response texts), tokenised as raw text: prompt, then the response
    with EOS appended; or
  - a list of messages {"role", "content"} (conversational format: the prompt's messages, and the assistant
    message(s) of each response), tokenised through the tokenizer's chat template.
A conversational row may leave out `prompt` when `chosen` and `rejected` are whole conversations that share
their leading messages (TRL's implicit prompt); a prompt given as messages with string responses wraps each
response as one assistant message. Optional columns: `margin` (float, e.g. a reward-model margin) and a soft
label `p_chosen` (float in [0, 1]: the probability that `chosen` is preferred; pick another column name with
`soft_label_column`).

Prompt masking. For each response the prompt is rendered with add_generation_prompt=True and the whole
conversation without it; if the conversation's ids start with the prompt's ids the response is the rest, so
prompt + response is exactly the tokenisation of the conversation. Otherwise (a merge across the boundary, or
a template whose generation prompt is not a prefix of the rendered conversation) the response is the text after
the prompt tokenised on its own, and the row is counted in the report.

Sr-DPO / Sr-IPO: `prompt_prefix` p and `placement` give the prompt-augmented view p (+) x of every row:
  "user_turn_start"  p, a blank line (`separator`), then the content of the LAST user message (the query x);
  "system"           p in the system prompt: before an existing system message's content, else a new one;
  "raw_prefix"       p and the separator before the rendered prompt text (after a leading BOS string).
In raw-text mode every placement is a plain text prefix. Both views keep exactly the same response tokens.

Truncation: the prompt is cut to `max_prompt_length` (keep_end keeps its last tokens, keep_start its first),
then responses are cut at their end so that prompt + response fits `max_length`. A prompt that leaves no room
for a single response token is an error, or the row is dropped (`on_too_long`). The DataReport counts all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from prs_jax.data.batches import Layout, PairBatch, RowSpec, pack_rows, pack_shared_prompt
from prs_jax.data.batching import PadTo
from prs_jax.data.io import Row, iter_rows
from prs_jax.errors import DataError, TokenizerError
from prs_jax.models.tokenizer import has_chat_template, render_chat

__all__ = [
    "Message", "Placement", "TruncationMode", "OnTooLong", "PreferencePair", "TokenizedPair", "DataReport",
    "Limits", "parse_pair", "load_pairs", "augment_prompt", "tokenize_pair", "tokenize_pair_views",
    "tokenize_pairs", "collate_pairs",
]

Message = dict[str, Any]
Content = str | list[Message]
Placement = Literal["user_turn_start", "system", "raw_prefix"]
TruncationMode = Literal["keep_start", "keep_end"]
OnTooLong = Literal["error", "drop"]
PLACEMENTS = ("user_turn_start", "system", "raw_prefix")


# ----------------------------------------------------------------------------------------------- validation

def check_messages(value: Any, column: str, where: str) -> list[Message]:
    """A list of {"role": str, "content": str} dicts (null-valued extra keys dropped), or a DataError."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: column {column!r} must be a list of messages, got {type(value).__name__}.")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: column {column!r}, message {j}: each message needs a string 'role' and a "
                            f"string 'content', got {str(m)[:120]}.")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def check_content(value: Any, column: str, where: str) -> Content:
    """A non-blank string or a non-empty message list, or a DataError naming the column."""
    if value is None:
        raise DataError(f"{where}: column {column!r} is null.")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: column {column!r} is empty.")
        return value
    if isinstance(value, (list, tuple)):
        msgs = check_messages(value, column, where)
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise DataError(f"{where}: column {column!r} is empty (no message with content).")
        return msgs
    raise DataError(f"{where}: column {column!r} must be a string or a list of messages "
                    f"({{'role', 'content'}}), got {type(value).__name__}.")


def check_response_messages(msgs: list[Message], column: str, where: str) -> None:
    """A response given as messages must end with an assistant message."""
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: column {column!r} must end with an assistant message, got role "
                        f"{msgs[-1]['role']!r}.")


def check_float(value: Any, column: str, where: str, lo: float | None = None, hi: float | None = None
                ) -> float | None:
    """None, or a finite number within [lo, hi]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{where}: column {column!r} must be a number, got {type(value).__name__} {value!r}.")
    x = float(value)
    if not np.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None else ""
        raise DataError(f"{where}: column {column!r} must be a finite number{rng}, got {value!r}.")
    return x


def missing_columns(row: Mapping[str, Any], where: str, missing: Sequence[str], expected: str) -> DataError:
    """The error for a row without required columns (names the columns the row does have)."""
    return DataError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)}; the row has "
                     f"{sorted(row)}. {expected}")


def _common_message_prefix(a: list[Message], b: list[Message]) -> int:
    k = 0
    while k < min(len(a), len(b)) and (a[k]["role"], a[k]["content"]) == (b[k]["role"], b[k]["content"]):
        k += 1
    return k


def prompt_and_responses(row: Mapping[str, Any], where: str, response_columns: Sequence[str]
                         ) -> tuple[Content, list[Content]]:
    """Validated prompt and responses of a row in TRL's conventions (shared by pairs and SFT)."""
    expected = (f"Rows need {', '.join(repr(c) for c in ('prompt', *response_columns))} (strings, or lists of "
                "messages), TRL's convention.")
    missing = [c for c in response_columns if row.get(c) is None]
    if missing:
        raise missing_columns(row, where, missing, expected)
    responses = [check_content(row[c], c, where) for c in response_columns]
    if row.get("prompt") is None:
        if not all(isinstance(r, list) for r in responses):
            raise missing_columns(row, where, ["prompt"], expected)
        # implicit prompt: the leading messages every response shares
        k = min(_common_message_prefix(responses[0], r) for r in responses[1:]) if len(responses) > 1 else 0
        if k == 0 or any(k >= len(r) for r in responses):
            raise DataError(f"{where}: no 'prompt' column and the conversations in "
                            f"{', '.join(repr(c) for c in response_columns)} do not share leading messages with "
                            "a distinct reply after them; add a 'prompt' column.")
        prompt: Content = responses[0][:k]
        responses = [r[k:] for r in responses]  # type: ignore[index]
    else:
        prompt = check_content(row["prompt"], "prompt", where)
    if isinstance(prompt, list):
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    elif any(isinstance(r, list) for r in responses):
        raise DataError(f"{where}: 'prompt' is a string but a response is a list of messages; give the prompt as "
                        "messages too (conversational format) or every column as text (standard format).")
    for c, r in zip(response_columns, responses):
        if isinstance(r, list):
            check_response_messages(r, c, where)
    return prompt, responses


# ---------------------------------------------------------------------------------------------- data types

@dataclass(frozen=True)
class PreferencePair:
    """One validated preference pair (prompt, chosen, rejected as text or messages) and where it came from."""

    prompt: Content
    chosen: Content
    rejected: Content
    margin: float | None = None
    p_chosen: float | None = None  # soft label: probability that `chosen` is the preferred response
    where: str = "<memory>"

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True, eq=False)
class TokenizedPair:
    """Token ids (int32) of a pair: the shared prompt and each response (response tokens only).

    `augmented` holds the p (+) x view (Sr-DPO/Sr-IPO) with the same responses, when a prompt prefix was given.
    """

    prompt_ids: np.ndarray
    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    margin: float | None = None
    p_chosen: float | None = None
    where: str = ""
    augmented: TokenizedPair | None = None

    @property
    def chosen_input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.chosen_ids])

    @property
    def rejected_input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.rejected_ids])


@dataclass
class DataReport:
    """What tokenisation did to a data set; `summary()` is one line for the trainer's log (counts are rows)."""

    rows: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    boundary_fallbacks: int = 0   # full ids did not start with the prompt ids: response tokenised on its own
    template_mismatches: int = 0  # of those, the rendered prompt was not even a text prefix of the conversation
    prefix_truncated: int = 0     # Sr-*: prompt truncation reached into the prompt prefix p
    single_turn_fallbacks: int = 0  # SFT messages: assistant spans not found, loss on the final turn only
    longest_prompt: int = 0       # after truncation
    longest_sequence: int = 0     # after truncation (prompt + longest response, either view)
    dropped_where: list[str] = field(default_factory=list)  # the first few dropped rows

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} rows kept"]
        for name in ("dropped_too_long", "prompt_truncated", "response_truncated", "boundary_fallbacks",
                     "template_mismatches", "prefix_truncated", "single_turn_fallbacks"):
            if getattr(self, name):
                parts.append(f"{name.replace('_', ' ')}: {getattr(self, name)}")
        parts.append(f"longest prompt {self.longest_prompt}, longest sequence {self.longest_sequence} tokens")
        if self.dropped_where:
            parts.append(f"dropped e.g. {', '.join(self.dropped_where)}")
        return "; ".join(parts)

    def _drop(self, where: str) -> None:
        self.dropped_too_long += 1
        if len(self.dropped_where) < 5:
            self.dropped_where.append(where)


@dataclass(frozen=True)
class Limits:
    """Truncation policy shared by pairs and SFT."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: TruncationMode = "keep_end"
    on_too_long: OnTooLong = "error"

    def __post_init__(self) -> None:
        if self.truncation not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation must be 'keep_start' or 'keep_end', got {self.truncation!r}.")
        if self.on_too_long not in ("error", "drop"):
            raise ValueError(f"on_too_long must be 'error' or 'drop', got {self.on_too_long!r}.")
        for name in ("max_length", "max_prompt_length"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}.")
        if self.max_length is not None and self.max_prompt_length is not None and \
                self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be below max_length "
                             f"({self.max_length}) to leave room for the response.")


# ------------------------------------------------------------------------------------------------- parsing

def parse_pair(row: Mapping[str, Any], where: str = "row", *, soft_label_column: str = "p_chosen"
               ) -> PreferencePair:
    """Validate one row (TRL pair conventions) into a PreferencePair; errors name `where` and the column."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be a mapping of column names to values, got {type(row).__name__}.")
    prompt, (chosen, rejected) = prompt_and_responses(row, where, ("chosen", "rejected"))
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected,
                          margin=check_float(row.get("margin"), "margin", where),
                          p_chosen=check_float(row.get(soft_label_column), soft_label_column, where, 0.0, 1.0),
                          where=where)


def load_pairs(source: str | Any, split: str | None = None, *, soft_label_column: str = "p_chosen"
               ) -> list[PreferencePair]:
    """Read and validate every pair of a JSONL/JSON/Parquet file or `datasets` source (see io.iter_rows)."""
    return [parse_pair(r.data, r.where, soft_label_column=soft_label_column) for r in iter_rows(source, split)]


def _as_pairs(rows: Iterable[PreferencePair | Row | Mapping[str, Any]], soft_label_column: str
              ) -> Iterable[PreferencePair]:
    for i, r in enumerate(rows):
        if isinstance(r, PreferencePair):
            yield r
        elif isinstance(r, Row):
            yield parse_pair(r.data, r.where, soft_label_column=soft_label_column)
        else:
            yield parse_pair(r, f"row {i}", soft_label_column=soft_label_column)


# -------------------------------------------------------------------------------------- prompt augmentation

def _augment_messages(messages: list[Message], prefix: str, placement: Placement, separator: str,
                      where: str) -> list[Message]:
    msgs = [dict(m) for m in messages]
    if placement == "user_turn_start":
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: placement 'user_turn_start' needs a user message in the prompt; use "
                            "placement 'system' or 'raw_prefix'.")
        msgs[users[-1]]["content"] = prefix + separator + msgs[users[-1]]["content"]
    elif placement == "system":
        if msgs and msgs[0]["role"] == "system":
            msgs[0]["content"] = prefix + separator + msgs[0]["content"]
        else:
            msgs.insert(0, {"role": "system", "content": prefix})
    else:
        raise ValueError(f"_augment_messages: placement {placement!r} does not edit messages.")
    return msgs


def augment_prompt(prompt: Content, prefix: str, placement: Placement = "user_turn_start",
                   separator: str = "\n\n") -> Content:
    """p (+) x for a text prompt (always a text prefix) or a message prompt ('user_turn_start' or 'system';
    'raw_prefix' acts on the rendered text, so use tokenize_pair_views for it)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}.")
    if isinstance(prompt, str):
        return prefix + separator + prompt
    if placement == "raw_prefix":
        raise ValueError("augment_prompt: placement 'raw_prefix' applies to the rendered prompt text; use "
                         "tokenize_pair_views / tokenize_pairs(prompt_prefix=...).")
    return _augment_messages(list(prompt), prefix, placement, separator, "augment_prompt")


@dataclass(frozen=True)
class Augment:
    """The Sr-DPO prompt prefix p, where it goes, and the separator between p and what follows."""

    prefix: str
    placement: Placement = "user_turn_start"
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}.")
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise ValueError("prompt_prefix must be a non-empty string.")


# ------------------------------------------------------------------------------------------- tokenisation

class Boundary(IntEnum):
    """How the prompt/response split of one row was found (worse is larger)."""

    EXACT = 0        # prompt ids + response ids == ids of the whole conversation
    RETOKENIZED = 1  # prompt text is a prefix of the conversation text; the rest tokenised on its own
    MISMATCH = 2     # the template renders the prompt differently inside the conversation


def _common_text_prefix(a: str, b: str) -> int:
    k, n = 0, min(len(a), len(b))
    while k < n and a[k] == b[k]:
        k += 1
    return k


class Encoder:
    """Renders prompts and conversations (chat template or raw text) and splits ids at the prompt boundary."""

    def __init__(self, tokenizer: Any, use_chat_template: bool | None = None, augment: Augment | None = None):
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        self.augment = augment
        self.has_template = has_chat_template(tokenizer)
        self.bos_id = getattr(tokenizer, "bos_token_id", None)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.bos_text = getattr(tokenizer, "bos_token", None)
        # raw text gets the BOS the tokenizer adds by default (Llama yes, GPT-NeoX/Qwen no)
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        self.raw_lead: list[int] = ([self.bos_id] if self.bos_id is not None and len(with_special) > len(plain)
                                    and with_special[0] == self.bos_id else [])

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_mode(self, prompt: Content, where: str) -> bool:
        chat = isinstance(prompt, list) if self.use_chat_template is None else self.use_chat_template
        if chat and not self.has_template:
            raise TokenizerError(f"{where}: this row needs a chat template (conversational data, or "
                                 "use_chat_template=True) but the tokenizer has none; add one or give text rows.")
        if not chat and isinstance(prompt, list):
            raise DataError(f"{where}: conversational row (message lists) with use_chat_template=False; raw-text "
                            "mode needs string columns.")
        return chat

    def render(self, messages: list[Message], gen: bool, where: str) -> str:
        try:
            return render_chat(self.tokenizer, messages, add_generation_prompt=gen)
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from e
        except Exception as e:  # jinja raises TemplateError (e.g. roles a template refuses)
            raise DataError(f"{where}: the chat template failed on this row: {type(e).__name__}: {e}") from e

    def _raw_prefix(self, text: str) -> str:
        assert self.augment is not None
        p = self.augment.prefix + self.augment.separator
        if self.bos_text and text.startswith(self.bos_text):
            return self.bos_text + p + text[len(self.bos_text):]
        return p + text

    def texts(self, prompt: Content, responses: Sequence[Content], where: str, augmented: bool
              ) -> tuple[bool, str, list[str]]:
        """(chat mode, prompt text, full texts) for one prompt and its responses, in the x or p (+) x view."""
        aug = self.augment if augmented else None
        chat = self.chat_mode(prompt, where)
        if not chat:
            assert isinstance(prompt, str)
            text = aug.prefix + aug.separator + prompt if aug else prompt
            return False, text, [text + str(r) for r in responses]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if aug and aug.placement != "raw_prefix":
            msgs = _augment_messages(msgs, aug.prefix, aug.placement, aug.separator, where)
        prompt_text = self.render(msgs, True, where)
        fulls = []
        for r in responses:
            rmsgs = [{"role": "assistant", "content": r}] if isinstance(r, str) else list(r)
            fulls.append(self.render(msgs + rmsgs, False, where))
        if aug and aug.placement == "raw_prefix":
            prompt_text, fulls = self._raw_prefix(prompt_text), [self._raw_prefix(f) for f in fulls]
        return True, prompt_text, fulls

    def split(self, chat: bool, prompt_text: str, prompt_ids: list[int], full_text: str, where: str
              ) -> tuple[list[int], Boundary]:
        """Response ids after `prompt_ids` in the tokenisation of `full_text`, and how the boundary went."""
        lead = [] if chat else self.raw_lead
        full_ids = lead + self.encode(full_text)
        n = len(prompt_ids)
        if len(full_ids) > n and full_ids[:n] == prompt_ids:
            resp, status = full_ids[n:], Boundary.EXACT
        else:
            prefix = full_text.startswith(prompt_text)
            k = len(prompt_text) if prefix else _common_text_prefix(prompt_text, full_text)
            status = Boundary.RETOKENIZED if k == len(prompt_text) else Boundary.MISMATCH
            resp = self.encode(full_text[k:])
        if not chat and self.eos_id is not None and (not resp or resp[-1] != self.eos_id):
            resp = resp + [self.eos_id]
        if not resp:
            raise DataError(f"{where}: a response tokenises to no tokens.")
        return resp, status

    def prompt_responses(self, prompt: Content, responses: Sequence[Content], where: str, augmented: bool
                         ) -> tuple[np.ndarray, list[np.ndarray], Boundary]:
        """Prompt ids, response ids and the worst boundary status for one view of a row."""
        chat, prompt_text, fulls = self.texts(prompt, responses, where, augmented)
        prompt_ids = ([] if chat else self.raw_lead) + self.encode(prompt_text)
        out, worst = [], Boundary.EXACT
        for full in fulls:
            resp, status = self.split(chat, prompt_text, prompt_ids, full, where)
            out.append(np.asarray(resp, np.int32))
            worst = max(worst, status)
        return np.asarray(prompt_ids, np.int32), out, worst


def count_boundary(report: DataReport, status: Boundary) -> None:
    """Add one row's boundary status to the report."""
    if status >= Boundary.RETOKENIZED:
        report.boundary_fallbacks += 1
    if status == Boundary.MISMATCH:
        report.template_mismatches += 1


def _cut_prompt(ids: np.ndarray, k: int, mode: TruncationMode) -> np.ndarray:
    if k <= 0:
        return ids
    return ids[k:] if mode == "keep_end" else ids[:len(ids) - k]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def truncate(prompts: list[np.ndarray], responses: list[np.ndarray], limits: Limits, where: str,
             report: DataReport) -> tuple[list[np.ndarray], int] | None:
    """Cut every view's prompt by the same number of tokens (so max_prompt_length holds for the first view),
    then find the response length that fits max_length in every view. Returns (prompts, response length)
    or None when the row is dropped; raises when too long and on_too_long='error'."""
    k = max(0, len(prompts[0]) - limits.max_prompt_length) if limits.max_prompt_length is not None else 0
    cut = [_cut_prompt(p, k, limits.truncation) for p in prompts]
    longest_response = max(len(r) for r in responses)
    room = longest_response
    if limits.max_length is not None:
        room = min(room, limits.max_length - max(len(p) for p in cut))
        if room < 1:
            if limits.on_too_long == "drop":
                report._drop(where)
                return None
            raise DataError(f"{where}: the prompt has {max(len(p) for p in cut)} tokens"
                            f"{' after max_prompt_length truncation' if k else ''}, leaving no room for a response "
                            f"within max_length={limits.max_length}. Set max_prompt_length below max_length, raise "
                            "max_length, or pass on_too_long='drop'.")
    if k:
        report.prompt_truncated += 1
    if room < longest_response:
        report.response_truncated += 1
    report.longest_prompt = max(report.longest_prompt, len(cut[0]))
    report.longest_sequence = max(report.longest_sequence, max(len(p) for p in cut) + room)
    return cut, room


def tokenize_pair_views(pair: PreferencePair, tokenizer: Any, prompt_prefix: str | None = None, *,
                        placement: Placement = "user_turn_start", separator: str = "\n\n",
                        use_chat_template: bool | None = None) -> tuple[TokenizedPair, TokenizedPair | None]:
    """The pair tokenised as x and as p (+) x (None without a prefix), untruncated; both views share the
    x view's response ids, so y+ and y- are the same tokens in both."""
    enc = Encoder(tokenizer, use_chat_template, Augment(prompt_prefix, placement, separator)
                  if prompt_prefix is not None else None)
    plain, aug, _ = _views(enc, pair)
    return plain, aug


def tokenize_pair(pair: PreferencePair, tokenizer: Any, *, use_chat_template: bool | None = None) -> TokenizedPair:
    """The pair tokenised with prompt masking, untruncated (see tokenize_pairs for the policy options)."""
    return tokenize_pair_views(pair, tokenizer, use_chat_template=use_chat_template)[0]


def _views(enc: Encoder, pair: PreferencePair) -> tuple[TokenizedPair, TokenizedPair | None, Boundary]:
    prompt_ids, (c, r), status = enc.prompt_responses(pair.prompt, [pair.chosen, pair.rejected], pair.where, False)
    plain = TokenizedPair(prompt_ids, c, r, pair.margin, pair.p_chosen, pair.where)
    if enc.augment is None:
        return plain, None, status
    aug_prompt, _, aug_status = enc.prompt_responses(pair.prompt, [pair.chosen, pair.rejected], pair.where, True)
    # the augmented view scores the x view's response tokens, whatever its own boundary gave
    aug = replace(plain, prompt_ids=aug_prompt)
    return plain, aug, max(status, aug_status)


def tokenize_pairs(rows: Iterable[PreferencePair | Row | Mapping[str, Any]], tokenizer: Any, *,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation: TruncationMode = "keep_end", on_too_long: OnTooLong = "error",
                   use_chat_template: bool | None = None, prompt_prefix: str | None = None,
                   placement: Placement = "user_turn_start", separator: str = "\n\n",
                   soft_label_column: str = "p_chosen") -> tuple[list[TokenizedPair], DataReport]:
    """Validate, tokenise (prompt-masked) and truncate pairs; with `prompt_prefix` each result carries its
    p (+) x view in `.augmented`. use_chat_template None: chat template for message rows, raw text for
    string rows; True wraps string rows as one user and one assistant turn."""
    limits = Limits(max_length, max_prompt_length, truncation, on_too_long)
    enc = Encoder(tokenizer, use_chat_template,
                  Augment(prompt_prefix, placement, separator) if prompt_prefix is not None else None)
    report = DataReport()
    out: list[TokenizedPair] = []
    for pair in _as_pairs(rows, soft_label_column):
        report.rows += 1
        plain, aug, status = _views(enc, pair)
        count_boundary(report, status)
        prompts = [plain.prompt_ids] + ([aug.prompt_ids] if aug is not None else [])
        res = truncate(prompts, [plain.chosen_ids, plain.rejected_ids], limits, pair.where, report)
        if res is None:
            continue
        (p, *pa), room = res
        if aug is not None and len(prompts[0]) > len(p):
            k = len(prompts[0]) - len(p)
            if truncation == "keep_end":
                hit = k > _common_prefix(prompts[0], prompts[1])
            else:
                hit = k > _common_prefix(prompts[0][::-1], prompts[1][::-1])
            report.prefix_truncated += int(hit)
        c, r = plain.chosen_ids[:room], plain.rejected_ids[:room]
        kept = replace(plain, prompt_ids=p, chosen_ids=c, rejected_ids=r)
        if aug is not None:
            kept = replace(kept, augmented=replace(kept, prompt_ids=pa[0]))
        out.append(kept)
        report.kept += 1
    return out, report


# ---------------------------------------------------------------------------------------------- collation

def _float_column(examples: Sequence[TokenizedPair], name: str) -> np.ndarray | None:
    values = [getattr(e, name) for e in examples]
    if all(v is None for v in values):
        return None
    missing = [e.where for e, v in zip(examples, values) if v is None]
    if missing:
        raise DataError(f"collate_pairs: some rows have {name!r} and some do not (e.g. {missing[0]}); give it for "
                        "every row or for none.")
    return np.asarray(values, np.float32)


def pair_rows(ex: TokenizedPair, layout: Layout) -> list[RowSpec]:
    """The rows of one pair: [prompt | chosen | rejected] (packed) or [prompt | chosen], [prompt | rejected]."""
    c = (ex.chosen_ids, np.ones(len(ex.chosen_ids), np.int32))
    r = (ex.rejected_ids, np.ones(len(ex.rejected_ids), np.int32))
    if layout == "packed":
        return [RowSpec(ex.prompt_ids, (c, r))]
    if layout == "separate":
        return [RowSpec(ex.prompt_ids, (c,)), RowSpec(ex.prompt_ids, (r,))]
    raise ValueError(f"pair layout must be 'packed' or 'separate', got {layout!r}.")


def collate_pairs(examples: Sequence[TokenizedPair], max_length: int | None = None, pad_id: int = 0, *,
                  pad_to: PadTo = "bucket", multiple: int = 64, layout: Layout = "packed",
                  padding_side: Literal["right", "left"] = "right") -> PairBatch:
    """A PairBatch (prs_jax.data.batches): the x view and, when the examples carry one, the p (+) x view, in
    `layout` ("packed": the prompt once per row, chosen and rejected as two branches; "separate": one row per
    response; "cascade": the prompt as its own row, see prs_jax.data.batches), plus optional float32 [B] margin / p_chosen. Every prompt + response must fit max_length; the
    padded row length T is the longest row rounded up to `multiple`, or with pad_to='max_length' exactly
    max_length (separate) or 2 * max_length (packed: the longest a packed pair can be)."""
    if not examples:
        raise DataError("collate_pairs: no examples.")
    n_aug = sum(e.augmented is not None for e in examples)
    if n_aug not in (0, len(examples)):
        raise DataError("collate_pairs: some examples have a p (+) x view and some do not; tokenise them together.")
    views = [list(examples)] + ([[e.augmented for e in examples]] if n_aug else [])
    if max_length is not None:
        for view in views:
            for e in view:
                longest = len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids))
                if longest > max_length:
                    raise DataError(f"collate_pairs: {e.where or 'a pair'} has {longest} tokens, more than "
                                    f"max_length={max_length}; tokenise with the same max_length as the collation "
                                    "(it truncates or drops long rows).")
    if layout == "cascade":
        packed = [pack_shared_prompt([(e.prompt_ids, [(e.chosen_ids, np.ones(len(e.chosen_ids), np.int32)),
                                                      (e.rejected_ids, np.ones(len(e.rejected_ids), np.int32))])
                                      for e in view], pad_id=pad_id, max_length=max_length, pad_to=pad_to,
                                     multiple=multiple) for view in views]
    else:
        cap = None if max_length is None else (2 * max_length if layout == "packed" else max_length)
        packed = [pack_rows([pair_rows(e, layout) for e in view], pad_id=pad_id, max_length=cap, pad_to=pad_to,
                            multiple=multiple, padding_side=padding_side) for view in views]
    return PairBatch(x=packed[0], aug=packed[1] if n_aug else None, margin=_float_column(examples, "margin"),
                     p_chosen=_float_column(examples, "p_chosen"))
