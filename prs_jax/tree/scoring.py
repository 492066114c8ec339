"""Batched reward scoring: (prompt, response) pairs -> reward-model inputs -> one jitted, bucketed pass.

Candidates of one prompt share the prompt's KV: the formatted prompt part is prefilled once per prompt and
every candidate response runs as a suffix row against it (cascade attention), whenever the formatter's full
token sequence starts with the tokens of its prompt part. Otherwise that pair is scored whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prs_jax.kernels.cascade import use_pallas_default
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
    """Bucket floors and the largest number of rows scored in one program."""

    max_rows: int = 256
    min_prefix_bucket: int = 16
    min_suffix_bucket: int = 16
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"


def _prefill_fn(state, tokens, mask, *, graphdef, impl):
    rm = nnx.merge(graphdef, state)
    c = rm.config
    g = tokens.shape[0]
    empty = jnp.zeros((c.num_hidden_layers, 2, g, c.num_key_value_heads, 1, c.head_dim), rm.head.kernel[...].dtype)
    kv, _ = extend_rows(rm, empty, jnp.zeros((g, 1), bool), tokens, mask, rows_per_group=1, impl=impl,
                        want_hidden=False)
    return kv


def _score_fn(state, prefix_kv, prefix_mask, tokens, mask, *, graphdef, rows_per_group, impl):
    rm = nnx.merge(graphdef, state)
    _, h_last = extend_rows(rm, prefix_kv, prefix_mask, tokens, mask, rows_per_group=rows_per_group, impl=impl,
                            want_hidden=True)
    return rm.head(h_last)[:, 0]


PREFILL = jax.jit(_prefill_fn, static_argnames=("graphdef", "impl"))
SCORE = jax.jit(_score_fn, static_argnames=("graphdef", "rows_per_group", "impl"))


class RewardScorer:
    """Scores responses with a reward model, batched and bucketed, sharing each prompt's prefix KV."""

    def __init__(self, rm: RewardModel, tokenizer: Any, formatter: RewardFormatter = RewardFormatter(),
                 config: ScorerConfig = ScorerConfig(), pad_id: int | None = None):
        self.rm, self.tokenizer, self.formatter, self.config = rm, tokenizer, formatter, config
        self._graphdef, self._state = nnx.split(rm)
        self.compilations = 0
        self.pad_id = int(pad_id if pad_id is not None else (tokenizer.pad_token_id or 0))
        impl = config.attention_impl
        self._impl = ("pallas" if use_pallas_default() else "reference") if impl == "auto" else impl
        self._prefill = counting(PREFILL, self)
        self._score = counting(SCORE, self)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Reward of each (prompt, response) pair, in input order."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        window = window_of(self.rm)
        for i, (prompt, response) in enumerate(pairs):
            head, tail = self.formatter.split(self.tokenizer, prompt, response)
            check_fits(len(head) + len(tail), window, what=f"reward-model input {i} (prompt + response)",
                       model="reward model", index=i,
                       fix="use a reward model with a longer window, shorter prompts, or a smaller max_new_tokens.")
            groups.setdefault(tuple(head), []).append((i, tail))
        out = np.zeros(len(pairs), np.float32)
        items = list(groups.items())
        # unshareable pairs each form their own group (empty prefix)
        flat: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]] = []
        for head, members in items:
            if head:
                flat.append((head, members))
            else:
                flat.extend(((), [m]) for m in members)
        flat.sort(key=lambda x: -len(x[1]))
        start = 0
        while start < len(flat):
            n = bucket(len(flat[start][1]))
            per_chunk = max(1, self.config.max_rows // n)
            chunk = flat[start:start + per_chunk]
            start += len(chunk)
            self._score_chunk(chunk, n, out)
        return out.tolist()

    def _score_chunk(self, chunk, n: int, out: np.ndarray) -> None:
        g = bucket(len(chunk))
        p = bucket(max(len(h) for h, _ in chunk), self.config.min_prefix_bucket)
        t = bucket(max(len(tail) for _, ms in chunk for _, tail in ms), self.config.min_suffix_bucket)
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
