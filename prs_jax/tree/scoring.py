"""Batched reward scoring: (prompt, response) pairs -> reward-model inputs -> the engine's executor.

The scorer runs the reward model on its own `TreeEngine`: each distinct formatted prompt part is put on the
tree once (a root, prefilled into the RM's paged KV pool) and every candidate response runs as a row against
it with cascade attention, read by the executor's "reward" head (`tree.executor.read_rows`), whenever the
formatter's full token sequence starts with the tokens of its prompt part. Otherwise that pair is a row of
its own with no prefix.

Memory is bounded per program: rows of one shape class (rows per group, prefix and row length buckets) are
packed into programs sized by a token budget (rows x padded length) and an activation budget for the attention
scores the reference attention materialises ([rows, heads, T, prefix + T]), never by a row count alone; the
prompt prefill runs within the same token and activation budgets (its queries in blocks of 512), and prompts
enter the KV pool in waves of at most `prompt_pages` pages. With `stable_rows` every pair is scored in shapes
that depend on its own lengths only (batch-invariant floats, see `ScorerConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import numpy as np

from prs_jax.models.sharding import MeshContext
from prs_jax.models.tokenizer import encode_chat
from prs_jax.models.transformer import RewardModel
from prs_jax.models.window import check_fits, window_of
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.executor import READ, ReadGroup, ReadLimits, counting
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
    """Bucket floors and the limits that size each scoring program (`tree.executor.ReadLimits`).

    A program holds g groups of n rows with prefix bucket P and response bucket T: g * n * (P + T) <=
    token_budget, g * n <= max_rows, attention activations (8 * heads * n * T * (P + T) bytes per group) <=
    activation_budget_bytes; a group too big for one program is split into sub-groups (down to one row, which
    always runs). The prompt prefill runs in programs within token_budget and activation_budget_bytes too
    (with stable_rows: in fixed tiles of stable_groups prompt parts). Prompt parts enter the RM's KV
    pool `prompt_pages` pages at a time (page_size tokens each) and leave it after their responses are scored.

    stable_rows > 0 makes the floats batch-invariant: every group has exactly this many rows (pairs with the
    same prompt part and response bucket, split or padded), every program exactly min(stable_groups, the
    budget's g) groups (padded), and the prompt prefill runs in fixed tiles of stable_groups, so a pair's
    shapes depend only on its own lengths and never on the other pairs of the call.
    """

    max_rows: int = 256
    token_budget: int = 65536
    activation_budget_bytes: int = 2 << 30
    min_prefix_bucket: int = 16
    min_suffix_bucket: int = 16
    stable_rows: int = 0
    stable_groups: int = 8
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"
    page_size: int = 16
    prompt_pages: int = 4096

    def limits(self) -> ReadLimits:
        return ReadLimits(max_rows=self.max_rows, token_budget=self.token_budget,
                          activation_budget_bytes=self.activation_budget_bytes, min_row_bucket=self.min_suffix_bucket,
                          stable_rows=self.stable_rows, stable_groups=self.stable_groups)

    def engine_config(self, window: int) -> EngineConfig:
        """The RM engine's settings: its pool holds one wave of prompt parts, i.e. prompt_pages pages or one
        prompt part as long as the RM's `window` (reads write no KV)."""
        pages = max(self.prompt_pages, -(-window // self.page_size), 1)
        return EngineConfig(attention_impl=self.attention_impl, min_prefix_bucket=self.min_prefix_bucket,
                            min_extend_bucket=self.min_prefix_bucket, token_budget=self.token_budget,
                            activation_budget_bytes=self.activation_budget_bytes,
                            group_tile=self.stable_groups if self.stable_rows else 0, page_size=self.page_size,
                            pool_pages=pages, initial_pool_pages=min(256, pages))  # grows 4x as needed


def _is_head(key: tuple) -> bool:
    """A group key is a prompt part's token ids, or ("whole", n) for pairs scored without a shared prefix."""
    return isinstance(key[0], int)


class RewardScorer:
    """Scores responses with a reward model, batched and bucketed, sharing each prompt's prefix KV."""

    def __init__(self, rm: RewardModel, tokenizer: Any, formatter: RewardFormatter = RewardFormatter(),
                 config: ScorerConfig = ScorerConfig(), pad_id: int | None = None,
                 mesh_context: MeshContext | None = None):
        self.rm, self.tokenizer, self.formatter, self.config = rm, tokenizer, formatter, config
        pad = int(pad_id if pad_id is not None else (tokenizer.pad_token_id or 0))
        # the RM's own engine: its KV pool holds the prompt parts; programs run inside the mesh the RM lives on
        self.engine = TreeEngine(rm, None, config=config.engine_config(window_of(rm)), eos_ids=(), pad_id=pad,
                                 mesh_context=mesh_context)
        self.mesh_context = self.engine.mesh_context
        self.pad_id = pad
        self.compilations = 0
        self._read = counting(READ, self)
        self.last_chunks: list[tuple[int, int, int, int]] = []  # (groups, rows per group, P, T) per program run

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Reward of each (prompt, response) pair, in input order."""
        cfg = self.config
        self.last_chunks = []
        window = window_of(self.rm)
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for i, (prompt, response) in enumerate(pairs):
            head, tail = self.formatter.split(self.tokenizer, prompt, response)
            check_fits(len(head) + len(tail), window, what=f"reward-model input {i} (prompt + response)",
                       model="reward model", index=i,
                       fix="use a reward model with a longer window, shorter prompts, or a smaller max_new_tokens.")
            # unshareable pairs (tokenisation merges across the boundary) have no prefix: each is its own group,
            # or with stable_rows all share one (the planner splits rows by their own length bucket)
            key = tuple(head) if head else ("whole", 0 if cfg.stable_rows else i)
            groups.setdefault(key, []).append((i, tail))  # without a head, tail is the whole input
        out = np.zeros(len(pairs), np.float32)
        ps = cfg.page_size
        waves: list[list[tuple]] = [[]]
        used = 0
        for key in groups:  # prompt parts enter the pool in waves of at most prompt_pages pages
            need = -(-len(key) // ps) if _is_head(key) else 0
            if waves[-1] and used + need > cfg.prompt_pages:
                waves.append([])
                used = 0
            waves[-1].append(key)
            used += need
        for wave in waves:
            self._score_wave(wave, groups, out)
        return out.tolist()

    def _score_wave(self, keys: list[tuple], groups: dict, out: np.ndarray) -> None:
        engine = self.engine
        shared = [k for k in keys if _is_head(k)]
        before = engine.compilations
        try:  # reads draw no samples: the roots need no prompt ids
            roots = dict(zip(shared, engine.add_prompts([list(k) for k in shared]))) if shared else {}
            self.compilations += engine.compilations - before
            read_groups, index = [], []
            for k in keys:
                members = groups[k]
                if k in roots:  # the root's KV covers all but its last token: each row starts with that token
                    read_groups.append(ReadGroup(roots[k], len(k) - 1, [[k[-1], *tail] for _, tail in members]))
                else:
                    read_groups.append(ReadGroup(None, 0, [tokens for _, tokens in members]))
                index.append([i for i, _ in members])
            scores = engine.read(read_groups, "reward", self.config.limits(), run=self._read)
            self.last_chunks.extend((c.g, c.n, c.p, c.t) for c in engine.last_read_chunks)
        finally:
            engine.clear()
        for idx, vals in zip(index, scores):
            for i, v in zip(idx, vals):
                out[i] = v

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
