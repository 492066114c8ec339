"""The tree-expansion engine: batched, jit-compiled prefill and decode over a tree with shared prefixes.

KV lives in one pool of fixed-size pages for all layers ([L, 2, pages, page_size, kv_heads, head_dim],
`tree.pages` keeps the free list and reference counts). A node owns the pages of its own tokens and its block
table references its ancestors' pages; a child whose first position falls inside its parent's last page gets a
copy of that page (copy on write). To build on a node X (append fixed text, or expand children) a program gets
X's block table, reads X's context from the pool inside the program (one gather) and runs all new rows
against it with cascade attention: siblings share the prefix, each row has its own suffix. The same program
writes the new tokens' KV into the pool (donated): nothing is copied per row or per segment from Python.
`release` drops a node's references; pages nothing references return to the pool.

Invariant: a segment's KV covers all its tokens or all but the last. The context's last token is always fed
again as the first suffix token of what is built on it (that gives the logits the first child token is drawn
from, with no logits stored); the KV it produces completes the parent's segment.

Shapes are bucketed (groups, rows per group, prefix length, new tokens) so a long run compiles a handful of
programs; `compilations` counts them.

Randomness is position-stable: a child's key is the seed's key folded with a hash of the child's path, which
is (its root's digest, then (branch, child) for each step down from the root). A root's digest hashes its
prompt id (given to `add_prompts`, by default none) and its tokens, plus an occurrence count when the same
(id, tokens) is added again to one engine. `branch` counts the child-making calls (`expand`, `append`) on a
parent. Node ids (creation order) never enter, so batch size, batching order, the order of parents in a call,
the number of processes and resuming a run never change a tree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.kernels.cascade import QUERY_BLOCK, use_pallas_default
from prs_jax.kernels.paged import gather_pages
from prs_jax.models.layers import CascadeCache
from prs_jax.models.sharding import MeshContext, constrain, mesh_context_of, use_rules
from prs_jax.models.tokenizer import encode_chat
from prs_jax.models.transformer import CausalLM
from prs_jax.tree.executor import (READ, Head, ReadGroup, ReadLimits, _stack_layers, bucket, counting, length_bucket,
                                   forward_rows, read_rows)
from prs_jax.tree.pages import PageAllocator, PlanBuilder, apply_write_plan
from prs_jax.tree.sampling import SamplingParams, sample
from prs_jax.tree.tree import Node, Tree


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine settings: attention implementation, prefix sharing, bucket floors."""

    attention_impl: Literal["auto", "reference", "pallas"] = "auto"
    share_prefix: bool | Literal["auto"] = True  # True: a parent's children attend its prefix once per group
    # (cascade); False: every child attends its own gathered copy of the prefix (the no-sharing baseline); "auto":
    # per parent, share when it has >= 2 children and a prefix of >= share_min_ratio x max_new_tokens tokens, else
    # copy (a short prompt under a long suffix: the cascade's second attention part costs more than it saves;
    # benchmarks/bench_real.py R2). Decided from the parent's own lengths, so batching never changes it.
    share_min_ratio: float = 0.5
    min_prefix_bucket: int = 16
    min_new_tokens_bucket: int = 16
    min_groups_bucket: int = 1
    min_extend_bucket: int = 8  # new tokens per prefill call
    fine_extend_buckets: bool = True  # prefill lengths in half-octave buckets (2^k or 3 * 2^(k-1):
    # executor.length_bucket), else powers of two; prefill costs in proportion to the padded length (16 chat
    # prompts feeding 38-45 tokens: 48 instead of 64 per row), for about twice the compiled prefill programs
    min_rows_bucket: int = 0  # > 0: children per parent padded to a power of two >= this (fewer compiled
    # programs when many different n are used, e.g. best-of-N sweeps; padded rows are inactive)
    group_tile: int = 0  # > 0: batch-invariant shapes. Every program runs exactly this many groups, and only
    # groups whose own lengths fall in the same buckets share a program; a call with more is split. XLA's
    # float results depend on the shapes a row is computed in (not on the row's position): with fixed shapes
    # the log-probs and KV of a node are bitwise the same whatever else was batched with it. 0: programs are
    # sized by the call (fewer, fuller programs; floats may differ in the last bits with the batching).
    token_budget: int = 1 << 16  # group_tile = 0: a program holds at most this many padded tokens (groups x
    # (prefix + rows x new tokens), bucketed); a call over more is split into several programs (longest-first
    # items grouped by length), so memory is bounded by the budget, not by how many prompts a call gets. One
    # group larger than the budget runs alone. 0: unbounded. With group_tile > 0 the tile fixes the shapes.
    page_size: int = 16  # tokens per page of the KV pool
    pool_pages: int = 16384  # most pages the KV pool may hold (all layers; bytes: pages x page_size x layers
    # x 2 x kv_heads x head_dim x dtype size); needing more raises an error that names this key
    initial_pool_pages: int = 1024  # the pool starts this big and grows 4x at a time as needed up to
    # pool_pages; each size compiles its own programs (set it to pool_pages for one fixed pool, no growth)
    activation_budget_bytes: int = 2 << 30  # group_tile = 0: a prefill program's attention scores (float32
    # scores and probabilities, 8 x heads x min(T, 512) x (prefix + T) bytes per group: queries run in blocks
    # of 512) stay within this; 0: unbounded
    outer_level: bool | Literal["auto"] = "auto"  # multi-level cascade in decode programs: groups of one
    # program whose prefixes start with the same full pages (e.g. a prompt's drafts, each a group of its
    # refinements) read those pages once, as an outer level shared by up to F groups, then their own pages,
    # then each row's suffix (kernels/cascade.py Outer). "auto": where it cuts the prefix slots a program reads
    # by >= outer_min_saving and group_tile = 0 (which groups share a program depends on the batching, and
    # splitting a softmax into more parts changes floats in the last bits); True: wherever groups share
    # >= outer_min_tokens (group_tile = 0 only); False: two levels (group prefix, row suffix). Shared tiles only:
    # copied children (share_prefix False, or "auto" copying a parent) each read their own prefix copy.
    outer_min_tokens: int = 64
    outer_min_saving: float = 0.25

    def __post_init__(self) -> None:
        for name in ("min_prefix_bucket", "min_new_tokens_bucket", "min_groups_bucket", "min_extend_bucket",
                     "page_size", "pool_pages", "initial_pool_pages"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("min_rows_bucket", "group_tile", "token_budget", "activation_budget_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if self.share_prefix not in (True, False, "auto"):
            raise ValueError(f"EngineConfig.share_prefix must be true, false or 'auto', got {self.share_prefix!r}.")
        if self.share_min_ratio < 0:
            raise ValueError(f"EngineConfig.share_min_ratio must be >= 0, got {self.share_min_ratio}.")
        if not (isinstance(self.outer_level, bool) or self.outer_level == "auto"):  # 0 / 1 are not booleans here
            raise ValueError(f"EngineConfig.outer_level must be true, false or 'auto', got {self.outer_level!r}.")
        if self.outer_level is True and self.group_tile > 0:
            raise ValueError("EngineConfig.outer_level=true needs group_tile=0: with group_tile > 0 every row must be "
                             "bitwise the same whatever it is batched with, and which groups share an outer level "
                             "depends on the batching. Use outer_level='auto' (off under group_tile) or false.")
        if self.outer_min_tokens < 1 or not 0 <= self.outer_min_saving < 1:
            raise ValueError(f"EngineConfig: outer_min_tokens must be >= 1 and outer_min_saving in [0, 1), got "
                             f"{self.outer_min_tokens} and {self.outer_min_saving}.")


# How programs are shaped (length buckets): XLA's float results depend on a row's padded shape, so a restartable
# output (prs-jax generate) stamps this and refuses to resume rows written under another scheme. Bump it with any
# change to the bucketing of prefill, reads or decode.
SHAPE_SCHEME = "prefill-half-octave-v1"

# bucket floors of the engines that serve many calls of varied shapes (the studies, the world's skill gates):
# few compiled programs across prompt lengths, widths and refinement rounds
STUDY_FLOORS: dict[str, int] = {"min_prefix_bucket": 64, "min_new_tokens_bucket": 32, "min_extend_bucket": 32}


def study_engine_config(**options: Any) -> EngineConfig:
    """An EngineConfig with STUDY_FLOORS plus `options` (attention_impl, min_groups_bucket, min_rows_bucket, ...)."""
    return EngineConfig(**{**STUDY_FLOORS, **options})


@dataclasses.dataclass(frozen=True)
class Stop:
    """When a generated segment ends: EOS token ids (checked in the loop) and stop strings (on decoded text)."""

    eos_ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: Any, default_eos: tuple[int, ...]) -> "Stop":
        """Accept None, a Stop, a string, or a list of strings (stop strings; EOS always applies)."""
        if spec is None:
            return cls(eos_ids=default_eos)
        if isinstance(spec, Stop):
            return spec  # taken as given: Stop(eos_ids=()) decodes to the token budget
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, (list, tuple)) and all(isinstance(s, str) and s for s in spec):
            return cls(eos_ids=default_eos, strings=tuple(spec))
        raise ValueError(f"stop: expected None, a non-empty string, a list of non-empty strings or a Stop; "
                         f"got {spec!r}")


def path_words(path: tuple) -> np.ndarray:
    """Four uint32 words of a stable hash (sha256 of the repr) of a node's key path."""
    return np.frombuffer(hashlib.sha256(repr(path).encode()).digest()[:16], dtype="<u4").astype(np.uint32)


@jax.jit
def path_keys(key: jax.Array, words: jax.Array) -> jax.Array:
    """One key per row: `key` folded with the row's four words [R, 4] (elementwise: rows never interact)."""

    def one(w):
        k = key
        for i in range(w.shape[0]):
            k = jax.random.fold_in(k, w[i])
        return k

    return jax.vmap(one)(words)


def _extend_fn(state, pool, table, prefix_len, tokens, mask, plan, *, graphdef, prefix_size, impl, rules=None):
    """Prefill rows after their group's prefix (read from the pool by block table) and write their KV into the
    pool (donated) as `plan` says, in one program."""
    with use_rules(rules):
        prefix_kv, prefix_mask = gather_pages(pool, table, prefix_len, prefix_size)
        _, suffix = forward_rows(nnx.merge(graphdef, state), prefix_kv, prefix_mask, tokens, mask, rows_per_group=1,
                                 impl=impl)
        return constrain(apply_write_plan(pool, suffix, plan), POOL_AXES)


def _decode_fn(state, pool, table, prefix_len, first_tok, row_keys, active, max_new, context_seen, plan,
               outer=None, *, graphdef, rows_per_group, prefix_size, buf, params, eos_ids, pad_id, impl,
               outer_size=0, outer_fanout=0, rules=None):
    """The whole expansion in one program: the prefixes are read from the pool by block table, cascade decode
    runs in a while_loop that stops when every row is done, and the rows' KV is written into the pool
    (donated) as `plan` says. `outer`: (table [S, nb], lengths [S], group -> outer [G], slot [G]) of the outer
    cascade level (read once per outer prefix), or None."""
    with use_rules(rules):
        prefix_kv, prefix_mask = gather_pages(pool, table, prefix_len, prefix_size)
        outer_kv = None
        if outer is not None:
            o_table, o_len, o_group, o_slot = outer
            okv, omask = gather_pages(pool, o_table, o_len, outer_size)
            ok, ov = _stack_layers(okv)
            outer_kv = (ok, ov, omask, o_group, o_slot, outer_fanout)
        out_tok, out_lp, lengths, hit_eos, suffix = _decode_body(
            state, prefix_kv, prefix_mask, first_tok, row_keys, active, max_new, context_seen, graphdef=graphdef,
            rows_per_group=rows_per_group, buf=buf, params=params, eos_ids=eos_ids, pad_id=pad_id, impl=impl,
            outer=outer_kv)
        return out_tok, out_lp, lengths, hit_eos, constrain(apply_write_plan(pool, suffix, plan), POOL_AXES)


def _gather_fn(pool, table, prefix_len, *, size, rules=None):
    with use_rules(rules):
        return gather_pages(pool, table, prefix_len, size)


def _new_pool_fn(*, shape, dtype, rules=None):
    with use_rules(rules):
        return constrain(jnp.zeros(shape, dtype), POOL_AXES)


def _grow_pool_fn(pool, *, extra, rules=None):
    with use_rules(rules):
        pad = jnp.zeros(pool.shape[:2] + (extra,) + pool.shape[3:], pool.dtype)
        return constrain(jnp.concatenate([pool, pad], axis=2), POOL_AXES)


def _decode_body(state, prefix_kv, prefix_mask, first_tok, row_keys, active, max_new, context_seen,
                 *, graphdef, rows_per_group, buf, params, eos_ids, pad_id, impl, outer=None):
    model = nnx.merge(graphdef, state)
    r = first_tok.shape[0]
    pk, pv = _stack_layers(prefix_kv)
    cache = CascadeCache.init(model.config, pk, pv, prefix_mask, rows_per_group, buf, impl, outer=outer)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    vocab = model.config.vocab_size
    counts = jnp.zeros((r, vocab), jnp.int32) if params.needs_counts else None
    seen = None
    if context_seen is not None:
        seen = jnp.repeat(context_seen, rows_per_group, axis=0)

    def cond(carry):
        step, _, _, done, *_ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, cur, cache, done, lengths, out_tok, out_lp, counts = carry
        logits, cache = model(cur[:, None], cache=cache)
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        u = jax.vmap(jax.random.uniform)(keys)
        tok, lp = sample(logits[:, 0], u, params, counts, seen)
        tok = jnp.where(done, pad_id, tok)
        lp = jnp.where(done, 0.0, lp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
        out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)
        if counts is not None:
            counts = counts.at[jnp.arange(r), tok].add((~done).astype(jnp.int32))
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1)
        return step + 1, tok, cache, done, lengths, out_tok, out_lp, counts

    init = (jnp.int32(0), first_tok, cache, ~active, jnp.zeros((r,), jnp.int32),
            jnp.full((r, buf), pad_id, jnp.int32), jnp.zeros((r, buf), jnp.float32), counts)
    _, _, cache, done, lengths, out_tok, out_lp, _ = jax.lax.while_loop(cond, body, init)
    suffix = jnp.stack([jnp.stack([k, v]) for k, v in zip(cache.suffix_k, cache.suffix_v)])
    hit_eos = jnp.any(jnp.take_along_axis(out_tok, jnp.maximum(lengths - 1, 0)[:, None], 1) == eos[None, :],
                      axis=-1) & (lengths > 0)
    return out_tok, out_lp, lengths, hit_eos, suffix


# Compiled programs are shared by every engine (and scorer) in the process: a new engine on the same model
# shapes reuses them. Engines count the programs compiled during their own calls.
# The logical-axis rules are a static argument: a program cached for one engine never carries another's rules.
EXTEND = jax.jit(_extend_fn, static_argnames=("graphdef", "prefix_size", "impl", "rules"), donate_argnums=(1,))
DECODE = jax.jit(_decode_fn, static_argnames=("graphdef", "rows_per_group", "prefix_size", "buf", "params", "eos_ids",
                                              "pad_id", "impl", "outer_size", "outer_fanout", "rules"),
                 donate_argnums=(1,))
GATHER = jax.jit(_gather_fn, static_argnames=("size", "rules"))
NEW_POOL = jax.jit(_new_pool_fn, static_argnames=("shape", "dtype", "rules"))
GROW_POOL = jax.jit(_grow_pool_fn, static_argnames=("extra", "rules"))  # a new, larger buffer
POOL_AXES = (None, None, None, None, "kv_heads", None)  # pool [L, 2, N, ps, K, D]: heads on tensor


class TreeEngine:
    """Builds and expands sampling trees with a causal LM (and optionally its tokenizer for text I/O)."""

    def __init__(self, model: CausalLM, tokenizer: Any = None, *, seed: int = 0,
                 config: EngineConfig = EngineConfig(), eos_ids: Sequence[int] | None = None,
                 pad_id: int | None = None, mesh_context: MeshContext | None = None):
        self.model = model
        # programs run inside the mesh the model's parameters live on (given, or found on them: default rules)
        self.mesh_context = mesh_context if mesh_context is not None else mesh_context_of(model)
        self.cfg = model.config
        self.tokenizer = tokenizer
        self.config = config
        self.tree = Tree()
        self.compilations = 0
        self._graphdef, self._state = nnx.split(model)
        self._dtype = model.model.embed_tokens.embedding[...].dtype
        self._key = jax.random.key(seed)
        self._occurrences: dict[str, int] = {}  # root digest base -> roots added with it so far
        self.last_decode_stats: dict[str, int] = {}
        impl = config.attention_impl
        self._impl = ("pallas" if use_pallas_default() else "reference") if impl == "auto" else impl
        if eos_ids is None:
            eos_ids = []
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos_ids.append(tokenizer.eos_token_id)
            cfg_eos = self.cfg.eos_token_id
            eos_ids.extend(cfg_eos if isinstance(cfg_eos, tuple) else ([cfg_eos] if cfg_eos is not None else []))
        self.eos_ids = tuple(sorted(set(int(e) for e in eos_ids)))
        if pad_id is None:
            pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (
                self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0)
        self.pad_id = int(pad_id)
        self._extend_jit = counting(EXTEND, self)
        self._decode_jit = counting(DECODE, self)
        self._gather_jit = counting(GATHER, self)
        self._read_jit = counting(READ, self)
        self.last_read_chunks: list[Any] = []
        c = self.cfg
        ps = config.page_size
        itemsize = jnp.dtype(self._dtype).itemsize
        page_bytes = c.num_hidden_layers * 2 * ps * c.num_key_value_heads * c.head_dim * itemsize
        self.pages = PageAllocator(config.pool_pages, config.initial_pool_pages, ps, page_bytes)
        self._pool: jax.Array | None = None  # [L, 2, N, page_size, K, D], created at the first call

    def model_split(self) -> tuple[Any, Any]:
        """(graph definition, state) of the engine's model, as its programs take them."""
        return self._graphdef, self._state

    @property
    def attention_impl(self) -> str:
        """The attention implementation the engine's programs use ("reference" or "pallas")."""
        return self._impl

    def read(self, groups: Sequence[ReadGroup], head: Head, limits: ReadLimits = ReadLimits(), *,
             vocab_ids: Sequence[int] = (), run: Any = None) -> list[list[Any]]:
        """Read `head` ("reward" or "labels") on rows built on tree nodes, batched within `limits`
        (`tree.executor.read_rows`); outputs per group per row. `last_read_chunks` lists the programs run."""
        out, self.last_read_chunks = read_rows(self, groups, head, limits, vocab_ids=vocab_ids,
                                               run=run if run is not None else self._read_jit)
        return out

    def clear(self) -> None:
        """Release every node's KV and start an empty tree, as a new engine with the same seed would (the same
        prompts and ids draw the same keys again); the compiled programs and the pool stay."""
        self.release(list(self.tree))
        self.tree = Tree()
        self._occurrences = {}

    # ----------------------------------------------------------------------------------------- KV pool
    def _in_mesh(self, fn, *args, **kwargs):
        ctx = self.mesh_context
        if ctx is None:
            return fn(*args, **kwargs)
        with ctx.activate():
            return fn(*args, rules=ctx.frozen_rules, **kwargs)

    def _reserve(self, pages: int, what: str) -> None:
        """Make sure `pages` more pages can be allocated: grow the device pool if needed (or raise)."""
        size = self.pages.need(pages, what)
        if self._pool is None:
            c = self.cfg
            shape = (c.num_hidden_layers, 2, size, self.config.page_size, c.num_key_value_heads, c.head_dim)
            self._pool = self._in_mesh(NEW_POOL, shape=shape, dtype=jnp.dtype(self._dtype))
        elif size > self._pool.shape[2]:
            self._pool = self._in_mesh(GROW_POOL, self._pool, extra=size - self._pool.shape[2])
        self.pages.grow(size)

    def kv_pool(self) -> jax.Array:
        """The device KV pool [L, 2, pages, page_size, kv_heads, head_dim] (read it with `prefix_tables`)."""
        self._reserve(0, "kv_pool")
        return self._pool

    def kv_stats(self) -> dict[str, int]:
        """KV pool accounting: page size and bytes, pages (and bytes) in use, free, peak, allocated, maximum."""
        return self.pages.stats().as_dict()

    def _check_kv(self, node: Node, need: int) -> None:
        """Raise unless `node`'s block table holds KV for its first `need` context tokens."""
        if node.block_table is None:
            raise RuntimeError(f"tree engine: node #{node.id} has no KV (released with TreeEngine.release, or not "
                               "built through this engine); keep the KV of nodes that will be built on.")
        have = node.context_len - len(node.tokens) + node.kv_valid
        if have < need:
            raise RuntimeError(f"tree engine: node #{node.id} holds KV for {have} of the {need} context tokens "
                               "needed below it (segments must be built through the engine).")

    def prefix_tables(self, parents: Sequence[Node | None], lengths: Sequence[int], groups: int
                      ) -> tuple[np.ndarray, np.ndarray, int]:
        """Block tables [G, nb] and lengths [G] of the first lengths[g] context tokens of parents[g], and the
        padded prefix length P (bucketed) a program reads them as; nb = ceil(P / page_size)."""
        ps = self.config.page_size
        size = bucket(max(lengths, default=0), self.config.min_prefix_bucket)
        table = np.zeros((groups, -(-size // ps)), np.int32)
        length = np.zeros((groups,), np.int32)
        for g, (node, n) in enumerate(zip(parents, lengths)):
            if node is None or n <= 0:
                continue
            self._check_kv(node, n)
            pages = node.block_table[:-(-n // ps)]
            table[g, :len(pages)] = pages
            length[g] = n
        return table, length, size

    def outer_tables(self, parents: Sequence[Node], lengths: Sequence[int], groups: int
                     ) -> tuple[tuple[np.ndarray, ...], int, int, np.ndarray, np.ndarray, int] | None:
        """The multi-level split of a decode program's groups (EngineConfig.outer_level), or None to run two
        levels. Groups whose first lengths[g] context tokens start with the same full pages (at least
        outer_min_tokens) form an outer prefix: (outer table [S, nb0], outer lengths [S], group -> outer [G]
        (S: none), slot [G]), the outer padded length P0 and fanout F, and each group's own block table [G, nb1]
        and lengths [G] past its outer prefix (prefix_tables' layout)."""
        cfg = self.config
        if cfg.outer_level is False or (cfg.outer_level == "auto" and cfg.group_tile > 0) or len(parents) < 2:
            return None
        ps = cfg.page_size
        for node, n in zip(parents, lengths):
            if n > 0:
                self._check_kv(node, n)
        pages = [list(node.block_table[:-(-n // ps)]) if n > 0 else [] for node, n in zip(parents, lengths)]
        clusters: dict[int, list[int]] = {}
        for g, (pg, n) in enumerate(zip(pages, lengths)):
            if n // ps >= 1:
                clusters.setdefault(pg[0], []).append(g)
        def split(members: list[int], k: int) -> list[tuple[list[int], int]]:
            """members share their first k pages: extend k while they agree; too short an agreement (a short
            prompt over long drafts) splits them by the page where they part, and each part goes on."""
            full = min(lengths[g] // ps for g in members)
            while k < full and all(pages[g][k] == pages[members[0]][k] for g in members):
                k += 1
            if k * ps >= cfg.outer_min_tokens:
                return [(members, k)]
            parts: dict[int, list[int]] = {}
            for g in members:
                if lengths[g] // ps > k:
                    parts.setdefault(pages[g][k], []).append(g)
            return [o for part in parts.values() if len(part) >= 2 for o in split(part, k + 1)]

        outers = [o for members in clusters.values() if len(members) >= 2 for o in split(members, 1)]
        if not outers:
            return None
        s_n = bucket(len(outers))
        fanout = bucket(max(len(m) for m, _ in outers))
        size0 = bucket(max(k for _, k in outers) * ps, cfg.min_prefix_bucket)
        o_table = np.zeros((s_n, -(-size0 // ps)), np.int32)
        o_len = np.zeros((s_n,), np.int32)
        o_group = np.full((groups,), s_n, np.int32)
        o_slot = np.zeros((groups,), np.int32)
        skip = [0] * len(parents)
        for si, (members, k) in enumerate(outers):
            o_table[si, :k] = pages[members[0]][:k]
            o_len[si] = k * ps
            for j, g in enumerate(members):
                o_group[g], o_slot[g], skip[g] = si, j, k
        rest = [n - k * ps for n, k in zip(lengths, skip)]
        size = bucket(max(rest, default=0), cfg.min_prefix_bucket)
        old_size = bucket(max(lengths, default=0), cfg.min_prefix_bucket)
        # "auto": the prefix slots read must drop by outer_min_saving, and the prefix attention's work (query rows
        # x slots; the outer level computes S x F query groups, empty fanout slots included) must not grow
        if cfg.outer_level == "auto" and (
                groups * size + s_n * size0 > (1 - cfg.outer_min_saving) * groups * old_size
                or groups * size + s_n * fanout * size0 > groups * old_size):
            return None
        table = np.zeros((groups, -(-size // ps)), np.int32)
        length = np.zeros((groups,), np.int32)
        for g, n in enumerate(lengths):
            if n <= 0:
                continue
            own = pages[g][skip[g]:]
            table[g, :len(own)] = own
            length[g] = rest[g]
        return (o_table, o_len, o_group, o_slot), size0, fanout, table, length, size

    def prefix_batch(self, parents: Sequence[Node | None], lengths: Sequence[int], groups: int
                     ) -> tuple[jax.Array, jax.Array]:
        """Prefix KV [L, 2, G, K, P, D] holding the first lengths[g] context tokens of parents[g], and its mask
        [G, P]: one gather from the pool by block table (slots past a length are zero)."""
        table, length, size = self.prefix_tables(parents, lengths, groups)
        self._reserve(0, "prefix_batch")
        return self._gather_jit(self._pool, jnp.asarray(table), jnp.asarray(length), size=size)

    def _new_table(self, node: Node, parent: Node | None, own: Sequence[int]) -> None:
        """Give `node` its block table: the parent's pages before its first position, then its own pages."""
        start = 0 if parent is None else parent.context_len
        shared = () if parent is None else tuple(parent.block_table[:start // self.config.page_size])
        self.pages.incref(shared)
        node.block_table = shared + tuple(int(p) for p in own)
        node.kv_valid = 0

    def _plan_row(self, plan: PlanBuilder, row: int, parent: Node | None, start: int, own: Sequence[int],
                  first_slot: int, count: int, completer: dict[int, int], item: int,
                  pending: dict[int, list[int]]) -> None:
        """Plan one row's writes: parent completion (if this item completes it), copy on write of the parent's
        partial last page, and `count` slots from `first_slot` on at context positions start, start + 1, ..."""
        ps = self.config.page_size
        if parent is not None:
            needs = parent.kv_valid == len(parent.tokens) - 1
            if needs and completer.get(parent.id) == item:
                last = start - 1
                plan.complete(row, last, [parent.block_table[last // ps]] + pending.pop(parent.id, []))
            if start % ps and own:
                plan.copy(row, parent.block_table[start // ps], own[0])
                if needs and completer.get(parent.id) not in plan.items:
                    pending.setdefault(parent.id, []).append(own[0])  # completed by a later program
        plan.write(row, first_slot, count, start, own)

    def release(self, nodes: Sequence[Node]) -> None:
        """Drop the KV of nodes that will not be built on (their text and tokens stay): their block tables'
        page references go; pages nothing references any more return to the pool."""
        for n in nodes:
            if n.block_table is not None:
                self.pages.decref(n.block_table)
            n.block_table, n.kv_valid = None, 0

    def release_tree(self, roots: Sequence[Node]) -> None:
        """Release `roots` and every node below them: a measured tree nothing will be built on."""
        self.release_descendants(roots)
        self.release(roots)

    def release_descendants(self, nodes: Sequence[Node]) -> None:
        """Release every node below `nodes` (not the nodes themselves): for a caller that builds several
        independent trees on the same parents (e.g. PRS at several budgets on one set of drafts)."""
        stack = [c for n in nodes for c in n.children]
        seen: list[Node] = []
        while stack:
            node = stack.pop()
            seen.append(node)
            stack.extend(node.children)
        self.release(seen)

    def check_context(self, total: int, what: str) -> None:
        """Raise a clear error when `total` tokens of context would exceed the model's positions."""
        limit = self.cfg.max_position_embeddings
        if total > limit:
            raise ValueError(f"{what}: context of {total} tokens exceeds the model's window of {limit} "
                             "(config.json max_position_embeddings).")

    # ----------------------------------------------------------------------------------------- public API
    def encode(self, item: str | Sequence[int] | Sequence[dict[str, str]], *, special_tokens: bool = True
               ) -> list[int]:
        """Token ids of a text, a token list, or a chat message list (rendered with the chat template)."""
        if isinstance(item, str):
            if self.tokenizer is None:
                raise ValueError("text given but the engine has no tokenizer; pass token ids or a tokenizer.")
            return list(self.tokenizer(item, add_special_tokens=special_tokens)["input_ids"])
        items = list(item)
        if items and isinstance(items[0], dict):
            if self.tokenizer is None:
                raise ValueError("chat messages given but the engine has no tokenizer.")
            return encode_chat(self.tokenizer, items)
        return [int(t) for t in items]

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated tokens (special tokens dropped); empty without a tokenizer."""
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _tiles(self, keys: Sequence[Any], todo: Sequence[int], costs: Sequence[int] | None = None,
               act: Sequence[int] | None = None) -> list[tuple[list[int], int]]:
        """Split items `todo` into programs: (item indices, groups of the program).

        group_tile = 0: programs of bucketed group counts, each within `token_budget` padded tokens (`costs[i]`:
        item i's tokens as one group; items sorted by cost so similar lengths share a program). group_tile > 0:
        items grouped by their own bucket key (`keys[i]`), each group cut into programs of exactly group_tile
        groups, so no item's shapes depend on the other items of the call."""
        todo = list(todo)
        if not todo:
            return []
        tile = self.config.group_tile
        if tile <= 0:
            floor, budget = self.config.min_groups_bucket, self.config.token_budget
            if budget <= 0 or costs is None:
                return [(todo, bucket(len(todo), floor))]

            acts = act if act is not None else [0] * len(costs)
            act_budget = self.config.activation_budget_bytes or float("inf")

            def groups(n: int, cost: int, a: int) -> int:
                # the floor pads a program only as far as the budgets allow (a floor above what the budget
                # holds would otherwise pad every one-item program to the floor)
                padded = bucket(n, floor)
                return padded if padded * cost <= budget and padded * a <= act_budget else bucket(n)

            programs: list[list[int]] = [[]]
            peak = 0  # the largest activation of an item in the current program
            for i in sorted(todo, key=lambda j: -costs[j]):  # longest first: the first item sets the program's cost
                cur = programs[-1]
                a = max(peak, acts[i])
                n = groups(len(cur) + 1, costs[cur[0]], a) if cur else 1
                if cur and (n * costs[cur[0]] > budget or n * a > act_budget):
                    programs.append([i])
                    peak = acts[i]
                else:
                    cur.append(i)
                    peak = a
            return [(sorted(p), groups(len(p), costs[p[0]], max(acts[i] for i in p))) for p in programs]
        parts: dict[Any, list[int]] = {}
        for i in todo:
            parts.setdefault(keys[i], []).append(i)
        return [(ids[s:s + tile], tile) for key in sorted(parts) for ids in [parts[key]]
                for s in range(0, len(ids), tile)]

    def _extend(self, parents: Sequence[Node | None], nodes: Sequence[Node], prefix_lengths: Sequence[int],
                new_tokens: Sequence[list[int]], first_slot: int, what: str) -> None:
        """Run `new_tokens[i]` after the first `prefix_lengths[i]` context tokens of `parents[i]`, batched (one
        program, or one per tile with `group_tile`), and store node i's KV in the pool: slots first_slot.. of
        its row are its tokens (all but its last); with first_slot = 1, slot 0 is the parent's last token and
        completes the parent's KV (from the parent's first item in the call)."""
        ps = self.config.page_size
        starts = [0 if p is None else p.context_len for p in parents]
        counts = [self.pages.pages_for(s, s + len(n.tokens)) for s, n in zip(starts, nodes)]
        for p in parents:
            if p is not None:
                self._check_kv(p, p.context_len - 1)
        self._reserve(sum(counts), what)
        owns = [self.pages.alloc(c, what) for c in counts]
        for n, p, own in zip(nodes, parents, owns):
            self._new_table(n, p, own)
        completer: dict[int, int] = {}
        for i, p in enumerate(parents):
            if p is not None and new_tokens[i] and p.kv_valid == len(p.tokens) - 1:
                completer.setdefault(p.id, i)
        pending: dict[int, list[int]] = {}
        fine = self.config.fine_extend_buckets
        keys = [(bucket(length, self.config.min_prefix_bucket),
                 length_bucket(len(t), self.config.min_extend_bucket, fine))
                for length, t in zip(prefix_lengths, new_tokens)]
        costs = [a + b for a, b in keys]
        heads = self.cfg.num_attention_heads
        acts = [8 * heads * min(b, QUERY_BLOCK) * (a + b) for a, b in keys]  # float32 scores + probs, one row
        for todo, groups in self._tiles(keys, [i for i, t in enumerate(new_tokens) if t], costs, acts):
            table, length, size = self.prefix_tables([parents[i] for i in todo], [prefix_lengths[i] for i in todo],
                                                     groups)
            t_bucket = length_bucket(max(len(new_tokens[i]) for i in todo), self.config.min_extend_bucket, fine)
            tokens = np.full((groups, t_bucket), self.pad_id, np.int32)
            mask = np.zeros((groups, t_bucket), bool)
            plan = PlanBuilder(groups, t_bucket, self._pool.shape[2], ps)
            plan.items = set(todo)
            for g, i in enumerate(todo):
                tokens[g, :len(new_tokens[i])] = new_tokens[i]
                mask[g, :len(new_tokens[i])] = True
                self._plan_row(plan, g, parents[i], starts[i], owns[i], first_slot, len(nodes[i].tokens) - 1,
                               completer, i, pending)
            self._pool = self._extend_jit(self._state, self._pool, jnp.asarray(table), jnp.asarray(length),
                                          jnp.asarray(tokens), jnp.asarray(mask), plan.build(),
                                          graphdef=self._graphdef, prefix_size=size, impl=self._impl)
            for i in todo:
                p = parents[i]
                if p is not None and completer.get(p.id) == i:
                    p.kv_valid = len(p.tokens)
        for n in nodes:
            n.kv_valid = len(n.tokens) - 1

    def root_path(self, prompt_id: str | None, tokens: Sequence[int]) -> tuple:
        """The key path of a new root: a digest of (prompt id, tokens, how often this engine saw both)."""
        base = hashlib.sha256(repr((None if prompt_id is None else str(prompt_id),
                                    tuple(int(t) for t in tokens))).encode()).hexdigest()
        k = self._occurrences.get(base, 0)
        self._occurrences[base] = k + 1
        return (base if k == 0 else f"{base}#{k}",)

    @staticmethod
    def _branch(parent: Node) -> int:
        """Index of a new child-making call on `parent` (expand or append), counted per parent."""
        b = parent.branches
        parent.branches = b + 1
        return b

    def add_prompts(self, prompts: Sequence[str | Sequence[int] | Sequence[dict[str, str]]],
                    metadata: Sequence[dict[str, Any]] | None = None,
                    ids: Sequence[str | None] | None = None) -> list[Node]:
        """Create root nodes (text, token ids, or chat messages) and prefill all but their last token.

        `ids` (optional, one per prompt) are stable prompt ids: with the prompt's tokens they key the
        randomness of everything sampled below the root (see the module docstring). Give them whenever the
        same prompt text may appear under different ids (e.g. `PromptItem.id`)."""
        if ids is not None and len(ids) != len(prompts):
            raise ValueError(f"add_prompts: {len(prompts)} prompts but {len(ids)} ids.")
        roots, encoded = [], []
        for i, p in enumerate(prompts):
            toks = self.encode(p)
            if not toks:
                raise ValueError(f"add_prompts: prompt {i} is empty (no tokens); every prompt needs text.")
            self.check_context(len(toks) + 1, f"add_prompts: prompt {i}")
            encoded.append(toks)
        self.pages.need(sum(self.pages.pages_for(0, len(t)) for t in encoded), "add_prompts")  # before any node
        for i, (p, toks) in enumerate(zip(prompts, encoded)):
            text = p if isinstance(p, str) else (self.tokenizer.decode(toks) if self.tokenizer else "")
            roots.append(self.tree.add("prompt", toks, None, text=text,
                                       metadata=dict(metadata[i]) if metadata else {},
                                       key_path=self.root_path(ids[i] if ids is not None else None, toks)))
        self._extend([None] * len(roots), roots, [0] * len(roots), [r.tokens[:-1] for r in roots], 0,
                     "add_prompts")
        return roots

    def append(self, parents: Sequence[Node], texts: Sequence[str | Sequence[int]],
               metadata: Sequence[dict[str, Any]] | None = None) -> list[Node]:
        """Append a fixed-text node to each parent, prefilled on top of the parent's context (not recomputed)."""
        if len(parents) != len(texts):
            raise ValueError(f"append: {len(parents)} parents but {len(texts)} texts.")
        nodes, encoded = [], []
        for i, (parent, text) in enumerate(zip(parents, texts)):
            toks = self.encode(text, special_tokens=False)
            if not toks:
                raise ValueError(f"append: text {i} is empty.")
            self.check_context(parent.context_len + len(toks) + 1, f"append: node {i}")
            self._check_kv(parent, parent.context_len - 1)
            encoded.append(toks)
        self.pages.need(sum(self.pages.pages_for(p.context_len, p.context_len + len(t))
                            for p, t in zip(parents, encoded)), "append")  # before any node is added
        for i, (parent, text, toks) in enumerate(zip(parents, texts, encoded)):
            nodes.append(self.tree.add("fixed", toks, parent, text=text if isinstance(text, str) else self.decode(
                toks), metadata=dict(metadata[i]) if metadata else {},
                key_path=parent.key_path + ((self._branch(parent), 0),)))
        # feed [parent's last token] + fixed[:-1] after the parent's context minus its last token
        items = [[p.tokens[-1]] + n.tokens[:-1] for p, n in zip(parents, nodes)]
        self._extend(parents, nodes, [p.context_len - 1 for p in parents], items, 1, "append")
        return nodes

    def shares_prefix(self, parent: Node, n: int, max_new_tokens: int) -> bool:
        """Whether `parent`'s n children share its prefix in one cascade group (EngineConfig.share_prefix; "auto"
        decides from this parent's own lengths only)."""
        mode = self.config.share_prefix
        if mode != "auto":
            return bool(mode)
        return n >= 2 and parent.context_len - 1 >= self.config.share_min_ratio * max_new_tokens

    def expand(self, parents: Sequence[Node], n: int, sampling: SamplingParams = SamplingParams(), *,
               max_new_tokens: int, stop: Any = None) -> list[list[Node]]:
        """Generate `n` children for each parent in one batched decode (one per tile with `group_tile`);
        returns children per parent. Child c of this call on parent p samples with the key of its path
        p.key_path + ((branch, c),), whatever the other parents and their order."""
        if n <= 0:
            raise ValueError(f"expand: n must be a positive number of children (got {n}).")
        if max_new_tokens <= 0:
            raise ValueError(f"expand: max_new_tokens must be positive (got {max_new_tokens}).")
        if not parents:
            return []
        stop_spec = Stop.parse(stop, self.eos_ids)
        for p in parents:
            self.check_context(p.context_len + max_new_tokens, f"expand: node #{p.id}")
            self._check_kv(p, p.context_len - 1)
        keys = [bucket(p.context_len - 1, self.config.min_prefix_bucket) for p in parents]
        buf = bucket(max_new_tokens, self.config.min_new_tokens_bucket)
        rows = bucket(n, self.config.min_rows_bucket) if self.config.min_rows_bucket > 0 else n
        shares = [self.shares_prefix(p, n, max_new_tokens) for p in parents]
        costs = [k + rows * buf if sh else n * (k + buf) for k, sh in zip(keys, shares)]
        # shared and copied parents run in programs of their own kind
        tiles = [(todo, groups, sh) for sh in (True, False)
                 for todo, groups in self._tiles(keys, [i for i in range(len(parents)) if shares[i] == sh], costs)]
        # before any branch is counted: the largest program must fit (what each program does not keep is freed
        # before the next, so a call of several programs can still run out later)
        self.pages.need(max(n * sum(self.pages.pages_for(parents[i].context_len, parents[i].context_len
                                                         + max_new_tokens) for i in todo) for todo, _, _ in tiles),
                        f"expand ({len(parents)} parents x {n} children, max_new_tokens={max_new_tokens})")
        kid_paths = []
        for p in parents:
            e = self._branch(p)
            kid_paths.append([p.key_path + ((e, c),) for c in range(n)])
        result: list[list[Node]] = [[] for _ in parents]
        stats: dict[str, int] = {"groups": 0, "rows": 0, "prefix_kv_bytes": 0, "suffix_kv_bytes": 0, "programs": 0,
                                 "parents_shared": sum(shares), "parents_copied": len(parents) - sum(shares),
                                 "outer_kv_bytes": 0, "outer_programs": 0}
        for todo, groups, share in tiles:
            kids = self._expand_tile([parents[i] for i in todo], [kid_paths[i] for i in todo], n, groups, sampling,
                                     max_new_tokens, stop_spec, stats, share)
            for i, ks in zip(todo, kids):
                result[i] = ks
        stats.update({f"kv_{k}": v for k, v in self.kv_stats().items()})
        self.last_decode_stats = stats
        return result

    def _expand_tile(self, parents: Sequence[Node], kid_paths: Sequence[Sequence[tuple]], n: int, groups: int,
                     sampling: SamplingParams, max_new_tokens: int, stop_spec: Stop, stats: dict[str, int],
                     share: bool) -> list[list[Node]]:
        """One decode program for `parents` in `groups` groups (n children each; `share`: the children of a parent
        share its prefix as one group, else each child is a group of its own); creates the child nodes."""
        rows_per_group = (bucket(n, self.config.min_rows_bucket) if self.config.min_rows_bucket > 0 else n
                          ) if share else 1
        stride = rows_per_group if share else n  # row of child c of parent pi: pi * stride + c
        if not share:
            groups *= n
        buf = bucket(max_new_tokens, self.config.min_new_tokens_bucket)
        group_parents = list(parents) if share else [p for p in parents for _ in range(n)]
        lengths = [p.context_len - 1 for p in group_parents]
        split = self.outer_tables(group_parents, lengths, groups) if share else None
        if split is None:
            table, prefix_len, prefix_size = self.prefix_tables(group_parents, lengths, groups)
            outer, outer_size, fanout = None, 0, 0
        else:
            outer_np, outer_size, fanout, table, prefix_len, prefix_size = split
            outer = tuple(jnp.asarray(a) for a in outer_np)
        r = groups * rows_per_group
        # every child gets pages for max_new_tokens before the program (what it does not use is freed after)
        starts = [p.context_len for p in parents]
        counts = [self.pages.pages_for(st, st + max_new_tokens) for st in starts]
        what = f"expand ({len(parents)} parents x {n} children, max_new_tokens={max_new_tokens})"
        self._reserve(n * sum(counts), what)
        owns = [[self.pages.alloc(c, what) for _ in range(n)] for c in counts]
        plan = PlanBuilder(r, buf, self._pool.shape[2], self.config.page_size)
        plan.items = set(range(len(parents)))
        completer: dict[int, int] = {}
        for pi, p in enumerate(parents):
            if p.kv_valid == len(p.tokens) - 1:
                completer.setdefault(p.id, pi)
        first = np.full((r,), self.pad_id, np.int32)
        active = np.zeros((r,), bool)
        words = np.zeros((r, 4), np.uint32)
        for pi, p in enumerate(parents):
            for c in range(n):
                row = pi * stride + c
                first[row] = p.tokens[-1]
                active[row] = True
                words[row] = path_words(kid_paths[pi][c])
                self._plan_row(plan, row, p, starts[pi], owns[pi][c], 1, max_new_tokens, completer,
                               pi if c == 0 else -1, {})
        context_seen = None
        if sampling.repetition_penalty != 1.0:
            seen = np.zeros((groups, self.cfg.vocab_size), bool)
            for g, p in enumerate(group_parents):
                seen[g, p.context_tokens()] = True
            context_seen = jnp.asarray(seen)
        out_tok, out_lp, out_len, hit_eos, self._pool = self._decode_jit(
            self._state, self._pool, jnp.asarray(table), jnp.asarray(prefix_len), jnp.asarray(first),
            path_keys(self._key, jnp.asarray(words)), jnp.asarray(active), jnp.int32(max_new_tokens), context_seen,
            plan.build(), outer, graphdef=self._graphdef, rows_per_group=rows_per_group, prefix_size=prefix_size,
            buf=buf, params=sampling, eos_ids=stop_spec.eos_ids, pad_id=self.pad_id, impl=self._impl,
            outer_size=outer_size, outer_fanout=fanout)
        for pi, p in enumerate(parents):
            if completer.get(p.id) == pi:
                p.kv_valid = len(p.tokens)
        c = self.cfg
        slot_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * jnp.dtype(self._dtype).itemsize
        stats["groups"] += groups
        stats["rows"] += r
        stats["programs"] += 1
        outer_bytes = 0 if outer is None else int(outer[0].shape[0]) * outer_size * slot_bytes
        stats["prefix_kv_bytes"] = max(stats["prefix_kv_bytes"], groups * prefix_size * slot_bytes + outer_bytes)
        stats["outer_kv_bytes"] = max(stats["outer_kv_bytes"], outer_bytes)  # both per program
        stats["outer_programs"] += outer is not None
        stats["suffix_kv_bytes"] = max(stats["suffix_kv_bytes"], r * buf * slot_bytes)
        toks, lps = np.asarray(out_tok), np.asarray(out_lp)
        lens, eos_hit = np.asarray(out_len), np.asarray(hit_eos)
        result = []
        for pi, p in enumerate(parents):
            kids = []
            for c in range(n):
                row = pi * stride + c
                length = int(lens[row])
                tokens = toks[row, :length].tolist()
                reason = "eos" if eos_hit[row] else "length"
                text = self.decode(tokens)
                cut = self._stop_cut(tokens, stop_spec.strings) if stop_spec.strings else None
                if cut is not None:
                    tokens, text, reason = tokens[:cut[0]], cut[1], "stop"
                node = self.tree.add("generated", tokens, p, text=text, logprobs=lps[row, :len(tokens)].tolist(),
                                     finish_reason=reason, key_path=kid_paths[pi][c])
                own = owns[pi][c]
                keep = self.pages.pages_for(starts[pi], starts[pi] + len(tokens))
                self.pages.decref(own[keep:])
                self._new_table(node, p, own[:keep])
                node.kv_valid = max(len(tokens) - 1, 0)
                kids.append(node)
            result.append(kids)
        return result

    def _stop_cut(self, tokens: list[int], strings: tuple[str, ...]) -> tuple[int, str] | None:
        """(tokens to keep, text before the stop string) for the earliest stop string in the decoded text."""
        text = self.decode(tokens)
        hits = [(text.find(s), s) for s in strings if s in text]
        if not hits:
            return None
        pos, s = min(hits)
        for k in range(1, len(tokens) + 1):  # the shortest token prefix whose text contains the stop string
            if len(self.decode(tokens[:k])) >= pos + len(s) and s in self.decode(tokens[:k]):
                return k, text[:pos]
        return len(tokens), text[:pos]
