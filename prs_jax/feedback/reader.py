"""Label log-probs on the tree engine: one batched, bucketed forward per chunk of queries.

A query continues the context of a tree node (the first `keep` of its context tokens) with more tokens (the
rest of the labeler prompt, ending included) and asks for the log-prob of each label right after them. The
node's context KV is read from the engine's paged pool by block table inside the program, once per
(node, keep), and every row built on it (both candidate orders of a
pair, all responses of one context, multi-token label continuations) runs as a suffix row against it with
cascade attention, as `TreeEngine.expand` does. Only the few positions and tokens needed leave the device.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from prs_jax.data.pairs import Encoder
from prs_jax.feedback.probs import label_log_probs, plan_rows, split_labels
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.executor import READ, ReadGroup, ReadLimits, counting
from prs_jax.tree.tree import Node


@dataclasses.dataclass(frozen=True)
class LabelQuery:
    """Read label log-probs after node `parent`'s first `keep` context tokens followed by `tail`."""

    parent: Node
    keep: int
    tail: list[int]
    labels: list[list[int]]


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """Limits that size each program and the row-length bucket floor (`tree.executor.ReadLimits`).

    Groups of one shape class (rows per group n, prefix bucket P, row bucket T) are packed g to a program, g
    the largest power of two with g * n * (P + T) <= token_budget, g * n <= max_rows and the attention
    activations (8 * heads * n * T * (P + T) bytes per group) <= activation_budget_bytes; a group too big
    for one program is split into sub-groups."""

    max_rows: int = 128
    min_row_bucket: int = 16
    token_budget: int = 65536
    activation_budget_bytes: int = 2 << 30


class LabelReader:
    """Batched label log-probs for queries on one TreeEngine (its model, KV and bucket floors): the engine
    executor's "labels" head."""

    def __init__(self, engine: TreeEngine, config: ReaderConfig = ReaderConfig()):
        self.engine, self.config = engine, config
        self.mesh_context = engine.mesh_context
        self.compilations = 0
        self._run = counting(READ, self)
        self.last_chunks: list[tuple[int, int, int, int]] = []  # (groups, rows per group, P, T) per program

    def log_probs(self, queries: Sequence[LabelQuery], exclusive: bool = True) -> list[np.ndarray]:
        """Log-prob of every label of every query (one array [K] per query, in query order)."""
        engine = self.engine
        for qi, q in enumerate(queries):
            if not 1 <= q.keep <= q.parent.context_len:
                raise ValueError(f"LabelQuery {qi}: keep={q.keep} outside 1..{q.parent.context_len} (node "
                                 f"#{q.parent.id}'s context length).")
            engine.check_context(q.keep + len(q.tail) + max(len(t) for t in q.labels), "label query")
        # one group per (node, keep): its context is read once; each row is [its last kept token, tail, label
        # prefix], read at the position before the label prefix and at each position after it
        groups: dict[tuple[int, int], tuple[Node, int, list]] = {}
        for qi, q in enumerate(queries):
            last = q.parent.context_tokens()[q.keep - 1]
            _, _, rows = groups.setdefault((q.parent.id, q.keep), (q.parent, q.keep, []))
            for ext in plan_rows(q.labels):
                rows.append((qi, ext, [last, *q.tail, *ext]))
        read = [ReadGroup(parent, keep - 1, [toks for _, _, toks in rows],
                          [list(range(len(toks) - len(ext) - 1, len(toks))) for _, ext, toks in rows])
                for parent, keep, rows in groups.values()]
        vocab = sorted({tok for q in queries for lab in q.labels for tok in lab})
        col = {tok: i for i, tok in enumerate(vocab)}
        cfg = self.config
        limits = ReadLimits(max_rows=cfg.max_rows, token_budget=cfg.token_budget,
                            activation_budget_bytes=cfg.activation_budget_bytes, min_row_bucket=cfg.min_row_bucket,
                            min_groups_bucket=engine.config.min_groups_bucket)
        out = engine.read(read, "labels", limits, vocab_ids=vocab, run=self._run)
        self.last_chunks = [(c.g, c.n, c.p, c.t) for c in engine.last_read_chunks]
        table: dict[int, dict[tuple[int, ...], dict[int, float]]] = {i: {} for i in range(len(queries))}
        for (_, _, rows), res in zip(groups.values(), out):
            for (qi, ext, _), lp in zip(rows, res):
                for j in range(len(ext) + 1):
                    table[qi][ext[:j]] = {tok: float(lp[j, c]) for tok, c in col.items()}
        return [label_log_probs(table[i], q.labels, exclusive) for i, q in enumerate(queries)]


def share_prefixes(engine: TreeEngine, groups: Sequence[Sequence[list[int]]], min_tail: int = 0
                   ) -> list[list[tuple[Node, int, list[int]]]]:
    """Put each group's common token prefix on the tree once (one batched `add_prompts`); returns, per
    sequence, (root, tokens of the root it keeps, the rest of the sequence). `min_tail` tokens are left out of
    the shared prefix (fixed text appended on top needs at least one token). A group without a common prefix
    gets one root per sequence. Each root's prompt id hashes its whole group, so what is sampled on it (e.g.
    self-consistency rationales) depends on the group's own tokens, not on which groups share the call."""
    heads: list[list[int]] = []
    ids: list[str] = []
    plan: list[list[tuple[int, int]]] = []  # per group, per sequence: (head index, head length)
    for seqs in groups:
        if any(len(s) <= min_tail for s in seqs):
            raise ValueError(f"share_prefixes: every sequence needs more than {min_tail} token(s).")
        k = min(len(s) for s in seqs) - min_tail
        first = seqs[0]
        for s in seqs[1:]:
            m = 0
            while m < k and s[m] == first[m]:
                m += 1
            k = m
        gid = hashlib.sha256(repr([[int(t) for t in s] for s in seqs]).encode()).hexdigest()[:32]
        if k >= 1:
            heads.append(list(first[:k]))
            ids.append(gid)
            plan.append([(len(heads) - 1, k)] * len(seqs))
        else:
            entry = []
            for j, s in enumerate(seqs):
                heads.append(list(s[:len(s) - min_tail]))
                ids.append(f"{gid}/{j}")
                entry.append((len(heads) - 1, len(s) - min_tail))
            plan.append(entry)
    roots = engine.add_prompts(heads, ids=ids)
    return [[(roots[h], k, list(s[k:])) for (h, k), s in zip(entry, seqs)] for entry, seqs in zip(plan, groups)]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text without special tokens (templates and leads add those)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def raw_lead(tokenizer: Any) -> list[int]:
    """The BOS id the tokenizer puts before raw text by default (Llama yes; GPT-NeoX, Qwen no)."""
    return list(Encoder(tokenizer).raw_lead)


def read_texts(reader: LabelReader, groups: Sequence[Sequence[str]], labels: Sequence[str], *, chat: bool,
               exclusive: bool = True) -> list[list[np.ndarray]]:
    """Label log-probs after each prompt text; the texts of one group share their common token prefix on the
    tree (e.g. both candidate orders of a pair, or all responses to one context)."""
    tok = reader.engine.tokenizer
    lead = [] if chat else raw_lead(tok)
    seqs, labs = [], []
    for texts in groups:
        g_seqs, g_labs = [], []
        for text in texts:
            ctx, ids = split_labels(lambda s: encode_text(tok, s), text, labels)
            g_seqs.append(lead + encode_text(tok, ctx))
            g_labs.append(ids)
        seqs.append(g_seqs)
        labs.append(g_labs)
    shared = share_prefixes(reader.engine, seqs)
    queries = [LabelQuery(root, keep, tail, lab) for sh, ls in zip(shared, labs) for (root, keep, tail), lab
               in zip(sh, ls)]
    flat = reader.log_probs(queries, exclusive)
    out, i = [], 0
    for texts in groups:
        out.append(flat[i:i + len(texts)])
        i += len(texts)
    return out
