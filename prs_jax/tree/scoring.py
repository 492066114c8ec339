"""Batched reward scoring: (prompt, response) pairs -> reward-model inputs -> one jitted, bucketed pass.

Candidates of one prompt share the prompt's KV: the formatted prompt part is prefilled once per prompt and
every candidate response runs as a suffix row against it (cascade attention), whenever the formatter's full
token sequence starts with the tokens of its prompt part. Otherwise that pair is scored whole.

Memory is bounded per program: groups of the same shape class (rows per group, prefix and response length
buckets) are packed into chunks sized by a token budget (rows x padded length) and by an activation budget for
the attention scores the reference attention materialises ([rows, heads, T, prefix + T] for the responses,
[groups, heads, P, P] for the prompt prefill), never by a row count alone. With `stable_rows` every pair is
scored in shapes that depend on its own lengths only (batch-invariant floats, see `ScorerConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.kernels.cascade import use_pallas_default
from prs_jax.models.sharding import MeshContext, mesh_context_of, use_rules
from prs_jax.models.tokenizer import encode_chat
from prs_jax.models.transformer import RewardModel
from prs_jax.models.window import check_fits, window_of
from prs_jax.tree.engine import bucket, counting, extend_rows
from prs_jax.tree.tree import Node


@dataclasses.dataclass(frozen=True)
class RewardFormatter:
    """How a (prompt, response) pair becomes reward-model text.

    kind="chat": the RM tokenizer's chat template over [system?, user: prompt, assistant: response].
    kind="template": `template` with {prompt} and {response} (e.g. "Human: {prompt}\\n\\nAssistant: {response}").
    """

    kind: Literal["chat", "template"] = "chat"
    template: str = "Human: {prompt}\n\nAssistant: {response}"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "template" and (self.template.count("{response}") != 1 or "{prompt}" not in self.template):
            raise ValueError(f"RewardFormatter.template must contain {{prompt}} and exactly one {{response}}; "
                             f"got {self.template!r}")

    def _messages(self, prompt: str, response: str | None) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": prompt})
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def split(self, tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """(shared prompt-part ids, response-part ids) whose concatenation is the full input ids."""
        if self.kind == "chat":
            full = encode_chat(tokenizer, self._messages(prompt, response), add_generation_prompt=False)
            head = encode_chat(tokenizer, self._messages(prompt, None), add_generation_prompt=True)
        else:
            before = self.template.split("{response}")[0].format(prompt=prompt)
            full = list(tokenizer(self.template.format(prompt=prompt, response=response))["input_ids"])
            head = list(tokenizer(before)["input_ids"])
        if len(head) < len(full) and full[:len(head)] == head:
            return head, full[len(head):]
        return [], full  # tokenisation merges across the boundary: no sharing for this pair


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """Bucket floors and the limits that size each scoring program.

    A program holds g groups of n rows with prefix bucket P and response bucket T. g is the largest power of
    two with g * n * (P + T) <= token_budget, g * n <= max_rows, and attention activations (scores and
    probabilities in float32: 8 * heads * n * T * (P + T) bytes per group for the responses, 8 * heads * P * P
    for the prompt prefill) <= activation_budget_bytes; a group too big for one program is split into
    sub-groups (down to one row, which always runs).

    stable_rows > 0 makes the floats batch-invariant: every group has exactly this many rows (pairs with the
    same prompt part and response bucket, split or padded), and every program has exactly min(stable_groups,
    the budget's g) groups (padded), so a pair's shapes depend only on its own lengths and never on the other
    pairs of the call.
    """

    max_rows: int = 256
    token_budget: int = 65536
    activation_budget_bytes: int = 2 << 30
    min_prefix_bucket: int = 16
    min_suffix_bucket: int = 16
    stable_rows: int = 0
    stable_groups: int = 8
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def chunk_groups(cfg: Any, heads: int, n: int, p: int, t: int) -> int:
    """Groups per program for shape class (n rows per group, prefix bucket p, row bucket t): a power of two
    >= 1 within the token, row and activation budgets (1 when even one group exceeds them). `cfg` is any
    config with token_budget, max_rows and activation_budget_bytes (ScorerConfig, feedback ReaderConfig)."""
    per_group_tokens = n * (p + t)
    per_group_bytes = max(8 * heads * n * t * (p + t), 8 * heads * p * p)
    g = min(cfg.token_budget // max(per_group_tokens, 1), cfg.max_rows // max(n, 1),
            cfg.activation_budget_bytes // max(per_group_bytes, 1))
    return _pow2_floor(max(g, 1))


def rows_per_group(cfg: Any, heads: int, n: int, p: int, t: int) -> int:
    """The largest power of two <= n (at least 1) whose single group fits the budgets."""
    while n > 1 and (n * (p + t) > cfg.token_budget or n > cfg.max_rows
                     or 8 * heads * n * t * (p + t) > cfg.activation_budget_bytes):
        n //= 2
    return n


def _prefill_fn(state, tokens, mask, *, graphdef, impl, rules=None):
    rm = nnx.merge(graphdef, state)
    c = rm.config
    g = tokens.shape[0]
    empty = jnp.zeros((c.num_hidden_layers, 2, g, c.num_key_value_heads, 1, c.head_dim), rm.head.kernel[...].dtype)
    with use_rules(rules):
        kv, _ = extend_rows(rm, empty, jnp.zeros((g, 1), bool), tokens, mask, rows_per_group=1, impl=impl,
                            want_hidden=False)
    return kv


def _score_fn(state, prefix_kv, prefix_mask, tokens, mask, *, graphdef, rows_per_group, impl, rules=None):
    rm = nnx.merge(graphdef, state)
    with use_rules(rules):
        _, h_last = extend_rows(rm, prefix_kv, prefix_mask, tokens, mask, rows_per_group=rows_per_group,
                                impl=impl, want_hidden=True)
    return rm.head(h_last)[:, 0]


# rules: static, so a cached program never carries another scorer's logical-axis rules
PREFILL = jax.jit(_prefill_fn, static_argnames=("graphdef", "impl", "rules"))
SCORE = jax.jit(_score_fn, static_argnames=("graphdef", "rows_per_group", "impl", "rules"))


class RewardScorer:
    """Scores responses with a reward model, batched and bucketed, sharing each prompt's prefix KV."""

    def __init__(self, rm: RewardModel, tokenizer: Any, formatter: RewardFormatter = RewardFormatter(),
                 config: ScorerConfig = ScorerConfig(), pad_id: int | None = None,
                 mesh_context: MeshContext | None = None):
        self.rm, self.tokenizer, self.formatter, self.config = rm, tokenizer, formatter, config
        # programs run inside the mesh the model's parameters live on (given, or found on them: default rules)
        self.mesh_context = mesh_context if mesh_context is not None else mesh_context_of(rm)
        self._graphdef, self._state = nnx.split(rm)
        self.compilations = 0
        self.pad_id = int(pad_id if pad_id is not None else (tokenizer.pad_token_id or 0))
        impl = config.attention_impl
        self._impl = ("pallas" if use_pallas_default() else "reference") if impl == "auto" else impl
        self._prefill = counting(PREFILL, self)
        self._score = counting(SCORE, self)
        self.last_chunks: list[tuple[int, int, int, int]] = []  # (groups, rows per group, P, T) per program run

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Reward of each (prompt, response) pair, in input order."""
        cfg = self.config
        self.last_chunks = []
        window = window_of(self.rm)
        split = []
        for i, (prompt, response) in enumerate(pairs):
            head, tail = self.formatter.split(self.tokenizer, prompt, response)
            check_fits(len(head) + len(tail), window, what=f"reward-model input {i} (prompt + response)",
                       model="reward model", index=i,
                       fix="use a reward model with a longer window, shorter prompts, or a smaller max_new_tokens.")
            split.append((head, tail))
        tb = [bucket(len(tail), cfg.min_suffix_bucket) for _, tail in split]
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (head, tail) in enumerate(split):
            if not head and not cfg.stable_rows:  # unshareable pairs each form their own group
                groups[((), i)] = [(i, tail)]
            else:  # stable: responses of one bucket only, so no pair's row length depends on another's
                groups.setdefault((tuple(head), tb[i]) if cfg.stable_rows else (tuple(head),), []).append((i, tail))
        heads = self.rm.config.num_attention_heads
        classes: dict[tuple[int, int, int], list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]] = {}
        for key, members in groups.items():
            head = key[0]
            p = bucket(len(head), cfg.min_prefix_bucket)
            t = max(tb[i] for i, _ in members)
            n = cfg.stable_rows or bucket(len(members))
            n = rows_per_group(cfg, heads, n, p, t)
            for s in range(0, len(members), n):
                classes.setdefault((n, p, t), []).append((head, members[s:s + n]))
        out = np.zeros(len(pairs), np.float32)
        for (n, p, t), grs in sorted(classes.items()):
            g_cap = chunk_groups(cfg, heads, n, p, t)
            if cfg.stable_rows:
                g_cap = min(g_cap, _pow2_floor(cfg.stable_groups))
            for s in range(0, len(grs), g_cap):
                chunk = grs[s:s + g_cap]
                self._score_chunk(chunk, n, out, g=g_cap if cfg.stable_rows else bucket(len(chunk)), p=p, t=t)
        return out.tolist()

    def _score_chunk(self, chunk, n: int, out: np.ndarray, *, g: int | None = None, p: int | None = None,
                     t: int | None = None) -> None:
        """Score one program: `chunk` is [(prompt-part ids, [(pair index, response ids)])], n rows per group."""
        g = g or bucket(len(chunk))
        p = p or bucket(max(len(h) for h, _ in chunk), self.config.min_prefix_bucket)
        t = t or bucket(max(len(tail) for _, ms in chunk for _, tail in ms), self.config.min_suffix_bucket)
        pre_tok = np.full((g, p), self.pad_id, np.int32)
        pre_mask = np.zeros((g, p), bool)
        tok = np.full((g * n, t), self.pad_id, np.int32)
        mask = np.zeros((g * n, t), bool)
        for gi, (head, members) in enumerate(chunk):
            pre_tok[gi, :len(head)] = head
            pre_mask[gi, :len(head)] = True
            for j, (_, tail) in enumerate(members):
                tok[gi * n + j, :len(tail)] = tail
                mask[gi * n + j, :len(tail)] = True
        self.last_chunks.append((g, n, p, t))
        prefix_kv = self._prefill(self._state, jnp.asarray(pre_tok), jnp.asarray(pre_mask), graphdef=self._graphdef,
                                  impl=self._impl)
        scores = np.asarray(self._score(self._state, prefix_kv, jnp.asarray(pre_mask), jnp.asarray(tok),
                                        jnp.asarray(mask), graphdef=self._graphdef, rows_per_group=n,
                                        impl=self._impl))
        for gi, (_, members) in enumerate(chunk):
            for j, (i, _) in enumerate(members):
                out[i] = scores[gi * n + j]

    def score_nodes(self, nodes: Sequence[Node], prompt_of: Callable[[Node], str] | None = None,
                    write: bool = True) -> list[float]:
        """Score generated nodes against their prompt (default: the root's `metadata['prompt']` or its text);
        stores each reward on its node unless `write=False`."""
        prompt_of = prompt_of or (lambda n: n.root.metadata.get("prompt", n.root.text))
        rewards = self.score_pairs([(prompt_of(n), n.text) for n in nodes])
        if write:
            for n, r in zip(nodes, rewards):
                n.reward = r
        return rewards
