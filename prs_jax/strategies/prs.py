"""Best-of-N (Rand, PRand, greedy) and PRS (preference-guided reflective sampling) on the tree engine.

PRS with layer widths [N0, N1, ...]: N0 drafts from (x, z); the global best so far gets ONE self-feedback from
the same policy (not counted in N); N1 refinements are drawn conditioned on (x, z, best, feedback); repeat per
layer; the answer is the argmax over all layers. All prompts of a batch advance layer by layer in batched
engine calls: the drafts of a prompt share its prompt KV, the refinements share the refinement prompt KV.

Modes: "conversation" appends the feedback request and the refinement request as further chat turns on the
best answer's own tree node (nothing before them is recomputed); "template" writes fresh prompts that quote
question, answer, preference and feedback, as the PRS paper's prompts do.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from prs_jax.strategies.base import PromptItem, Scorer, StrategyResult, join_preference, score_nodes
from prs_jax.strategies.templates import PRSTemplates, require_turn_text
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.tree import Node


def _policy_input(engine: TreeEngine, text: str):
    if engine.tokenizer is not None and getattr(engine.tokenizer, "chat_template", None):
        return [{"role": "user", "content": text}]
    return text


def _argmax(nodes: Sequence[Node]) -> Node:
    rewards = [n.reward if n.reward is not None else -np.inf for n in nodes]
    return nodes[int(np.argmax(rewards))]  # first maximum: earlier layers win ties


@dataclasses.dataclass(frozen=True)
class BestOfN:
    """Rand (x only), PRand (x and z) or greedy; best of `n` by the scorer."""

    n: int = 16
    variant: Literal["rand", "prand", "greedy"] = "rand"
    sampling: SamplingParams = SamplingParams(temperature=0.8, top_k=50)
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    default_preference: str | None = None

    def run(self, items: Sequence[PromptItem], engine: TreeEngine, scorer: Scorer) -> list[StrategyResult]:
        """Sample, score, select for a batch of prompts in one engine call."""
        if self.n <= 0:
            raise ValueError(f"BestOfN.n must be positive (got {self.n}).")
        texts = [it.prompt if self.variant == "rand" else
                 join_preference(it.prompt, it.preference or self.default_preference) for it in items]
        roots = engine.add_prompts([_policy_input(engine, t) for t in texts],
                                   metadata=[{"prompt_id": it.id} for it in items], ids=[it.id for it in items])
        n, params = (1, SamplingParams(greedy=True)) if self.variant == "greedy" else (self.n, self.sampling)
        kids = engine.expand(roots, n, params, max_new_tokens=self.max_new_tokens, stop=list(self.stop) or None)
        flat_items = [it for it, ks in zip(items, kids) for _ in ks]
        score_nodes(scorer, flat_items, [k for ks in kids for k in ks])
        out = []
        for it, root, ks in zip(items, roots, kids):
            for k in ks:
                k.metadata["layer"] = 0
            out.append(StrategyResult(item=it, root=root, selected=_argmax(ks), candidates=list(ks), layers=[ks],
                                      info={"strategy": self.variant, "n": n}))
        return out


@dataclasses.dataclass(frozen=True)
class PRS:
    """Preference-guided reflective sampling with per-layer widths (default [N/2, N/2])."""

    widths: tuple[int, ...] = (8, 8)
    feedback: bool = True
    mode: Literal["conversation", "template"] = "conversation"
    sampling: SamplingParams = SamplingParams(temperature=0.8, top_k=50)
    max_new_tokens: int = 256
    feedback_max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    templates: PRSTemplates = PRSTemplates()

    @classmethod
    def with_budget(cls, n: int, split: float = 0.5, depth: int = 2, **kw) -> "PRS":
        """Widths for a total budget n: first layer round(n * split), the rest spread over depth - 1 layers."""
        if depth < 1 or n < depth:
            raise ValueError(f"PRS.with_budget: need n >= depth >= 1 (got n={n}, depth={depth}).")
        if depth == 1:
            return cls(widths=(n,), **kw)
        first = min(max(1, round(n * split)), n - (depth - 1))
        rest = n - first
        tail = [rest // (depth - 1) + (1 if i < rest % (depth - 1) else 0) for i in range(depth - 1)]
        return cls(widths=(first, *tail), **kw)

    def run(self, items: Sequence[PromptItem], engine: TreeEngine, scorer: Scorer,
            first_layer: Sequence[Sequence[Node]] | None = None) -> list[StrategyResult]:
        """All prompts advance together, layer by layer. `first_layer` (per prompt, `widths[0]` draft nodes on
        this engine, children of one root each) reuses drafts made elsewhere, e.g. PRand's samples, so that two
        methods share their random numbers (a paired comparison); unscored drafts are scored here."""
        if not self.widths or any(w <= 0 for w in self.widths):
            raise ValueError(f"PRS.widths must be positive layer widths (got {self.widths}).")
        tpl = self.templates.resolved()
        stop = list(self.stop) or None
        prefs = [it.preference or tpl.default_preference for it in items]
        questions = [join_preference(it.prompt, z) for it, z in zip(items, prefs)]
        if first_layer is not None:
            if len(first_layer) != len(items) or any(len(ks) != self.widths[0] for ks in first_layer):
                raise ValueError(f"PRS.run: first_layer needs {self.widths[0]} drafts for each of the {len(items)} "
                                 f"prompts (got {[len(ks) for ks in first_layer]}).")
            if any(k.parent is None or k.parent is not ks[0].parent for ks in first_layer for k in ks):
                raise ValueError("PRS.run: the drafts of one prompt in first_layer must be children of one root.")
            drafts = [list(ks) for ks in first_layer]
            roots = [ks[0].parent for ks in drafts]
        else:
            roots = engine.add_prompts([_policy_input(engine, q) for q in questions],
                                       metadata=[{"prompt_id": it.id} for it in items],
                                       ids=[it.id for it in items])
            drafts = engine.expand(roots, self.widths[0], self.sampling, max_new_tokens=self.max_new_tokens,
                                   stop=stop)
        for ks in drafts:
            for k in ks:
                k.metadata["layer"] = 0
        todo = [(it, k) for it, ks in zip(items, drafts) for k in ks if k.reward is None]
        score_nodes(scorer, [it for it, _ in todo], [k for _, k in todo])
        layers = [[list(ks)] for ks in drafts]  # per prompt: list of layers
        extra: list[list[Node]] = [[] for _ in items]
        feedback_nodes: list[list[Node]] = [[] for _ in items]
        for depth, width in enumerate(self.widths[1:], start=1):
            best = [_argmax([c for layer in ls for c in layer]) for ls in layers]
            fbs: list[Node | None] = [None] * len(items)
            if self.feedback:
                if self.mode == "conversation":
                    asks = engine.append(best, [require_turn_text(engine.tokenizer, tpl.feedback_turn.format(
                        preference=z), b) for b, z in zip(best, prefs)])
                else:
                    asks = engine.add_prompts([_policy_input(engine, tpl.feedback_template.format(
                        question=q, answer=b.text, preference=z)) for q, b, z in zip(questions, best, prefs)],
                        ids=[it.id for it in items])
                    for e, a in zip(extra, asks):
                        e.append(a)
                fb_kids = engine.expand(asks, 1, self.sampling, max_new_tokens=self.feedback_max_new_tokens,
                                        stop=stop)
                fbs = [k[0] for k in fb_kids]
                for i, f in enumerate(fbs):
                    f.metadata.update(kind="feedback", layer=depth, on_node=best[i].id)
                    feedback_nodes[i].append(f)
            if self.mode == "conversation":
                parents = [f if f is not None else b for f, b in zip(fbs, best)]
                turn = [tpl.refine_turn if f is not None else tpl.refine_turn_no_feedback.format(preference=z)
                        for f, z in zip(fbs, prefs)]
                reqs = engine.append(parents, [require_turn_text(engine.tokenizer, t, p)
                                               for t, p in zip(turn, parents)])
            else:
                texts = [tpl.refine_template.format(question=q, answer=b.text, preference=z, feedback=f.text)
                         if f is not None else tpl.refine_template_no_feedback.format(question=q, answer=b.text,
                                                                                      preference=z)
                         for q, b, z, f in zip(questions, best, prefs, fbs)]
                reqs = engine.add_prompts([_policy_input(engine, t) for t in texts], ids=[it.id for it in items])
                for e, r in zip(extra, reqs):
                    e.append(r)
            kids = engine.expand(reqs, width, self.sampling, max_new_tokens=self.max_new_tokens, stop=stop)
            for i, ks in enumerate(kids):
                for k in ks:
                    k.metadata.update(layer=depth, refines=best[i].id, parent_reward=best[i].reward,
                                      feedback=fbs[i].text if fbs[i] is not None else None)
            score_nodes(scorer, [it for it, ks in zip(items, kids) for _ in ks], [k for ks in kids for k in ks])
            for ls, ks in zip(layers, kids):
                ls.append(list(ks))
        out = []
        for i, it in enumerate(items):
            cands = [c for layer in layers[i] for c in layer]
            out.append(StrategyResult(
                item=it, root=roots[i], selected=_argmax(cands), candidates=cands, layers=layers[i],
                extra_roots=extra[i],
                info={"strategy": "prs", "widths": list(self.widths), "feedback": self.feedback, "mode": self.mode,
                      "preference": prefs[i], "feedback_texts": [f.text for f in feedback_nodes[i]]}))
        return out


def improving_pairs(result: StrategyResult) -> list[dict]:
    """(x, z, best-so-far y*, feedback f, refinement y1) where R(y1) > R(y*): data for the refinement skill."""
    by_id = {c.id: c for c in result.candidates}
    out = []
    for c in result.candidates:
        parent_id = c.metadata.get("refines")
        if parent_id is None or parent_id not in by_id:
            continue
        parent = by_id[parent_id]
        if c.reward is not None and parent.reward is not None and c.reward > parent.reward:
            out.append({"prompt": result.item.prompt, "preference": result.info.get("preference"),
                        "draft": parent.text, "draft_reward": parent.reward,
                        "feedback": c.metadata.get("feedback"), "refinement": c.text, "refinement_reward": c.reward,
                        "layer": c.metadata.get("layer")})
    return out


def best_worst_pair(result: StrategyResult) -> dict | None:
    """A DPO pair (best vs worst candidate by reward) in TRL's prompt / chosen / rejected convention."""
    scored = [c for c in result.candidates if c.reward is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda c: c.reward)
    worst = min(scored, key=lambda c: c.reward)
    if best.reward == worst.reward:
        return None
    prompt = join_preference(result.item.prompt, result.info.get("preference") or result.item.preference)
    return {"prompt": prompt, "chosen": best.text, "rejected": worst.text, "margin": best.reward - worst.reward}
