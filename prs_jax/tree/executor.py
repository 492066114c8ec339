"""The tree engine's one executor: group -> bucket -> pack -> run -> scatter, with a head per use.

Every batched program on the engine's KV pool has one shape: G groups, each a prefix (the first tokens of a
node's context, read from the pool by block table inside the program) and n rows of new tokens run after it
with cascade attention (`forward_rows`). The uses differ only in the head applied to the rows:

  "kv"      write the rows' KV into the pool (prefill: `TreeEngine.add_prompts`, `append`)
  "decode"  sample continuations in a while_loop, then write their KV (`TreeEngine.expand`)
  "reward"  a reward model's scalar head at each row's last valid token (`tree.scoring.RewardScorer`)
  "labels"  log-softmax at given positions over a few vocabulary ids (`feedback.reader.LabelReader`)

"kv" and the reading heads run the rows through `forward_rows`; "decode" steps the same cascade cache one
token at a time inside its while_loop. The writing heads live in the engine, which also packs them
(`TreeEngine._tiles`: longest items first, each program within `EngineConfig.token_budget` and, for
prefill, `activation_budget_bytes`). The reading heads run through `read_rows`: groups
are bucketed into shape classes (rows per group n, prefix bucket P, row bucket T) and packed g groups to a
program, g the largest power of two within the token, row and activation budgets (`ReadLimits`); a group too
big for one program is split into sub-groups. One program launch per packed chunk; results are scattered
back to (group, row) order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.kernels.paged import gather_pages
from prs_jax.models.layers import CascadeCache
from prs_jax.models.sharding import use_rules


def bucket(x: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(x, minimum)."""
    x = max(int(x), int(minimum), 1)
    return 1 << (x - 1).bit_length()


def length_bucket(x: int, minimum: int = 1, fine: bool = True) -> int:
    """A token-length bucket: the smallest 2^k or 3 * 2^(k-1) >= max(x, minimum) (`fine`, half-octave steps: the
    padded length is under 1.5x the length), else the smallest power of two (under 2x). Prefill and reads
    cost in proportion to the padded length, so the finer steps buy compute for about twice the programs."""
    n = max(int(x), int(minimum), 1)
    p = bucket(n)
    return 3 * p // 4 if fine and p >= 4 and 3 * p // 4 >= n else p


def pow2_floor(x: int) -> int:
    """Largest power of two <= max(x, 1)."""
    return 1 << (max(int(x), 1).bit_length() - 1)


def counting(fn, owner: Any):
    """Call jitted `fn`, adding the number of programs it compiled to `owner.compilations`. With an
    `owner.mesh_context`, the call is traced and run inside it and `fn` gets its rules (static `rules`)."""

    def call(*args, **kwargs):
        before = fn._cache_size()
        ctx = getattr(owner, "mesh_context", None)
        if ctx is None:
            out = fn(*args, **kwargs)
        else:
            with ctx.activate():
                out = fn(*args, rules=ctx.frozen_rules, **kwargs)
        owner.compilations += fn._cache_size() - before
        return out

    return call


def _stack_layers(kv: jax.Array) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    # [L, 2, G, K, P, D] -> per-layer tuples of [G, K, P, D]
    return tuple(kv[i, 0] for i in range(kv.shape[0])), tuple(kv[i, 1] for i in range(kv.shape[0]))


def forward_rows(module: Any, prefix_kv: jax.Array, prefix_mask: jax.Array, tokens: jax.Array, mask: jax.Array, *,
                 rows_per_group: int, impl: str) -> tuple[jax.Array, jax.Array]:
    """Run `tokens` [R, T] (valid where `mask`) after their group's prefix KV [L, 2, G, K, P, D] (rows
    g * n .. g * n + n - 1 belong to group g, n = rows_per_group). Any module with a `.model` backbone (causal LM or reward model).
    Returns the final hidden states [R, T, hidden] and the new tokens' KV [L, 2, R, K, T, D]."""
    pk, pv = _stack_layers(prefix_kv)
    cache = CascadeCache.init(module.config, pk, pv, prefix_mask, rows_per_group, tokens.shape[1], impl)
    hidden, cache = module.model(tokens, attention_mask=mask, cache=cache)
    suffix = jnp.stack([jnp.stack([k, v]) for k, v in zip(cache.suffix_k, cache.suffix_v)])
    return hidden, suffix


# ------------------------------------------------------------------------------------------ reading heads
Head = Literal["reward", "labels"]


def _read_fn(state, pool, table, prefix_len, tokens, mask, positions, vocab_ids, *, graphdef, rows_per_group,
             prefix_size, head, impl, rules=None):
    """Rows `tokens` [R, T] after their group's prefix (read from the pool by block table), then the head at
    `positions` [R, Q]: "reward" -> the reward head [R] (Q = 1, each row's last valid token); "labels" ->
    log_softmax restricted to `vocab_ids` [U]: [R, Q, U] float32 (the vocabulary projection only there)."""
    with use_rules(rules):
        module = nnx.merge(graphdef, state)
        prefix_kv, prefix_mask = gather_pages(pool, table, prefix_len, prefix_size)
        hidden, _ = forward_rows(module, prefix_kv, prefix_mask, tokens, mask, rows_per_group=rows_per_group,
                                 impl=impl)
        h = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)
        if head == "reward":
            return module.head(h[:, 0])[:, 0].astype(jnp.float32)
        logits = module.unembed(h).astype(jnp.float32)
        logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take(logp, vocab_ids, axis=-1)


# one compiled program per (model graph, shape class, head); shared by every engine of the process
READ = jax.jit(_read_fn, static_argnames=("graphdef", "rows_per_group", "prefix_size", "head", "impl", "rules"))


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """What sizes a reading program (see the module docstring).

    A program holds g groups of n rows with prefix bucket P and row bucket T: g * n * (P + T) <= token_budget,
    g * n <= max_rows, attention activations (scores and probabilities in float32: 8 * heads * n * T * (P + T)
    bytes per group) <= activation_budget_bytes; the group floor `min_groups_bucket` pads a program only within
    those budgets. stable_rows > 0: shapes that depend on a group's own lengths only (every group's rows split
    by row bucket and cut or padded to stable_rows rows, halved while one group exceeds the budgets; every
    program exactly min(pow2_floor(stable_groups), the budgets' g) groups), so a row's floats never depend on
    what else was read."""

    max_rows: int = 256
    token_budget: int = 65536
    activation_budget_bytes: int = 2 << 30
    min_row_bucket: int = 16
    fine_row_buckets: bool = True  # row lengths in half-octave buckets (executor.length_bucket), else powers of 2
    min_groups_bucket: int = 1
    stable_rows: int = 0
    stable_groups: int = 8

    def __post_init__(self) -> None:
        for name in ("max_rows", "token_budget", "activation_budget_bytes", "min_row_bucket", "min_groups_bucket",
                     "stable_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReadLimits.{name} must be >= 1, got {getattr(self, name)}.")
        if self.stable_rows < 0:
            raise ValueError(f"ReadLimits.stable_rows must be >= 0, got {self.stable_rows}.")


def group_bytes(heads: int, n: int, p: int, t: int) -> int:
    """Attention activations of one group of n rows x T after a P-slot prefix (float32 scores and probs)."""
    return 8 * heads * n * t * (p + t)


def chunk_groups(limits: ReadLimits, heads: int, n: int, p: int, t: int) -> int:
    """Groups per program for shape class (n, p, t): a power of two >= 1 within the budgets (1 when even one
    group exceeds them)."""
    g = min(limits.token_budget // max(n * (p + t), 1), limits.max_rows // max(n, 1),
            limits.activation_budget_bytes // max(group_bytes(heads, n, p, t), 1))
    return pow2_floor(max(g, 1))


def rows_per_group(limits: ReadLimits, heads: int, n: int, p: int, t: int) -> int:
    """The largest power of two <= n (at least 1) whose single group fits the budgets."""
    while n > 1 and (n * (p + t) > limits.token_budget or n > limits.max_rows
                     or group_bytes(heads, n, p, t) > limits.activation_budget_bytes):
        n //= 2
    return n


@dataclasses.dataclass(frozen=True)
class ReadGroup:
    """Rows that continue the first `prefix_len` context tokens of `node` (None: no prefix, prefix_len 0).

    rows[j] is a token list run after that prefix (e.g. the node's next context token, then a query);
    positions[j] lists the row positions whose outputs the head reads ("labels": one or more; "reward": ignored,
    the row's last token is read)."""

    node: Any
    prefix_len: int
    rows: list[list[int]]
    positions: list[list[int]] | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One program: g groups of n rows, prefix bucket P, row bucket T; members are (group index, row indices)."""

    g: int
    n: int
    p: int
    t: int
    members: list[tuple[int, list[int]]]


def plan_reads(groups: Sequence[ReadGroup], limits: ReadLimits, heads: int, min_prefix_bucket: int) -> list[Chunk]:
    """Bucket the groups' rows into shape classes and pack them into programs within `limits`."""
    stable = limits.stable_rows
    classes: dict[tuple[int, int, int], list[tuple[int, list[int]]]] = {}
    for gi, grp in enumerate(groups):
        p = bucket(grp.prefix_len, min_prefix_bucket)
        if stable:  # rows of one bucket per group: no row's padded length depends on another row's
            parts: dict[int, list[int]] = {}
            for j, row in enumerate(grp.rows):
                parts.setdefault(length_bucket(len(row), limits.min_row_bucket, limits.fine_row_buckets), []).append(j)
            for t, idx in sorted(parts.items()):
                n = rows_per_group(limits, heads, stable, p, t)
                for s in range(0, len(idx), n):
                    classes.setdefault((n, p, t), []).append((gi, idx[s:s + n]))
            continue
        if not grp.rows:
            continue
        t = length_bucket(max(len(r) for r in grp.rows), limits.min_row_bucket, limits.fine_row_buckets)
        n = rows_per_group(limits, heads, bucket(len(grp.rows)), p, t)
        for s in range(0, len(grp.rows), n):
            classes.setdefault((n, p, t), []).append((gi, list(range(s, min(s + n, len(grp.rows))))))
    chunks = []
    for (n, p, t), members in sorted(classes.items()):
        cap = chunk_groups(limits, heads, n, p, t)
        if stable:
            cap = min(cap, pow2_floor(limits.stable_groups))
        for s in range(0, len(members), cap):
            part = members[s:s + cap]
            # cap is a power of two >= len(part) within every budget: the group floor pads only up to it
            g = cap if stable else min(bucket(len(part), limits.min_groups_bucket), cap)
            chunks.append(Chunk(g, n, p, t, part))
    return chunks


def read_rows(engine: Any, groups: Sequence[ReadGroup], head: Head, limits: ReadLimits, *,
              vocab_ids: Sequence[int] = (), run: Any = None) -> tuple[list[list[Any]], list[Chunk]]:
    """Run every group's rows with `engine`'s model on its KV pool and read `head`; returns (outputs per group
    per row, the programs run).

    "reward": each output is a float (the reward head at the row's last valid token). "labels": each output is
    [len(positions[j]), len(vocab_ids)] float32 log-probs. `run` is `READ` wrapped by `counting` for whoever
    counts the compilations (default: the engine)."""
    run = run if run is not None else counting(READ, engine)
    heads = engine.cfg.num_attention_heads
    for gi, grp in enumerate(groups):
        if grp.node is None and grp.prefix_len:
            raise ValueError(f"read_rows: group {gi} has no node but prefix_len {grp.prefix_len}.")
        if head == "labels" and (grp.positions is None or len(grp.positions) != len(grp.rows)):
            raise ValueError(f"read_rows: group {gi} needs one positions list per row for the labels head.")
        for j, row in enumerate(grp.rows):
            if not row:
                raise ValueError(f"read_rows: group {gi} row {j} is empty.")
            if head == "labels" and (not grp.positions[j] or not all(0 <= q < len(row) for q in grp.positions[j])):
                raise ValueError(f"read_rows: group {gi} row {j}: positions {grp.positions[j]} must be a non-empty "
                                 f"list of indices into the row's {len(row)} tokens.")
            engine.check_context(grp.prefix_len + len(row), f"read_rows: group {gi} row {j}")
    chunks = plan_reads(groups, limits, heads, engine.config.min_prefix_bucket)
    out: list[list[Any]] = [[None] * len(g.rows) for g in groups]
    u = bucket(len(vocab_ids), 8)
    vocab = jnp.asarray(np.pad(np.asarray(vocab_ids, np.int32), (0, u - len(vocab_ids))))
    qn = bucket(max((len(p) for g in groups for p in g.positions), default=1)) if head == "labels" else 1
    graphdef, state = engine.model_split()
    for ch in chunks:
        table, prefix_len, size = engine.prefix_tables([groups[gi].node for gi, _ in ch.members],
                                                       [groups[gi].prefix_len for gi, _ in ch.members], ch.g)
        r = ch.g * ch.n
        tokens = np.full((r, ch.t), engine.pad_id, np.int32)
        mask = np.zeros((r, ch.t), bool)
        positions = np.zeros((r, qn), np.int32)
        where = []
        for k, (gi, idx) in enumerate(ch.members):
            grp = groups[gi]
            for j, ri in enumerate(idx):
                row = k * ch.n + j
                toks = grp.rows[ri]
                tokens[row, :len(toks)] = toks
                mask[row, :len(toks)] = True
                pos = [len(toks) - 1] if head == "reward" else list(grp.positions[ri])
                positions[row] = pos + [pos[-1]] * (qn - len(pos))
                where.append((row, gi, ri, len(pos)))
        res = np.asarray(run(state, engine.kv_pool(), jnp.asarray(table), jnp.asarray(prefix_len),
                             jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions), vocab,
                             graphdef=graphdef, rows_per_group=ch.n, prefix_size=size, head=head,
                             impl=engine.attention_impl))
        for row, gi, ri, q in where:
            out[gi][ri] = float(res[row]) if head == "reward" else res[row, :q, :len(vocab_ids)]
    return out, chunks
