"""The strategy interface: prompts (+ optional preferences) in, trees and selected responses out.

A strategy expands trees on a `TreeEngine` and asks a `Scorer` for rewards. Scorers: a reward model
(`RewardModelScorer`, batched on the engine's scoring path), any Python callable (`CallableScorer`, e.g. a
gold reward), or an AI judge (added by the RLAIF code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from prs_jax.data.items import PromptItem  # noqa: F401  (re-exported: it lived here)
from prs_jax.models.window import ContextError
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.scoring import RewardScorer
from prs_jax.tree.tree import Node


@dataclasses.dataclass
class StrategyResult:
    """What a strategy returns for one prompt."""

    item: PromptItem
    root: Node  # the root of this prompt's tree (other roots, e.g. refinement prompts, hang off metadata)
    selected: Node  # the chosen response
    candidates: list[Node]  # every scored response, in generation order
    layers: list[list[Node]] = dataclasses.field(default_factory=list)  # candidates per layer (PRS)
    extra_roots: list[Node] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def reward(self) -> float:
        return float(self.selected.reward if self.selected.reward is not None else float("nan"))

    def local_ids(self) -> dict[int, int]:
        """Engine node id -> node number local to this prompt: the rank in creation order among the nodes of
        this prompt's trees (root and extra roots). Unlike engine ids it does not depend on which other prompts
        shared the engine (batch size, order, resume)."""
        ids: list[int] = []
        stack = [self.root, *self.extra_roots]
        while stack:
            n = stack.pop()
            ids.append(n.id)
            stack.extend(n.children)
        return {nid: i for i, nid in enumerate(sorted(set(ids)))}

    def to_row(self, with_tree: bool = False) -> dict[str, Any]:
        """A JSON-ready row: selected response, reward, candidates with rewards (and the tree if asked).

        Node numbers in the row ("node", tree "id"/"parent", metadata references) are local to the prompt
        (`local_ids`), so a row is the same whatever batch or process produced it."""
        ids = self.local_ids()
        info = _renumber_info(self.info, ids)
        row: dict[str, Any] = {
            "id": self.item.id, "prompt": self.item.prompt, "preference": self.item.preference,
            "response": self.selected.text, "reward": self.reward,
            "candidates": [{"text": c.text, "reward": c.reward, "layer": c.metadata.get("layer", 0),
                            "node": ids.get(c.id, c.id), "finish_reason": c.finish_reason}
                           for c in self.candidates],
            **({"info": info} if info else {}),
        }
        if with_tree:
            row["tree"] = [_renumber_tree(r.to_dict(), ids) for r in [self.root, *self.extra_roots]]
        return row


# metadata keys whose values are engine node ids (renumbered to prompt-local numbers in rows)
NODE_REF_KEYS = ("on_node", "refines", "source_node")


def _renumber_tree(d: dict[str, Any], ids: dict[int, int]) -> dict[str, Any]:
    d["id"] = ids.get(d["id"], d["id"])
    if d.get("parent") is not None:
        d["parent"] = ids.get(d["parent"], d["parent"])
    meta = d.get("metadata")
    if meta:
        d["metadata"] = {k: (ids.get(v, v) if k in NODE_REF_KEYS and isinstance(v, int) else v)
                         for k, v in meta.items()}
    for c in d.get("children", ()):
        _renumber_tree(c, ids)
    return d


def _renumber_info(info: dict[str, Any], ids: dict[int, int]) -> dict[str, Any]:
    """A copy of `info` with node ids in parse reports (verbalized sampling) made prompt-local."""
    if not isinstance(info.get("parses"), list):
        return info
    parses = [{**p, "node": ids.get(p["node"], p["node"])} if isinstance(p, dict) and isinstance(
        p.get("node"), int) else p for p in info["parses"]]
    return {**info, "parses": parses}


class Scorer(Protocol):
    """Rewards for responses to prompts (preferences passed along for scorers that use them)."""

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 preferences: Sequence[str | None]) -> list[float]: ...


@dataclasses.dataclass
class CallableScorer:
    """Wraps fn(prompt, response, preference) -> float (e.g. a gold reward)."""

    fn: Callable[[str, str, str | None], float]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 preferences: Sequence[str | None]) -> list[float]:
        return [float(self.fn(p, r, z)) for p, r, z in zip(prompts, responses, preferences)]


@dataclasses.dataclass
class RewardModelScorer:
    """A reward model on the batched shared-prefix scoring path. With `include_preference` the RM sees
    x and z joined like the policy does (per-prompt-preference settings); otherwise x only."""

    scorer: RewardScorer
    include_preference: bool = False

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 preferences: Sequence[str | None]) -> list[float]:
        texts = [join_preference(p, z) if self.include_preference else p for p, z in zip(prompts, preferences)]
        return self.scorer.score_pairs(list(zip(texts, responses)))


def join_preference(prompt: str, preference: str | None) -> str:
    """The policy input for (x, z): x, a blank line, z (x alone without a preference)."""
    return prompt if not preference else f"{prompt}\n\n{preference}"


def load_template(value: str) -> str:
    """A template given inline or as `@path/to/file.txt` (read from the file)."""
    if value.startswith("@"):
        return Path(value[1:]).read_text()
    return value


def score_nodes(scorer: Scorer, items: Sequence[PromptItem], nodes: Sequence[Node]) -> None:
    """Score `nodes[i]` as a response to `items[i]` and store the reward on each node."""
    if not nodes:
        return
    try:
        rewards = scorer([it.prompt for it in items], [n.text for n in nodes], [it.preference for it in items])
    except ContextError as e:
        if e.index is None or not 0 <= e.index < len(items):
            raise
        raise ContextError(f"prompt {items[e.index].id!r}: {e}", e.index) from None
    for n, r in zip(nodes, rewards):
        n.reward = float(r)


class Strategy(Protocol):
    """Runs on a batch of prompts with the policy engine and a scorer."""

    def run(self, items: Sequence[PromptItem], engine: TreeEngine, scorer: Scorer) -> list[StrategyResult]: ...
