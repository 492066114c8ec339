"""Typed training batches (flax.struct pytrees) and the host-side packing that builds them.

A `TokenBatch` is what one forward of a decoder needs plus which tokens are scored. Every array has a leading
EXAMPLE axis B (the axis the trainer indexes, splits into micro-batches and shards), then V rows per example:

    tokens, segment_ids, positions   int32 [B, V, T]
    target_slot, context_slot        int32 [B, V, R]   scored token i sits at slot target_slot and is predicted
                                                      by the hidden state at slot context_slot
    target_seq                       int32 [B, V, R]   which sequence of its row token i belongs to (-1: none,
                                                      the R axis is padded to a bucket)

Segments (how one row may hold several sequences sharing a prompt):
    segment_ids 0 = padding, 1 = shared prefix (visible to every later token of the row), k >= 2 = a branch
    visible only to itself (and to the prefix before it). Positions are given explicitly, so a branch's positions
    restart after the prefix. A plain sequence is prefix + one branch.

Layouts of a preference pair (prompt p, chosen c, rejected r):
    "packed":   V = 1, one row [p | c | r], S = 2 sequences per row: the prompt is computed once.
    "separate": V = 2, rows [p | c] and [p | r], S = 1 sequence per row (the unshared forward).
Either way `seqs_per_example` = V * S = 2 and the log-prob API returns [B, 2] = (chosen, rejected).
    "cascade":  a `SharedPromptBatch`: the prompt once as its own left-padded row, then the n responses as
                rows attending to the prompt's keys/values through cascade attention (the decoding engine's
                CascadeCache path, here with gradients), so no masked chosen x rejected attention block is
                computed. Prompts must not be empty.

Static facts. `seqs_per_row` (S) is a pytree_node=False field: it is part of the tree structure, so jit treats
it as static with no separate object to pass around. Everything else that used to be static (the bucketed
number of scored positions R, the padded length T) is an array SHAPE, which jit specialises on anyway; how the
log-probs are computed (method, chunk, remat) is a property of the loss, not of the batch
(prs_jax.train.logprobs.LogProbConfig).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from flax import struct

from prs_jax.data.batching import PadTo, bucket_length
from prs_jax.errors import DataError

__all__ = ["TokenBatch", "SharedPromptBatch", "PairBatch", "RowSpec", "Layout", "pack_rows", "pack_shared_prompt",
           "bucket_scored", "stack_examples", "PREFIX_SEGMENT"]

Layout = Literal["packed", "separate", "cascade"]
PREFIX_SEGMENT = 1


@struct.dataclass
class TokenBatch:
    """Decoder inputs and scored positions; see the module docstring for the axes and segment rules."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    target_slot: np.ndarray
    context_slot: np.ndarray
    target_seq: np.ndarray
    seqs_per_row: int = struct.field(pytree_node=False, default=1)

    @property
    def rows_per_example(self) -> int:
        return self.tokens.shape[1]

    @property
    def seqs_per_example(self) -> int:
        return self.rows_per_example * self.seqs_per_row

    @property
    def target_mask(self) -> np.ndarray:
        """Bool [B, V, R]: which of the R gathered positions are real scored tokens."""
        return self.target_seq >= 0

    def check(self, where: str) -> None:
        """Shapes at a module boundary (chex; trace time only under jit): [B, V, T] token fields, [B, V, R]
        scored-position fields. Errors name `where` and the field."""
        from prs_jax.checks import assert_rank, assert_shape

        assert_rank(where, "TokenBatch.tokens", self.tokens, 3, " [B, V, T]")
        b, v, t = self.tokens.shape
        for name in ("segment_ids", "positions"):
            assert_shape(where, f"TokenBatch.{name}", getattr(self, name), (b, v, t), " (like tokens)")
        assert_rank(where, "TokenBatch.target_slot", self.target_slot, 3, " [B, V, R]")
        for name in ("context_slot", "target_seq"):
            assert_shape(where, f"TokenBatch.{name}", getattr(self, name), self.target_slot.shape,
                         " (like target_slot)")


@struct.dataclass
class SharedPromptBatch:
    """One prompt per example and n responses continuing it (layout "cascade"):

        prompt_tokens, prompt_mask       int32 [B, P]     left-padded (the last prompt token sits at slot P - 1)
        resp_tokens, resp_mask           int32 [B, n, S]  right-padded responses
        resp_scored                      int32 [B, n, S]  1 where a response token is scored
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    resp_tokens: np.ndarray
    resp_mask: np.ndarray
    resp_scored: np.ndarray

    @property
    def seqs_per_example(self) -> int:
        return self.resp_tokens.shape[1]

    def check(self, where: str) -> None:
        """Shapes at a module boundary (chex; trace time only under jit); errors name `where` and the field."""
        from prs_jax.checks import assert_rank, assert_shape

        assert_rank(where, "SharedPromptBatch.prompt_tokens", self.prompt_tokens, 2, " [B, P]")
        assert_shape(where, "SharedPromptBatch.prompt_mask", self.prompt_mask, self.prompt_tokens.shape,
                     " (like prompt_tokens)")
        assert_rank(where, "SharedPromptBatch.resp_tokens", self.resp_tokens, 3, " [B, n, S]")
        b = self.prompt_tokens.shape[0]
        assert_shape(where, "SharedPromptBatch.resp_tokens", self.resp_tokens, (b, None, None), " (B as the prompts)")
        for name in ("resp_mask", "resp_scored"):
            assert_shape(where, f"SharedPromptBatch.{name}", getattr(self, name), self.resp_tokens.shape,
                         " (like resp_tokens)")


@struct.dataclass
class PairBatch:
    """Preference pairs: the policy view x and (Sr-DPO / Sr-IPO) the p (+) x view, each a TokenBatch whose
    sequences are (chosen, rejected) per example, plus optional per-pair floats [B]: margin (RM), p_chosen (soft
    labels) and precomputed reference log-probs (ref_chosen, ref_rejected and their *_aug)."""

    x: TokenBatch | SharedPromptBatch
    aug: TokenBatch | SharedPromptBatch | None = None
    margin: np.ndarray | None = None
    p_chosen: np.ndarray | None = None
    ref_chosen: np.ndarray | None = None
    ref_rejected: np.ndarray | None = None
    ref_chosen_aug: np.ndarray | None = None
    ref_rejected_aug: np.ndarray | None = None


@dataclass(frozen=True)
class RowSpec:
    """One packed row: a shared prefix (never scored) and branches, each (ids, loss mask); each branch is one
    sequence of the row. The first token of a row has no prediction, so it is never scored."""

    prefix: np.ndarray
    branches: Sequence[tuple[np.ndarray, np.ndarray]] = field(default_factory=tuple)


def bucket_scored(counts: Sequence[int] | np.ndarray, cap: int, minimum: int = 8) -> int:
    """Power-of-two bucket of the largest scored count (few distinct compiled shapes), at most `cap`."""
    longest = max(int(np.max(counts)) if len(counts) else 0, minimum)
    return max(1, min(1 << (longest - 1).bit_length(), cap))


def _row_arrays(spec: RowSpec):
    prefix = np.asarray(spec.prefix, np.int32).reshape(-1)
    p = len(prefix)
    toks, segs, pos, tslot, cslot, tseq = [prefix], [np.full(p, PREFIX_SEGMENT, np.int32)], \
        [np.arange(p, dtype=np.int32)], [], [], []
    slot = p
    for k, (ids, loss) in enumerate(spec.branches):
        ids = np.asarray(ids, np.int32).reshape(-1)
        loss = np.asarray(loss).reshape(-1).astype(bool)
        if loss.shape != ids.shape:
            raise DataError(f"pack_rows: branch {k} has {len(ids)} ids but a loss mask of {len(loss)}.")
        n = len(ids)
        toks.append(ids)
        segs.append(np.full(n, PREFIX_SEGMENT + 1 + k, np.int32))
        pos.append(p + np.arange(n, dtype=np.int32))
        here = slot + np.arange(n, dtype=np.int32)
        prev = here - 1
        if n:
            prev[0] = p - 1  # a branch's first token is predicted by the prefix's last token
        keep = loss & (prev >= 0)
        tslot.append(here[keep])
        cslot.append(prev[keep])
        tseq.append(np.full(int(keep.sum()), k, np.int32))
        slot += n
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32)  # noqa: E731
    return cat(toks), cat(segs), cat(pos), cat(tslot), cat(cslot), cat(tseq)


def pack_rows(rows: Sequence[Sequence[RowSpec]], *, pad_id: int = 0, max_length: int | None = None,
              pad_to: PadTo = "bucket", multiple: int = 64, padding_side: Literal["right", "left"] = "right",
              r_max: int | None = None) -> TokenBatch:
    """A TokenBatch of B examples x V rows (every example the same V and every row the same branch count).

    T is the longest row bucketed to `multiple` (or max_length); R the bucketed largest scored count (or
    `r_max`). Left padding shifts slots only: positions and segments are unchanged, so the result is the same.
    """
    if not rows or not rows[0]:
        raise DataError("pack_rows: no rows.")
    v, s = len(rows[0]), len(rows[0][0].branches)
    for i, ex in enumerate(rows):
        if len(ex) != v or any(len(r.branches) != s for r in ex):
            raise DataError(f"pack_rows: example {i} has {len(ex)} rows / branch counts "
                            f"{[len(r.branches) for r in ex]}; every example needs {v} rows of {s} branches.")
    built = [[_row_arrays(r) for r in ex] for ex in rows]
    longest = max(len(r[0]) for ex in built for r in ex)
    t = bucket_length(longest, max_length=max_length, pad_to=pad_to, multiple=multiple)
    r_cap = bucket_scored([len(r[3]) for ex in built for r in ex], cap=t) if r_max is None else r_max
    b = len(rows)
    out = dict(tokens=np.full((b, v, t), pad_id, np.int32), segment_ids=np.zeros((b, v, t), np.int32),
               positions=np.zeros((b, v, t), np.int32), target_slot=np.zeros((b, v, r_cap), np.int32),
               context_slot=np.zeros((b, v, r_cap), np.int32), target_seq=np.full((b, v, r_cap), -1, np.int32))
    for i, ex in enumerate(built):
        for j, (tok, seg, pos, tslot, cslot, tseq) in enumerate(ex):
            n, m = len(tok), len(tslot)
            if m > r_cap:
                raise DataError(f"pack_rows: row ({i}, {j}) scores {m} tokens, more than r_max={r_cap}.")
            shift = t - n if padding_side == "left" else 0
            out["tokens"][i, j, shift:shift + n] = tok
            out["segment_ids"][i, j, shift:shift + n] = seg
            out["positions"][i, j, shift:shift + n] = pos
            out["target_slot"][i, j, :m] = tslot + shift
            out["context_slot"][i, j, :m] = cslot + shift
            out["target_seq"][i, j, :m] = tseq
    return TokenBatch(**out, seqs_per_row=s)


def pack_shared_prompt(examples: Sequence[tuple[np.ndarray, Sequence[tuple[np.ndarray, np.ndarray]]]], *,
                       pad_id: int = 0, max_length: int | None = None, pad_to: PadTo = "bucket",
                       multiple: int = 64) -> SharedPromptBatch:
    """A SharedPromptBatch from (prompt ids, [(response ids, loss mask), ...]) per example: the prompt left-padded
    to P, the responses right-padded to S (each bucketed to `multiple`; with pad_to='max_length' both are
    max_length)."""
    if not examples:
        raise DataError("pack_shared_prompt: no examples.")
    n = len(examples[0][1])
    if any(len(r) != n for _, r in examples):
        raise DataError(f"pack_shared_prompt: every example needs {n} responses.")
    for i, (prompt, _) in enumerate(examples):
        if len(prompt) == 0:
            raise DataError(f"pack_shared_prompt: example {i} has an empty prompt; the cascade layout needs one "
                            "token to predict the first response token from (use layout 'packed').")
    p = bucket_length(max(len(pr) for pr, _ in examples), max_length=max_length, pad_to=pad_to, multiple=multiple)
    s = bucket_length(max(len(ids) for _, rs in examples for ids, _ in rs), max_length=max_length, pad_to=pad_to,
                      multiple=multiple)
    b = len(examples)
    out = dict(prompt_tokens=np.full((b, p), pad_id, np.int32), prompt_mask=np.zeros((b, p), np.int32),
               resp_tokens=np.full((b, n, s), pad_id, np.int32), resp_mask=np.zeros((b, n, s), np.int32),
               resp_scored=np.zeros((b, n, s), np.int32))
    for i, (prompt, resps) in enumerate(examples):
        out["prompt_tokens"][i, p - len(prompt):] = prompt
        out["prompt_mask"][i, p - len(prompt):] = 1
        for j, (ids, loss) in enumerate(resps):
            out["resp_tokens"][i, j, :len(ids)] = ids
            out["resp_mask"][i, j, :len(ids)] = 1
            out["resp_scored"][i, j, :len(ids)] = np.asarray(loss, np.int32)
    return SharedPromptBatch(**out)


def stack_examples(batches: Sequence[TokenBatch]) -> TokenBatch:
    """Concatenate TokenBatches of equal T, R and layout on the example axis."""
    first = batches[0]
    for bt in batches[1:]:
        if bt.tokens.shape[1:] != first.tokens.shape[1:] or bt.target_slot.shape[1:] != first.target_slot.shape[1:] \
                or bt.seqs_per_row != first.seqs_per_row:
            raise DataError("stack_examples: batches differ in rows, length T, scored bucket R or layout.")
    return TokenBatch(**{k: np.concatenate([getattr(bt, k) for bt in batches]) for k in
                         ("tokens", "segment_ids", "positions", "target_slot", "context_slot", "target_seq")},
                      seqs_per_row=first.seqs_per_row)
