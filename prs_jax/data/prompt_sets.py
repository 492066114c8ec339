"""Standard prompt sets read from files the user has (or offline `datasets` sources) into `PromptItem`s.

Nothing here ships or downloads data: point a loader at a file in the set's usual format (JSONL, JSON, Parquet,
a `save_to_disk` directory, a cached data set name; see `io.iter_rows`) or pass the rows themselves (a list of
dicts, a `datasets.Dataset`, or a `DatasetDict` with `split=`).

    load_prompt_set(name_or_format, source, split=None, **options) -> list[PromptItem]

    name             loader                 formats understood
    "alpaca_eval"    load_alpaca_eval       {"instruction", "output", "generator", "dataset"} rows (the eval set
                                            or a model's outputs file; JSON list or JSONL), or a plain list of
                                            instruction strings (a JSON array of strings, or a Python list)
    "mt_bench"       load_mt_bench          FastChat question.jsonl: {"question_id", "category", "turns",
                                            optional "reference"} ("prompt_id"/"prompt" accepted as aliases)
    "ultrafeedback"  load_ultrafeedback     binarized {"prompt", "prompt_id", "chosen", "rejected", ...}, the
                                            original {"source", "instruction", "completions", ...}, or rows with
                                            only "chosen"/"rejected" message lists (implicit prompt)
    "hh"             load_hh                Anthropic HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
                                            "rejected": ...}; also a "prompt" string in that layout, or message
                                            lists ("prompt", or "chosen" with an implicit prompt)
    "tldr"           load_tldr              {"prompt": "SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:", ...}
                                            (TRL/CarperAI style) or OpenAI comparisons {"info": {"id", "post",
                                            "title", "subreddit"}, "summaries": [...], "choice"}
    "generic"/"jsonl" load_generic          any rows: a prompt column, optional id and preference columns

Ids are stable strings: "<set>-<key>" where the key is the set's own id (MT-Bench question_id, UltraFeedback
prompt_id, the TL;DR post id), the row index (AlpacaEval by default, the generic loader without an id column),
or a hash of the prompt text (sha256, hex; 12 digits, the full 64 for UltraFeedback so that they equal the
binarized set's prompt_id). `id_prefix` replaces "<set>" ("" for no prefix; the generic loader has none).

Repeats. Rows that give the same id and the same prompt (the same HH context or TL;DR post in many comparisons)
are one prompt: with `dedupe=True` (the default) only the first is kept; with `dedupe=False` every row is kept
and the repeats get ids "<id>#2", "<id>#3", ... in file order. The same explicit id with a different prompt is
a DataError naming both places.

Every item's metadata holds "prompt_set" (the loader's name) and "where" (file:line, or source plus row
index), plus the set-specific fields documented on each loader. Malformed rows raise DataError naming `where`.
`limit` stops after that many items (reading no further).
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

from prs_jax.data.io import Row, iter_rows
from prs_jax.errors import DataError
from prs_jax.data.items import PromptItem

__all__ = [
    "load_prompt_set", "register_prompt_set", "prompt_set_names", "PROMPT_SETS",
    "load_alpaca_eval", "load_mt_bench", "load_ultrafeedback", "load_hh", "load_tldr", "load_generic",
    "parse_hh_dialogue", "hh_prompt", "tldr_prompt", "TLDR_LAYOUT", "HH_ASSISTANT_TAG", "HH_HUMAN_TAG",
]

Source = str | Path | Iterable[Any] | Mapping[str, Any]
Message = dict[str, str]

HH_HUMAN_TAG = "\n\nHuman:"
HH_ASSISTANT_TAG = "\n\nAssistant:"
# The TL;DR post layout: the labels the TRL/CarperAI TL;DR prompt sets use, so that a post from the OpenAI
# comparisons gives the same prompt text as the same post in a "prompt"-column set. Change with layout=.
TLDR_LAYOUT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


# ------------------------------------------------------------------------------------------------ reading

def _json_array_rows(path: Path, string_column: str) -> Iterator[Row] | None:
    """Rows of a .json file holding an array whose elements may be plain strings (each becomes
    {string_column: s}); None when the file is not an array (io.iter_rows reads it then)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        if not fh.read(4096).lstrip().startswith("["):
            return None
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}).") from None

    def rows() -> Iterator[Row]:
        for i, obj in enumerate(data):
            yield _as_row(obj, f"{path} [{i}]", string_column)
    return rows()


def _as_row(obj: Any, where: str, string_column: str | None) -> Row:
    if isinstance(obj, Row):
        return obj
    if isinstance(obj, Mapping):
        return Row(dict(obj), where)
    if isinstance(obj, str) and string_column is not None:
        return Row({string_column: obj}, where)
    allowed = "a JSON object or a string" if string_column is not None else "a JSON object"
    raise DataError(f"{where}: expected {allowed} per row, got {type(obj).__name__}.")


def _rows(source: Source, split: str | None, string_column: str | None = None) -> Iterator[Row]:
    """Rows of a file / data set source (io.iter_rows) or of in-memory rows; with `string_column`, plain
    strings (in a JSON array file or a Python list) are rows {string_column: s}."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if string_column is not None and path.is_file() and path.name.lower().endswith((".json", ".json.gz")):
            if split not in (None, "train"):
                raise DataError(f"{path}: split {split!r} asked for, but a single file holds one split. Pass "
                                "split=None.")
            rows = _json_array_rows(path, string_column)
            if rows is not None:
                return rows
        return iter_rows(source, split)
    if isinstance(source, Mapping):  # a DatasetDict, or {split: rows}
        names = list(source.keys())
        if split is None:
            if len(names) != 1:
                raise DataError(f"the source holds splits {names}; say which one with split=...")
            split = names[0]
        if split not in source:
            raise DataError(f"the source has no split {split!r}; it holds {names}.")
        return _rows(source[split], None, string_column)
    if split is not None:
        raise DataError(f"split {split!r} asked for, but the source is a sequence of rows (one split); pass "
                        "split=None.")
    try:
        it = iter(source)
    except TypeError:
        raise DataError(f"cannot read prompts from a {type(source).__name__}: give a file path, a data set "
                        "name or directory, or a list of rows.") from None
    return (_as_row(obj, f"row {i}", string_column) for i, obj in enumerate(it))


# ----------------------------------------------------------------------------------------------- checking

def _text(d: Mapping[str, Any], column: str, where: str, *, required: bool = True) -> str | None:
    """A non-blank string column (None when absent/null and not required)."""
    value = d.get(column)
    if value is None:
        if required:
            raise DataError(f"{where}: missing column {column!r}; the row has {sorted(d)}.")
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {type(value).__name__}.")
    if not value.strip():
        if required:
            raise DataError(f"{where}: column {column!r} is empty.")
        return None
    return value


def _messages(value: Any, column: str, where: str) -> list[Message]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: column {column!r} must be a non-empty list of messages "
                        f"({{'role', 'content'}}), got {type(value).__name__}.")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: column {column!r}, message {j}: needs a string 'role' and a string "
                            f"'content', got {str(m)[:120]}.")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_messages(msgs: list[Message], column: str, where: str) -> list[Message]:
    """The leading messages up to and including the last user message before the first assistant reply."""
    first_assistant = next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    head = msgs[:first_assistant]
    users = [k for k, m in enumerate(head) if m["role"] == "user"]
    if not users or not head[users[-1]]["content"].strip():
        raise DataError(f"{where}: column {column!r} has no user message with content before the first "
                        "assistant message.")
    return head[:users[-1] + 1]


def _last_assistant(value: Any, column: str, where: str) -> str | None:
    """The response text of a chosen/rejected column: a string, or the last assistant message's content."""
    if value is None or isinstance(value, str):
        return value
    msgs = _messages(value, column, where)
    return next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), None)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _short_hash(text: str) -> str:
    return _sha256(text)[:12]


def _choice(value: Any, name: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")


# ------------------------------------------------------------------------------------------------ collect

@dataclass
class _Entry:
    key: str
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)
    preference: str | None = None
    explicit: bool = True  # the key is the set's own id (or the index), not a hash of the prompt


def _collect(name: str, source: Source, rows: Iterable[Row], parse: Callable[[Row, int], _Entry], *,
             id_prefix: str | None, dedupe: bool, limit: int | None) -> list[PromptItem]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    prefix = name if id_prefix is None else id_prefix
    items: list[PromptItem] = []
    seen: dict[str, PromptItem] = {}
    repeats: dict[str, int] = {}
    for index, row in enumerate(rows):
        if limit is not None and len(items) >= limit:
            break
        e = parse(row, index)
        pid = f"{prefix}-{e.key}" if prefix else str(e.key)
        if pid in seen:
            prev = seen[pid]
            same = prev.prompt == e.prompt and prev.preference == e.preference
            if not same and e.explicit:
                raise DataError(f"{row.where}: id {pid!r} was already given to a different prompt at "
                                f"{prev.metadata['where']}; ids must name one prompt.")
            if same and dedupe:
                continue
            n = repeats.get(pid, 1) + 1
            while f"{pid}#{n}" in seen:
                n += 1
            repeats[pid] = n
            pid = f"{pid}#{n}"
        item = PromptItem(pid, e.prompt, e.preference, {**e.metadata, "prompt_set": name, "where": row.where})
        seen[pid] = item
        items.append(item)
    if not items:
        raise DataError(f"{source if isinstance(source, (str, Path)) else 'the given rows'}: no prompts.")
    return items


# ------------------------------------------------------------------------------------------------ loaders

def load_alpaca_eval(source: Source, split: str | None = None, *, id_from: Literal["index", "hash"] = "index",
                     id_prefix: str | None = None, dedupe: bool = True, limit: int | None = None
                     ) -> list[PromptItem]:
    """AlpacaEval instructions.

    Rows {"instruction", "output", "generator", "dataset"} (the eval set, or any model's outputs in the same
    format) as a JSON list or JSONL, or a plain list of instruction strings. An optional non-empty "input"
    (Alpaca style) is appended to the instruction after a blank line. Ids "alpaca_eval-<row index>"
    (id_from="index", the eval set's order) or "alpaca_eval-<sha256(prompt)[:12]>" (id_from="hash", stable
    under reordering and subsetting). Metadata: "index", and "dataset", "generator", "output" (that
    generator's response, e.g. the reference model's) and "input" where the row has them.
    """
    _choice(id_from, "id_from", ("index", "hash"))

    def parse(row: Row, index: int) -> _Entry:
        d = row.data
        instruction = _text(d, "instruction", row.where)
        assert instruction is not None
        extra = _text(d, "input", row.where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        meta: dict[str, Any] = {"index": index}
        for col in ("dataset", "generator", "output", "input"):
            if d.get(col) is not None:
                meta[col] = d[col]
        if id_from == "hash":
            return _Entry(_short_hash(prompt), prompt, meta, explicit=False)
        return _Entry(str(index), prompt, meta)

    return _collect("alpaca_eval", source, _rows(source, split, string_column="instruction"), parse,
                    id_prefix=id_prefix, dedupe=dedupe, limit=limit)


def load_mt_bench(source: Source, split: str | None = None, *, turns: Literal["first", "both"] = "first",
                  id_prefix: str | None = None, dedupe: bool = True, limit: int | None = None
                  ) -> list[PromptItem]:
    """MT-Bench questions (FastChat's question.jsonl: {"question_id", "category", "turns": [t1, t2],
    optional "reference": [r1, r2]}; "prompt_id" and "prompt" are accepted for question_id and turns).

    The prompt is always the first turn; ids "mt_bench-<question_id>".
      turns="first": single-turn items. metadata["turns"] == [t1] and "reference" (if any) keeps its first
                     entry only.
      turns="both":  items for a two-turn run: metadata["turns"] holds every turn ([t1, t2]; a row with fewer
                     than two is an error) and "reference" all its entries. Generate the answer to the prompt
                     (t1), then continue the conversation [user t1, assistant answer, user t2] for turn two.
    Metadata also: "question_id" (as in the file), "category".
    """
    _choice(turns, "turns", ("first", "both"))

    def parse(row: Row, index: int) -> _Entry:
        d = row.data
        id_col = "question_id" if d.get("question_id") is not None else "prompt_id"
        qid = d.get(id_col)
        if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)) or not str(qid).strip():
            raise DataError(f"{row.where}: needs a 'question_id' (integer or string); the row has {sorted(d)}.")
        col = "turns" if d.get("turns") is not None else "prompt"
        ts = d.get(col)
        if not isinstance(ts, (list, tuple)) or not ts:
            raise DataError(f"{row.where}: column 'turns' must be a non-empty list of strings (the user turns), "
                            f"got {type(ts).__name__}.")
        for j, t in enumerate(ts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"{row.where}: turns[{j}] must be a non-empty string.")
        if turns == "both" and len(ts) < 2:
            raise DataError(f"{row.where}: turns='both' needs at least two turns, the row has {len(ts)}.")
        ts = list(ts) if turns == "both" else [ts[0]]
        meta: dict[str, Any] = {"question_id": qid, "category": d.get("category"), "turns": ts}
        ref = d.get("reference")
        if ref is not None:
            if isinstance(ref, str):
                ref = [ref]
            if not isinstance(ref, (list, tuple)) or not all(isinstance(r, str) for r in ref):
                raise DataError(f"{row.where}: column 'reference' must be a list of strings, got {ref!r:.120}.")
            if ref:
                meta["reference"] = list(ref) if turns == "both" else [ref[0]]
        return _Entry(str(qid).strip(), ts[0], meta)

    return _collect("mt_bench", source, _rows(source, split), parse, id_prefix=id_prefix, dedupe=dedupe,
                    limit=limit)


def load_ultrafeedback(source: Source, split: str | None = None, *, id_prefix: str | None = None,
                       dedupe: bool = True, limit: int | None = None) -> list[PromptItem]:
    """UltraFeedback prompts.

      binarized (HuggingFaceH4/ultrafeedback_binarized): "prompt" string, "prompt_id", "chosen"/"rejected"
          (message lists or strings), "score_chosen"/"score_rejected". Metadata: "chosen"/"rejected" (the
          response texts), "score_chosen"/"score_rejected".
      original (openbmb/UltraFeedback): "instruction", "source", "models", "completions" (each {"model",
          "response", "overall_score", "fine-grained_score", ...}). Metadata: "source", "completions" as
          [{"model", "response", "overall_score", "fine-grained_score"}] (present keys only).
      message lists only ("chosen"/"rejected", TRL's implicit prompt): the prompt is the last user message
          before the first assistant reply; metadata["messages"] holds those leading messages.
    Ids "ultrafeedback-<prompt_id>" where the row has one, else "ultrafeedback-<sha256(prompt)>" (full hex:
    the binarized set's prompt_id is that hash, so both formats give one prompt the same id). A "source"
    column is kept in metadata in every format.
    """

    def parse(row: Row, index: int) -> _Entry:
        d = row.data
        meta: dict[str, Any] = {}
        if d.get("prompt") is not None and not isinstance(d.get("prompt"), (list, tuple)):
            prompt = _text(d, "prompt", row.where)
        elif d.get("instruction") is not None:
            prompt = _text(d, "instruction", row.where)
            comps = d.get("completions")
            if comps is not None:
                if not isinstance(comps, (list, tuple)) or not all(isinstance(c, Mapping) for c in comps):
                    raise DataError(f"{row.where}: column 'completions' must be a list of objects, got "
                                    f"{type(comps).__name__}.")
                meta["completions"] = [{k: c[k] for k in ("model", "response", "overall_score",
                                                          "fine-grained_score") if c.get(k) is not None}
                                       for c in comps]
        elif isinstance(d.get("prompt"), (list, tuple)) or isinstance(d.get("chosen"), (list, tuple)):
            col = "prompt" if d.get("prompt") is not None else "chosen"
            msgs = _prompt_messages(_messages(d[col], col, row.where), col, row.where)
            prompt = msgs[-1]["content"]
            meta["messages"] = msgs
        else:
            raise DataError(f"{row.where}: an UltraFeedback row needs 'prompt' (binarized), 'instruction' "
                            f"(original) or 'chosen' messages; the row has {sorted(d)}.")
        assert prompt is not None
        for col in ("chosen", "rejected"):
            if d.get(col) is not None:
                meta[col] = _last_assistant(d[col], col, row.where)
        for col in ("score_chosen", "score_rejected", "source"):
            if d.get(col) is not None:
                meta[col] = d[col]
        pid = d.get("prompt_id")
        if pid is not None and str(pid).strip():
            return _Entry(str(pid).strip(), prompt, meta)
        return _Entry(_sha256(prompt), prompt, meta, explicit=False)

    return _collect("ultrafeedback", source, _rows(source, split), parse, id_prefix=id_prefix, dedupe=dedupe,
                    limit=limit)


_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str, where: str = "text") -> list[Message]:
    """Chat messages of HH-layout text ("\\n\\nHuman: ...\\n\\nAssistant: ..."): Human -> user, Assistant ->
    assistant, contents stripped, consecutive turns of one speaker joined with a blank line (chat templates
    want alternating roles). Text before the first tag is an error."""
    if not text.startswith("\n\n") and text.lstrip().startswith(("Human:", "Assistant:")):
        text = "\n\n" + text.lstrip()
    parts = _HH_SPLIT.split(text)
    if parts[0].strip():
        raise DataError(f"{where}: text before the first '\\n\\nHuman:' turn: {parts[0].strip()[:80]!r}. HH "
                        "dialogues are '\\n\\nHuman: ...\\n\\nAssistant: ...'.")
    out: list[Message] = []
    for tag, content in zip(parts[1::2], parts[2::2]):
        role, content = _HH_ROLES[tag], content.strip()
        if out and out[-1]["role"] == role:
            out[-1]["content"] = f"{out[-1]['content']}\n\n{content}".strip()
        else:
            out.append({"role": role, "content": content})
    return out


def hh_prompt(text: str, where: str = "text", keep_assistant_tag: bool = True) -> tuple[str, str, list[Message]]:
    """(prompt, response, messages) of an HH dialogue: the prompt is the text up to the last
    "\\n\\nAssistant:" (including that tag with keep_assistant_tag, as DPO's HH preprocessing does), the
    response what follows it (stripped), the messages the parsed turns of the prompt."""
    idx = text.rfind(HH_ASSISTANT_TAG)
    if idx < 0:
        raise DataError(f"{where}: no '\\n\\nAssistant:' turn in the dialogue {text[:80]!r}; HH rows are "
                        "'\\n\\nHuman: ...\\n\\nAssistant: ...'.")
    messages = parse_hh_dialogue(text[:idx], where)
    if not any(m["role"] == "user" and m["content"] for m in messages):
        raise DataError(f"{where}: no Human turn with text before the last Assistant turn.")
    end = idx + len(HH_ASSISTANT_TAG) if keep_assistant_tag else idx
    return text[:end], text[idx + len(HH_ASSISTANT_TAG):].strip(), messages


def _hh_text(messages: list[Message]) -> str:
    tags = {"user": HH_HUMAN_TAG, "assistant": HH_ASSISTANT_TAG}
    return "".join(f"{tags.get(m['role'], HH_HUMAN_TAG)} {m['content']}" for m in messages)


def load_hh(source: Source, split: str | None = None, *, keep_assistant_tag: bool = True,
            id_prefix: str | None = None, dedupe: bool = True, limit: int | None = None) -> list[PromptItem]:
    """Anthropic HH-RLHF dialogue contexts.

    Rows {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}. The prompt is the chosen text up
    to its last "\\n\\nAssistant:" (multi-turn text kept verbatim, the tag itself kept unless
    keep_assistant_tag=False), ready for raw-text generation. Metadata: "messages" (the context as chat
    messages, see parse_hh_dialogue; normally ending with a user turn), "chosen" and "rejected" (the final
    responses), "rejected_context_differs" (or "chosen_...") when that text has another context. Also read: a "prompt"
    string in the same layout (rows that split the context off), or message lists ("prompt", or "chosen" with
    an implicit prompt), whose prompt text is rebuilt in the HH layout. Ids "hh-<sha256(prompt)[:12]>"; the
    same context in several comparisons is one prompt (see dedupe).
    """

    def parse(row: Row, index: int) -> _Entry:
        d, where = row.data, row.where
        meta: dict[str, Any] = {}
        if isinstance(d.get("prompt"), str) or isinstance(d.get("chosen"), str):
            col = "prompt" if isinstance(d.get("prompt"), str) else "chosen"
            text = _text(d, col, where)
            assert text is not None
            prompt, _, messages = hh_prompt(text, f"{where}, column {col!r}", keep_assistant_tag)
            for c in ("chosen", "rejected"):
                v = d.get(c)
                if isinstance(v, str) and v.strip():
                    if HH_ASSISTANT_TAG in v:  # a whole dialogue: the response is its last Assistant turn
                        ctx, meta[c], _ = hh_prompt(v, f"{where}, column {c!r}", keep_assistant_tag)
                        if ctx != prompt:
                            meta[f"{c}_context_differs"] = True
                    else:  # the response alone (rows with a separate "prompt")
                        meta[c] = v.strip()
                elif v is not None and not isinstance(v, str):
                    meta[c] = _last_assistant(v, c, where)
        elif isinstance(d.get("prompt"), (list, tuple)) or isinstance(d.get("chosen"), (list, tuple)):
            col = "prompt" if d.get("prompt") is not None else "chosen"
            messages = _prompt_messages(_messages(d[col], col, where), col, where)
            prompt = _hh_text(messages) + (HH_ASSISTANT_TAG if keep_assistant_tag else "")
            for c in ("chosen", "rejected"):
                if d.get(c) is not None:
                    meta[c] = _last_assistant(d[c], c, where)
        else:
            raise DataError(f"{where}: an HH row needs 'chosen' (the '\\n\\nHuman: ...\\n\\nAssistant: ...' "
                            f"dialogue) or 'prompt'; the row has {sorted(d)}.")
        return _Entry(_short_hash(prompt), prompt, {"messages": messages, **meta}, explicit=False)

    return _collect("hh", source, _rows(source, split), parse, id_prefix=id_prefix, dedupe=dedupe, limit=limit)


_TLDR_PARSE = re.compile(r"\s*SUBREDDIT:\s*r/(?P<subreddit>[^\n]*?)\s*\n+\s*TITLE:\s*(?P<title>[^\n]*?)\s*\n+"
                         r"\s*POST:\s*(?P<post>.*?)\s*\n+\s*TL;DR:\s*", re.DOTALL)


def tldr_prompt(post: str, title: str = "", subreddit: str = "", layout: str = TLDR_LAYOUT) -> str:
    """The prompt for a Reddit post: `layout` filled with the stripped subreddit (no "r/"), title and post."""
    sub = subreddit.strip()
    sub = sub[2:] if sub.startswith("r/") else sub
    return layout.format(subreddit=sub, title=title.strip(), post=post.strip())


def load_tldr(source: Source, split: str | None = None, *, layout: str = TLDR_LAYOUT,
              id_prefix: str | None = None, dedupe: bool = True, limit: int | None = None) -> list[PromptItem]:
    """TL;DR summarisation prompts (Reddit posts).

      "prompt" rows (TRL / CarperAI style, "SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:"): the prompt is
          kept verbatim; "subreddit", "title", "post" are parsed into metadata when it has that layout.
          "label"/"completion"/"summary" (a reference summary) -> metadata["reference"], "chosen"/"rejected"
          kept. Ids "tldr-<sha256(prompt)[:12]>" (or an "id" column).
      OpenAI comparisons ({"info": {"id", "post", "title", "subreddit"}, "summaries": [{"text", "policy"}, ...],
          "choice"}; the files are JSONL even when named .json): the prompt is `layout` filled with the post
          (tldr_prompt; the default layout matches the "prompt" rows'). Ids "tldr-<info.id>". Metadata:
          "post_id", "subreddit", "title", "post", "summaries" (texts), "policies", "choice" (of the first
          comparison kept for the post).
    `layout` is a str.format template with {subreddit}, {title} and {post}.
    """
    for name in ("subreddit", "title", "post"):
        if "{" + name + "}" not in layout:
            raise ValueError(f"layout must contain {{{name}}}; got {layout!r}.")

    def parse(row: Row, index: int) -> _Entry:
        d, where = row.data, row.where
        if isinstance(d.get("info"), Mapping):
            info = d["info"]
            post = _text(info, "post", f"{where}, 'info'")
            assert post is not None
            title = info.get("title") or ""
            subreddit = info.get("subreddit") or ""
            if not isinstance(title, str) or not isinstance(subreddit, str):
                raise DataError(f"{where}: info 'title' and 'subreddit' must be strings.")
            prompt = tldr_prompt(post, title, subreddit, layout)
            meta: dict[str, Any] = {"post_id": info.get("id"), "subreddit": subreddit, "title": title,
                                    "post": post}
            sums = d.get("summaries")
            if sums is not None:
                if not isinstance(sums, (list, tuple)) or not all(isinstance(s, Mapping) and isinstance(
                        s.get("text"), str) for s in sums):
                    raise DataError(f"{where}: column 'summaries' must be a list of {{'text', ...}} objects.")
                meta["summaries"] = [s["text"] for s in sums]
                meta["policies"] = [s.get("policy") for s in sums]
            if d.get("choice") is not None:
                meta["choice"] = d["choice"]
            pid = info.get("id")
            if pid is not None and str(pid).strip():
                return _Entry(str(pid).strip(), prompt, meta)
            return _Entry(_short_hash(prompt), prompt, meta, explicit=False)
        if d.get("prompt") is not None:
            prompt = _text(d, "prompt", where)
            assert prompt is not None
            meta = {}
            m = _TLDR_PARSE.fullmatch(prompt)
            if m:
                meta.update(subreddit=m["subreddit"], title=m["title"], post=m["post"])
            for col in ("label", "completion", "summary"):
                if isinstance(d.get(col), str):
                    meta["reference"] = d[col].strip()
                    break
            for col in ("chosen", "rejected"):
                if d.get(col) is not None:
                    meta[col] = _last_assistant(d[col], col, where)
            if d.get("id") is not None and str(d["id"]).strip():
                return _Entry(str(d["id"]).strip(), prompt, meta)
            return _Entry(_short_hash(prompt), prompt, meta, explicit=False)
        if isinstance(d.get("post"), str):  # flattened posts ({"post", "title", "subreddit", "id"})
            return parse(Row({"info": d}, where), index)
        raise DataError(f"{where}: a TL;DR row needs 'prompt' or 'info' (with 'post', 'title', 'subreddit'); the "
                        f"row has {sorted(d)}.")

    return _collect("tldr", source, _rows(source, split), parse, id_prefix=id_prefix, dedupe=dedupe, limit=limit)


def load_generic(source: Source, split: str | None = None, *, prompt_column: str = "prompt",
                 id_column: str | None = "id", preference_column: str | None = None,
                 metadata_columns: Sequence[str] | None = None, id_prefix: str = "", dedupe: bool = True,
                 limit: int | None = None) -> list[PromptItem]:
    """Prompts from any rows: `prompt_column` (a string, or a list of messages whose last user message before
    the first assistant reply is the prompt; the messages go to metadata["messages"]); the id from
    `id_column` when the row has it, else the row index (as strings; prefixed with id_prefix + "-" if given);
    the preference z from `preference_column` (a string; null or empty means none). Metadata: the other
    columns (all of them, or only `metadata_columns`). A JSON array of plain strings is read as prompts.
    """

    def parse(row: Row, index: int) -> _Entry:
        d, where = row.data, row.where
        value = d.get(prompt_column)
        meta: dict[str, Any] = {}
        if isinstance(value, (list, tuple)):
            msgs = _prompt_messages(_messages(value, prompt_column, where), prompt_column, where)
            prompt, meta["messages"] = msgs[-1]["content"], msgs
        else:
            prompt = _text(d, prompt_column, where)
        assert prompt is not None
        pref = None
        if preference_column is not None:
            pref = d.get(preference_column)
            if pref is not None and not isinstance(pref, str):
                raise DataError(f"{where}: preference column {preference_column!r} must be a string or null, got "
                                f"{type(pref).__name__}.")
            pref = pref if pref and pref.strip() else None
        used = {prompt_column, id_column, preference_column}
        cols = [c for c in d if c not in used] if metadata_columns is None else \
            [c for c in metadata_columns if c in d]
        meta.update({c: d[c] for c in cols})
        key = d.get(id_column) if id_column is not None else None
        if isinstance(key, (str, int)) and not isinstance(key, bool) and str(key).strip():
            return _Entry(str(key).strip(), prompt, meta, pref)
        if key is not None:
            raise DataError(f"{where}: id column {id_column!r} must be a non-empty string or an integer, got "
                            f"{key!r:.80}.")
        return _Entry(str(index), prompt, meta, pref)

    return _collect("generic", source, _rows(source, split, string_column=prompt_column), parse,
                    id_prefix=id_prefix, dedupe=dedupe, limit=limit)


# ----------------------------------------------------------------------------------------------- registry

PROMPT_SETS: dict[str, Callable[..., list[PromptItem]]] = {
    "alpaca_eval": load_alpaca_eval,
    "mt_bench": load_mt_bench,
    "ultrafeedback": load_ultrafeedback,
    "hh": load_hh,
    "tldr": load_tldr,
    "generic": load_generic,
    "jsonl": load_generic,
}
_ALIASES = {
    "alpacaeval": "alpaca_eval", "mtbench": "mt_bench", "ultra_feedback": "ultrafeedback", "anthropic_hh": "hh",
    "hh_rlhf": "hh", "summarize_from_feedback": "tldr", "json": "generic", "parquet": "generic",
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def prompt_set_names() -> list[str]:
    """The names load_prompt_set understands (aliases not included)."""
    return sorted(PROMPT_SETS)


def register_prompt_set(name: str, loader: Callable[..., list[PromptItem]]) -> None:
    """Add (or replace) a loader: loader(source, split=None, **options) -> list[PromptItem]."""
    PROMPT_SETS[_canonical(name)] = loader


def load_prompt_set(name_or_format: str, source: Source, split: str | None = None, **options: Any
                    ) -> list[PromptItem]:
    """Prompts of a standard set ("alpaca_eval", "mt_bench", "ultrafeedback", "hh", "tldr") or of any rows
    ("generic"/"jsonl": options prompt_column, id_column, preference_column, ...) from a file, a `datasets`
    source or in-memory rows. Options are the loader's keyword arguments (see each load_* function)."""
    loader = PROMPT_SETS.get(_canonical(name_or_format))
    if loader is None:
        raise ValueError(f"unknown prompt set {name_or_format!r}; known: {', '.join(prompt_set_names())} (or a "
                         f"registered name).")
    try:
        inspect.signature(loader).bind(source, split, **options)
    except TypeError:
        params = [p for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
        bad = sorted(set(options) - {p.name for p in params})
        raise ValueError(f"prompt set {name_or_format!r}: unknown option(s) {bad}; it takes "
                         f"{[p.name for p in params]}.") from None
    return loader(source, split, **options)
