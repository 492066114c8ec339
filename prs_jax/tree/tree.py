"""The sampling tree: nodes are token segments appended to a parent; a node's context is its root-to-node path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Literal

NodeKind = Literal["prompt", "fixed", "generated"]
FinishReason = Literal["eos", "stop", "length"]


@dataclasses.dataclass(eq=False)
class Node:
    """A segment of tokens appended to `parent` (None for a root prompt)."""

    id: int
    kind: NodeKind
    tokens: list[int]
    parent: "Node | None" = None
    text: str = ""
    logprobs: list[float] | None = None  # per generated token, under the model's raw distribution
    finish_reason: FinishReason | None = None
    reward: float | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    children: list["Node"] = dataclasses.field(default_factory=list, repr=False)
    # Block table of this node's context in the engine's KV pool: page ids covering context positions 0 ..
    # context_len - 1, root first (the pages of its own tokens last; ancestors' pages shared, holding one
    # reference each). The first `kv_valid` of its own tokens have KV: len(tokens) or one less (a segment's
    # last token is computed when something is built on it). None: no KV (released). Managed by the engine.
    block_table: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)
    kv_valid: int = dataclasses.field(default=0, repr=False)
    # Position-stable identity for randomness: (root digest, (branch, child), ...) from the root. A root's digest
    # hashes its prompt id and tokens; each later element is (index of the child-making call on the parent,
    # child index). A child's sampling key is the seed's key folded with a hash of this path, so creation order
    # (ids) never enters. Managed by the engine; `branches` counts child-making calls (expand, append) so far.
    key_path: tuple = dataclasses.field(default=(), repr=False)
    branches: int = dataclasses.field(default=0, repr=False)

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def kv_len(self) -> int:
        return 0 if self.block_table is None else self.kv_valid

    def path(self) -> list["Node"]:
        """Nodes from the root to this node."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def context_tokens(self) -> list[int]:
        """All tokens from the root through this node."""
        return [t for n in self.path() for t in n.tokens]

    @property
    def context_len(self) -> int:
        return sum(len(n.tokens) for n in self.path())

    @property
    def root(self) -> "Node":
        return self.path()[0]

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.logprobs or ()))

    def to_dict(self, with_children: bool = True) -> dict[str, Any]:
        """JSON-ready dict (no KV)."""
        out: dict[str, Any] = {
            "id": self.id, "kind": self.kind, "parent": None if self.parent is None else self.parent.id,
            "text": self.text, "tokens": list(self.tokens), "logprobs": self.logprobs,
            "finish_reason": self.finish_reason, "reward": self.reward, "metadata": self.metadata,
        }
        if with_children:
            out["children"] = [c.to_dict() for c in self.children]
        return out


class Tree:
    """All nodes created by one engine; nodes get consecutive ids."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def add(self, kind: NodeKind, tokens: list[int], parent: Node | None, **fields: Any) -> Node:
        node = Node(id=len(self.nodes), kind=kind, tokens=list(tokens), parent=parent, **fields)
        self.nodes.append(node)
        if parent is not None:
            parent.children.append(node)
        return node

    def roots(self) -> list[Node]:
        return [n for n in self.nodes if n.parent is None]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def to_json(self, path: str | Path | None = None) -> str:
        """The forest as JSON (roots with nested children); written to `path` if given."""
        text = json.dumps([r.to_dict() for r in self.roots()], indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text


def render(node: Node, max_chars: int = 80) -> str:
    """A text picture of the subtree under `node`: kind, id, reward, finish reason and a text excerpt."""
    lines: list[str] = []

    def walk(n: Node, indent: str, last: bool, top: bool) -> None:
        text = n.text.replace("\n", "\\n")
        if len(text) > max_chars:
            text = text[: max_chars - 3] + "..."
        bits = [f"[{n.kind} #{n.id}]"]
        if n.reward is not None:
            bits.append(f"r={n.reward:.3f}")
        if n.finish_reason:
            bits.append(f"({n.finish_reason})")
        bits.append(repr(text))
        branch = "" if top else ("`-- " if last else "|-- ")
        lines.append(indent + branch + " ".join(bits))
        child_indent = indent if top else indent + ("    " if last else "|   ")
        for i, c in enumerate(n.children):
            walk(c, child_indent, i == len(n.children) - 1, False)

    walk(node, "", True, True)
    return "\n".join(lines)
