"""Supervised fine-tuning data in TRL's column conventions: read, validate, tokenise with a loss mask, collate.

Row formats (checked in this order):
  - `messages`: a conversation (list of {"role", "content"}) ending with an assistant message. With
    loss_on="assistant" (default) every assistant turn is scored (its content and the template's end-of-turn
    tokens); with "last_assistant" only the final one. If the template does not render the conversation turn by
    turn as a prefix-consistent string, the row falls back to the final turn (counted in the report).
  - `prompt` + `completion`: strings (raw text; EOS appended to the completion) or messages (chat template);
    the completion is scored.
  - `text`: plain language-modelling text, every token scored (BOS as the tokenizer adds it, EOS appended).
Tokenisation, truncation and the report follow prs_jax.data.pairs (same boundary check and policy); the
"prompt" of a conversation is everything before its first assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from prs_jax.data.batches import RowSpec, TokenBatch, pack_rows
from prs_jax.data.batching import PadTo
from prs_jax.data.io import Row, iter_rows
from prs_jax.data.pairs import (
    Content, DataReport, Encoder, Limits, Message, OnTooLong, TruncationMode, check_messages,
    count_boundary, missing_columns, prompt_and_responses, truncate,
)
from prs_jax.errors import DataError

__all__ = ["SFTExample", "TokenizedSFT", "parse_sft", "load_sft", "tokenize_sft", "collate_sft", "pack_plan",
           "collate_sft_packed"]

LossOn = Literal["assistant", "last_assistant"]


@dataclass(frozen=True)
class SFTExample:
    """One validated SFT row: kind 'messages', 'prompt_completion' or 'text', and where it came from."""

    kind: Literal["messages", "prompt_completion", "text"]
    prompt: Content | None = None
    completion: Content | None = None
    messages: list[Message] | None = None
    text: str | None = None
    where: str = "<memory>"


@dataclass(frozen=True, eq=False)
class TokenizedSFT:
    """Int32 prompt ids (never scored), response ids, and the response's loss mask (1 = scored)."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_loss_mask: np.ndarray
    where: str = ""

    @property
    def input_ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.response_ids]).astype(np.int32)

    @property
    def loss_mask(self) -> np.ndarray:
        return np.concatenate([np.zeros(len(self.prompt_ids), np.int32), self.response_loss_mask])


def parse_sft(row: Mapping[str, Any], where: str = "row") -> SFTExample:
    """Validate one SFT row (messages, prompt/completion, or text); errors name `where` and the column."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be a mapping of column names to values, got {type(row).__name__}.")
    if row.get("messages") is not None:
        if row.get("prompt") is not None or row.get("completion") is not None:
            raise DataError(f"{where}: has both 'messages' and 'prompt'/'completion'; keep one format per row.")
        msgs = check_messages(row["messages"], "messages", where)
        roles = [m["role"] for m in msgs]
        if "assistant" not in roles:
            raise DataError(f"{where}: column 'messages' has no assistant message to train on.")
        if roles[-1] != "assistant":
            raise DataError(f"{where}: column 'messages' must end with an assistant message, got {roles[-1]!r}.")
        if roles[0] == "assistant":
            raise DataError(f"{where}: column 'messages' starts with an assistant message; the conversation needs "
                            "a user (or system) message before the first reply.")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: column 'messages': the final assistant message is empty.")
        return SFTExample("messages", messages=msgs, where=where)
    if row.get("prompt") is not None or row.get("completion") is not None:
        prompt, (completion,) = prompt_and_responses(row, where, ("completion",))
        return SFTExample("prompt_completion", prompt=prompt, completion=completion, where=where)
    if row.get("text") is not None:
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: column 'text' must be a non-empty string, got {str(text)[:60]!r}.")
        return SFTExample("text", text=text, where=where)
    raise missing_columns(row, where, ["messages"], "SFT rows need 'messages' (a conversation), or 'prompt' and "
                          "'completion', or 'text' (TRL's conventions).")


def load_sft(source: Any, split: str | None = None) -> list[SFTExample]:
    """Read and validate every SFT row of a JSONL/JSON/Parquet file or `datasets` source."""
    return [parse_sft(r.data, r.where) for r in iter_rows(source, split)]


def _as_examples(rows: Iterable[SFTExample | Row | Mapping[str, Any]]) -> Iterable[SFTExample]:
    for i, r in enumerate(rows):
        if isinstance(r, SFTExample):
            yield r
        elif isinstance(r, Row):
            yield parse_sft(r.data, r.where)
        else:
            yield parse_sft(r, f"row {i}")


def _assistant_spans(enc: Encoder, msgs: list[Message], where: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Prompt ids, response ids and the mask of every assistant turn, or None when the template's renders of
    the conversation's prefixes are not prefixes of its full tokenisation."""
    full = enc.encode(enc.render(msgs, False, where))
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = enc.encode(enc.render(msgs[:i], True, where))
        end = enc.encode(enc.render(msgs[:i + 1], False, where))
        if not (len(start) < len(end) <= len(full) and full[:len(end)] == end and end[:len(start)] == start):
            return None
        spans.append((len(start), len(end)))
    first = spans[0][0]
    mask = np.zeros(len(full) - first, np.int32)
    for s, e in spans:
        mask[s - first:e - first] = 1
    return np.asarray(full[:first], np.int32), np.asarray(full[first:], np.int32), mask


def _tokenize_one(enc: Encoder, ex: SFTExample, loss_on: LossOn, report: DataReport
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if ex.kind == "text":
        assert ex.text is not None
        resp = enc.encode(ex.text)
        if enc.eos_id is not None:
            resp = resp + [enc.eos_id]
        return np.asarray(enc.raw_lead, np.int32), np.asarray(resp, np.int32), np.ones(len(resp), np.int32)
    if ex.kind == "messages":
        assert ex.messages is not None
        enc.chat_mode(ex.messages, ex.where)  # raises without a chat template
        if loss_on == "assistant" and sum(m["role"] == "assistant" for m in ex.messages) > 1:
            spans = _assistant_spans(enc, ex.messages, ex.where)
            if spans is not None:
                return spans
            report.single_turn_fallbacks += 1
        prompt, completion = ex.messages[:-1], [ex.messages[-1]]
    else:
        assert ex.prompt is not None and ex.completion is not None
        prompt, completion = ex.prompt, ex.completion
    prompt_ids, (resp,), status = enc.prompt_responses(prompt, [completion], ex.where, False)
    count_boundary(report, status)
    return prompt_ids, resp, np.ones(len(resp), np.int32)


def tokenize_sft(rows: Iterable[SFTExample | Row | Mapping[str, Any]], tokenizer: Any, *,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 truncation: TruncationMode = "keep_end", on_too_long: OnTooLong = "error",
                 use_chat_template: bool | None = None, loss_on: LossOn = "assistant"
                 ) -> tuple[list[TokenizedSFT], DataReport]:
    """Validate, tokenise (loss on completion / assistant tokens) and truncate SFT rows."""
    if loss_on not in ("assistant", "last_assistant"):
        raise ValueError(f"loss_on must be 'assistant' or 'last_assistant', got {loss_on!r}.")
    limits = Limits(max_length, max_prompt_length, truncation, on_too_long)
    enc = Encoder(tokenizer, use_chat_template)
    report = DataReport()
    out: list[TokenizedSFT] = []
    for ex in _as_examples(rows):
        report.rows += 1
        prompt_ids, resp, mask = _tokenize_one(enc, ex, loss_on, report)
        res = truncate([prompt_ids], [resp], limits, ex.where, report)
        if res is None:
            continue
        (p,), room = res
        out.append(TokenizedSFT(p, resp[:room], mask[:room], ex.where))
        report.kept += 1
    return out, report


def collate_sft(examples: Sequence[TokenizedSFT], max_length: int | None = None, pad_id: int = 0, *,
                pad_to: PadTo = "bucket", multiple: int = 64) -> TokenBatch:
    """A TokenBatch (one row, one sequence per example): the prompt as the row's prefix, the response as its
    branch, scored where the response's loss mask is 1; right-padded to a bucketed (or max_length) T."""
    if not examples:
        raise DataError("collate_sft: no examples.")
    return pack_rows([[RowSpec(e.prompt_ids, ((e.response_ids, e.response_loss_mask),))] for e in examples],
                     pad_id=pad_id, max_length=max_length, pad_to=pad_to, multiple=multiple)


def pack_plan(lengths: Sequence[int] | np.ndarray, max_length: int, seed: int = 0) -> list[list[int]]:
    """Group examples into rows of at most `max_length` tokens (sequence packing): best-fit decreasing, ties
    broken by a permutation seeded by `seed`, so the plan depends only on the lengths and the seed (not on
    creation order or batch size). Returns the example indices of each row; every index appears once. Rows are
    ordered by their smallest example index."""
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    if len(lengths) and int(lengths.max()) > max_length:
        i = int(np.argmax(lengths))
        raise DataError(f"pack_plan: example {i} has {int(lengths[i])} tokens, more than max_length={max_length}; "
                        "truncate first (data.on_too_long) or raise data.max_length.")
    tie = np.random.default_rng([seed, 7]).permutation(len(lengths))
    order = np.lexsort((tie, -lengths))  # longest first, seeded ties
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # room -> rows with exactly that room left
    for i in order:
        need = int(lengths[i])
        for room in range(need, max_length + 1):  # the fullest row that still fits (best fit)
            if by_room[room]:
                r = by_room[room].pop()
                break
        else:
            r, room = len(rows), max_length
            rows.append([])
        rows[r].append(int(i))
        by_room[room - need].append(r)
    rows = [sorted(r) for r in rows]
    rows.sort(key=lambda r: r[0])
    return rows


def collate_sft_packed(groups: Sequence[Sequence[TokenizedSFT]], max_length: int | None = None, pad_id: int = 0, *,
                       pad_to: PadTo = "bucket", multiple: int = 64) -> TokenBatch:
    """A TokenBatch whose rows each hold several whole conversations (a `pack_plan` row): every conversation is
    its own segment (it attends only to itself) with positions restarting at 0, so each token's log-prob is the
    one it has unpacked. Rows holding fewer conversations than the batch's fullest get empty sequences, which
    score nothing."""
    if not groups or not all(groups):
        raise DataError("collate_sft_packed: no examples (or an empty packed row).")
    s = max(len(g) for g in groups)
    empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
    rows = []
    for g in groups:
        branches = [(e.input_ids, np.concatenate([np.zeros(len(e.prompt_ids), np.int32),
                                                  np.asarray(e.response_loss_mask, np.int32)])) for e in g]
        rows.append([RowSpec(np.zeros(0, np.int32), tuple(branches) + (empty,) * (s - len(g)))])
    return pack_rows(rows, pad_id=pad_id, max_length=max_length, pad_to=pad_to, multiple=multiple)
