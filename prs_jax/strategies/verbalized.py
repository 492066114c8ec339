"""Verbalized sampling (VS) and its baselines on the tree engine.

Methods, each with a budget of `n` responses per prompt (the number of model calls follows from n and k):

- "direct":      n samples of the plain prompt (one batched expansion, the siblings share the prompt KV).
- "cot":         n samples of "reason, then write `Final response: ...`"; the candidate is the answer part.
- "sequence":    ceil(n / k) samples of "write k different responses as a list" (JSON list, numbered-list
                 fallback); the last call asks for the remainder when k does not divide n.
- "multi_turn":  n chat turns: the prompt, then "another, different response" again and again. Each new user
                 turn is appended as fixed text on top of the previous generated node, so nothing before it is
                 recomputed.
- "vs_standard": ceil(n / k) samples of "k responses with their probabilities, as JSON".
- "vs_cot":      the same with a reasoning field before the responses.
- "vs_multi":    a first turn asking for k responses with probabilities, then further turns asking for k more
                 (chained like multi_turn) until n responses were asked for.

With `probability_upper_bound` set, the VS prompts say that every probability must stay below it (the paper's
diversity knob). After parsing (`vs_parse.parse_verbalized`), the post-hoc lower bound `tau` with
`min_survivors` and the `weight_mode` (elicited / softmax / uniform) turn the items of a prompt into a
distribution (`vs_parse.verbalized_distribution`); methods without probabilities get a uniform one.

Candidates. For "direct" and "multi_turn" a candidate IS the generated tree node. For the other methods a
generation holds several responses (or a reasoning part), so each parsed response becomes a DETACHED node:
`kind="generated"`, `text` = the response, `parent` = the generation node it was parsed from (it is not in that
node's `children`, and holds no tokens and no KV), `id` = the generation node's id (so `to_row`'s "node" points
at the generation), and `metadata` with the call, item index, written and repaired weight and probability.
When no response of a prompt could be parsed at all, the raw generations are the candidates
(metadata["parsed"] = False) so that every prompt still has a selection.

Selection. With a scorer every candidate is scored (one batched scorer call for the whole batch). `select`:
"reward" takes the highest reward among the candidates that survive tau (ties: the more probable); with no
scorer (scorer=None) it falls back to "probability", the argmax of the verbalised distribution; "sample" draws
from that distribution with a generator seeded by (`seed`, crc32 of the prompt id), so it does not depend on
batching.

Templates are our own wording. Placeholders: {prompt}, {k}, {upper_bound} (the bound sentence or nothing; if
a VS template lacks it and a bound is set, the sentence is appended), and {bound} inside "upper_bound". Any
template can be replaced via `templates={"vs_standard": "...", "cot": "@path/to/file.txt"}`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from prs_jax.models.tokenizer import has_chat_template
from prs_jax.strategies.base import PromptItem, Scorer, StrategyResult, join_preference, load_template, score_nodes
from prs_jax.strategies.templates import next_turn_text
from prs_jax.strategies.vs_parse import (
    WeightMode, jsonable, argmax_index, parse_verbalized, sample_index, split_reasoning, verbalized_distribution,
)
from prs_jax.tree.engine import TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.tree import Node

Method = Literal["direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi"]
METHODS: tuple[str, ...] = ("direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi")
VS_METHODS = ("vs_standard", "vs_cot", "vs_multi")

_JSON_ITEMS = '{"responses": [{"text": "<a response>", "probability": <a number from 0 to 1>}, ...]}'

DEFAULT_TEMPLATES: dict[str, str] = {
    "direct": "{prompt}",
    "cot": ("{prompt}\n\nBefore answering, reason about the request step by step. When you are done, write one "
            "line that starts with \"Final response:\" followed by your response, and nothing after it."),
    "sequence": ("{prompt}\n\nWrite {k} different responses to the request above. Reply with JSON only, shaped as "
                 "{\"responses\": [\"<first response>\", \"<second response>\", ...]}, holding exactly {k} "
                 "strings."),
    "multi_turn": "{prompt}",
    "multi_turn_next": ("Give me one more response to my original request, different from every response you "
                        "have already written."),
    "vs_standard": ("{prompt}\n\nDo not settle on a single response. Write {k} distinct possible responses to the "
                    "request above and give each the probability that you would produce it, so that together "
                    "they describe your distribution over responses.{upper_bound}\nReply with JSON only, in "
                    "exactly this shape:\n" + _JSON_ITEMS),
    "vs_cot": ("{prompt}\n\nDo not settle on a single response. First reason step by step about the different "
               "kinds of responses the request allows and how likely each is. Then write {k} distinct responses, "
               "each with the probability that you would produce it.{upper_bound}\nReply with JSON only, in "
               "exactly this shape:\n{\"reasoning\": \"<your step-by-step thinking>\", \"responses\": "
               "[{\"text\": \"<a response>\", \"probability\": <a number from 0 to 1>}, ...]}"),
    "vs_multi": ("{prompt}\n\nDo not settle on a single response. Write {k} distinct possible responses to the "
                 "request above and give each the probability that you would produce it.{upper_bound}\nReply "
                 "with JSON only, in exactly this shape:\n" + _JSON_ITEMS),
    "vs_multi_next": ("Write {k} more responses to the same request, each different from all the responses "
                      "above, again with the probability of each.{upper_bound}\nReply with JSON only, in the "
                      "same shape as before."),
    "upper_bound": " Take them from the tails of the distribution: each probability must be below {bound}.",
}



def chunk_sizes(n: int, k: int) -> list[int]:
    """How many responses each call asks for: k per call, the remainder in a last call (n=7, k=3 -> [3, 3, 1])."""
    return [k] * (n // k) + ([n % k] if n % k else [])


@dataclasses.dataclass(frozen=True)
class VerbalizedSampling:
    """Verbalized sampling and its baselines; see the module docstring for methods, candidates and selection."""

    method: Method = "vs_standard"
    k: int = 5
    n: int = 5
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=1.0)
    max_new_tokens: int = 512
    probability_upper_bound: float | None = None
    tau: float = 0.0
    min_survivors: int = 3
    weight_mode: WeightMode = "elicited"
    select: Literal["reward", "probability", "sample"] = "reward"
    seed: int = 0
    templates: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False, compare=False)
    answer_marker: str = "Final response:"
    use_chat: bool | None = None  # None: the chat template when the tokenizer has one

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"VerbalizedSampling.method must be one of {METHODS} (got {self.method!r}).")
        if self.k < 1 or self.n < 1:
            raise ValueError(f"VerbalizedSampling: k and n must be >= 1 (got k={self.k}, n={self.n}).")
        if self.max_new_tokens < 1:
            raise ValueError(f"VerbalizedSampling.max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        b = self.probability_upper_bound
        if b is not None and not 0 < b <= 1:
            raise ValueError(f"VerbalizedSampling.probability_upper_bound must be in (0, 1] or None (got {b}).")
        if not 0 <= self.tau <= 1:
            raise ValueError(f"VerbalizedSampling.tau must be in [0, 1] (got {self.tau}).")
        if self.min_survivors < 0:
            raise ValueError(f"VerbalizedSampling.min_survivors must be >= 0 (got {self.min_survivors}).")
        if self.weight_mode not in ("elicited", "softmax", "uniform"):
            raise ValueError(f"VerbalizedSampling.weight_mode must be 'elicited', 'softmax' or 'uniform' "
                             f"(got {self.weight_mode!r}).")
        if self.select not in ("reward", "probability", "sample"):
            raise ValueError(f"VerbalizedSampling.select must be 'reward', 'probability' or 'sample' "
                             f"(got {self.select!r}).")
        unknown = sorted(set(self.templates) - set(DEFAULT_TEMPLATES))
        if unknown:
            raise ValueError(f"VerbalizedSampling.templates: unknown template name(s) {unknown}; known: "
                             f"{sorted(DEFAULT_TEMPLATES)}.")

    # ------------------------------------------------------------------------------------------- prompts
    def resolved_templates(self) -> dict[str, str]:
        """Default templates with the overrides applied (`@file` values read from their files)."""
        return {**DEFAULT_TEMPLATES, **{k: load_template(v) for k, v in self.templates.items()}}

    def render(self, name: str, prompt: str = "", k: int | None = None,
               templates: Mapping[str, str] | None = None) -> str:
        """The text of template `name` for a prompt asking for k responses (the bound sentence included)."""
        tpl = templates if templates is not None else self.resolved_templates()
        text = tpl[name].replace("{prompt}", prompt).replace("{k}", str(self.k if k is None else k))
        bound = ""
        if self.probability_upper_bound is not None and name in ("vs_standard", "vs_cot", "vs_multi",
                                                                 "vs_multi_next"):
            bound = tpl["upper_bound"].replace("{bound}", f"{self.probability_upper_bound:g}")
        if "{upper_bound}" in text:
            return text.replace("{upper_bound}", bound)
        return text + bound

    def _chat(self, engine: TreeEngine) -> bool:
        has = engine.tokenizer is not None and has_chat_template(engine.tokenizer)
        if self.use_chat and not has:
            raise ValueError("VerbalizedSampling.use_chat=True but the engine's tokenizer has no chat template.")
        return has if self.use_chat is None else bool(self.use_chat)

    # ------------------------------------------------------------------------------------------- run
    def run(self, items: Sequence[PromptItem], engine: TreeEngine,
            scorer: Scorer | None = None) -> list[StrategyResult]:
        """Generate, parse, score (when a scorer is given) and select for a batch of prompts."""
        items = list(items)
        if not items:
            return []
        tpl = self.resolved_templates()
        chat = self._chat(engine)
        prompts = [join_preference(it.prompt, it.preference) for it in items]
        if self.method in ("multi_turn", "vs_multi"):
            gens = self._run_turns(items, prompts, engine, tpl, chat)
        else:
            gens = self._run_single(items, prompts, engine, tpl, chat)
        per_prompt = [self._candidates(g, engine) for g in gens]
        if scorer is not None:
            flat = [(it, c) for it, (cands, _) in zip(items, per_prompt) for c in cands]
            score_nodes(scorer, [it for it, _ in flat], [c for _, c in flat])
        return [self._result(it, g, cands, parsed, scorer is not None)
                for it, g, (cands, parsed) in zip(items, gens, per_prompt)]

    def _root_input(self, text: str, chat: bool) -> Any:
        return [{"role": "user", "content": text}] if chat else text

    def _run_single(self, items: list[PromptItem], prompts: list[str], engine: TreeEngine, tpl: dict[str, str],
                    chat: bool) -> list[dict]:
        """Direct, CoT, Sequence, VS-Standard, VS-CoT: one round of sibling samples per (prompt, ask size)."""
        if self.method in ("direct", "cot"):
            plan = [(self.n, 1)]  # (expansions, responses asked per call)
        else:
            sizes = chunk_sizes(self.n, self.k)
            plan = [(sizes.count(s), s) for s in dict.fromkeys(sizes)]
        gens = [{"root": None, "extra_roots": [], "calls": [], "stopped": None} for _ in items]
        for count, size in plan:
            roots = engine.add_prompts([self._root_input(self.render(self.method, p, size, tpl), chat)
                                        for p in prompts],
                                       metadata=[{"prompt_id": it.id, "method": self.method, "ask": size}
                                                 for it in items], ids=[it.id for it in items])
            kids = engine.expand(roots, count, self.sampling, max_new_tokens=self.max_new_tokens)
            for g, r, ks in zip(gens, roots, kids):
                if g["root"] is None:
                    g["root"] = r
                else:
                    g["extra_roots"].append(r)
                g["calls"].extend((k, size, 0) for k in ks)  # (generation node, responses asked, turn)
        return gens

    def _run_turns(self, items: list[PromptItem], prompts: list[str], engine: TreeEngine, tpl: dict[str, str],
                   chat: bool) -> list[dict]:
        """Multi-turn and VS-Multi: each turn one child of the previous turn's request node, all prompts batched."""
        if self.method == "multi_turn":
            sizes, first, nxt = [1] * self.n, "multi_turn", "multi_turn_next"
        else:
            sizes, first, nxt = chunk_sizes(self.n, self.k), "vs_multi", "vs_multi_next"
        window = int(engine.cfg.max_position_embeddings)
        first_texts = [self.render(first, p, sizes[0], tpl) for p in prompts]
        roots = engine.add_prompts([self._root_input(t, chat) for t in first_texts],
                                   metadata=[{"prompt_id": it.id, "method": self.method, "turn": 0} for it in items],
                                   ids=[it.id for it in items])
        gens = [{"root": r, "extra_roots": [], "calls": [], "stopped": None} for r in roots]
        history = [[{"role": "user", "content": t}] for t in first_texts]
        requests: list[Node | None] = list(roots)
        for turn, size in enumerate(sizes):
            active = [i for i, r in enumerate(requests) if r is not None]
            for i in list(active):  # turn 0 is checked by the engine (a prompt that does not fit is an error)
                if turn and requests[i].context_len + self.max_new_tokens > window:
                    gens[i]["stopped"] = f"turn {turn}: the context would exceed the model's window of {window}"
                    requests[i] = None
                    active.remove(i)
            if not active:
                break
            kids = engine.expand([requests[i] for i in active], 1, self.sampling, max_new_tokens=self.max_new_tokens)
            for i, ks in zip(active, kids):
                gens[i]["calls"].append((ks[0], size, turn))
                history[i].append({"role": "assistant", "content": ks[0].text})
            if turn + 1 == len(sizes):
                break
            user = self.render(nxt, "", sizes[turn + 1], tpl)
            appended, fresh = [], []
            for i, ks in zip(active, kids):
                history[i].append({"role": "user", "content": user})
                suffix = next_turn_text(engine.tokenizer, user, ks[0]) if chat else next_turn_text(None, user)
                if suffix is None:
                    fresh.append(i)
                    continue
                n_tok = len(engine.encode(suffix, special_tokens=False))
                if ks[0].context_len + n_tok + 1 + self.max_new_tokens > window:
                    gens[i]["stopped"] = f"turn {turn + 1}: the context would exceed the model's window of {window}"
                    requests[i] = None
                    continue
                appended.append((i, suffix))
            if appended:
                nodes = engine.append([gens[i]["calls"][-1][0] for i, _ in appended], [s for _, s in appended],
                                      metadata=[{"turn": turn + 1} for _ in appended])
                for (i, _), node in zip(appended, nodes):
                    requests[i] = node
            if fresh:  # the chat template rewrites earlier turns: render the whole conversation again
                msgs = [history[i] for i in fresh]
                too_long = [len(engine.encode(m)) + self.max_new_tokens > window for m in msgs]
                ok = [i for i, bad in zip(fresh, too_long) if not bad]
                for i, bad in zip(fresh, too_long):
                    if bad:
                        gens[i]["stopped"] = f"turn {turn + 1}: the context would exceed the model's window"
                        requests[i] = None
                if ok:
                    new_roots = engine.add_prompts([history[i] for i in ok],
                                                   metadata=[{"turn": turn + 1} for _ in ok],
                                                   ids=[items[i].id for i in ok])
                    for i, r in zip(ok, new_roots):
                        gens[i]["extra_roots"].append(r)
                        requests[i] = r
        return gens

    # ------------------------------------------------------------------------------------------- candidates
    def _candidates(self, gen: dict, engine: TreeEngine) -> tuple[list[Node], list[dict]]:
        """Candidate nodes of one prompt in generation order, and a JSON-ready parse report per generation."""
        cands: list[Node] = []
        reports: list[dict] = []
        for call, (node, asked, turn) in enumerate(gen["calls"]):
            base = {"method": self.method, "layer": turn, "turn": turn, "call": call, "source_node": node.id}
            if self.method in ("direct", "multi_turn"):
                node.metadata.update(base, item=0, raw_weight=None, weight=None, parsed=True)
                cands.append(node)
                continue
            if self.method == "cot":
                reasoning, answer = split_reasoning(node.text, self.answer_marker)
                cands.append(_detached(node, answer, {**base, "item": 0, "raw_weight": None, "weight": None,
                                                      "parsed": True, "reasoning": reasoning}))
                continue
            res = parse_verbalized(node.text, max_items=asked)
            reports.append({"node": node.id, "asked": asked, "turn": turn, **{
                k: v for k, v in res.to_dict().items() if k != "items"}, "n_items": len(res.items)})
            for j, it in enumerate(res.items):
                w = float(it.weight) if it.has_weight else None
                cands.append(_detached(node, it.text, {**base, "item": j, "raw_weight": jsonable(it.raw_weight),
                                                       "weight": w, "parsed": True}))
        if not cands:  # nothing parsed for this prompt: keep the raw generations so there is a selection
            for call, (node, _, turn) in enumerate(gen["calls"]):
                cands.append(_detached(node, node.text, {"method": self.method, "layer": turn, "turn": turn,
                                                         "call": call, "source_node": node.id, "item": 0,
                                                         "raw_weight": None, "weight": None, "parsed": False}))
        return cands, reports

    def _result(self, item: PromptItem, gen: dict, cands: list[Node], reports: list[dict],
                scored: bool) -> StrategyResult:
        weights = [c.metadata.get("weight") for c in cands]
        elicited = any(w is not None for w in weights)
        w = np.asarray([x if x is not None else 0.0 for x in weights], np.float64)
        mode = self.weight_mode if elicited else "uniform"
        dist = verbalized_distribution(w, tau=self.tau if elicited else 0.0, min_survivors=self.min_survivors,
                                       mode=mode)
        prob = {int(i): float(p) for i, p in zip(dist.indices, dist.probs)}
        for i, c in enumerate(cands):
            c.metadata["probability"] = prob.get(i)
        select = self.select if (scored or self.select != "reward") else "probability"
        if len(dist) == 0:
            chosen = 0
        elif select == "reward":
            survivors = [int(i) for i in dist.indices]
            chosen = max(survivors, key=lambda i: (_reward(cands[i]), prob[i], -i))
        elif select == "sample":
            chosen = sample_index(dist, np.random.default_rng([self.seed, zlib.crc32(item.id.encode())]))
        else:
            chosen = argmax_index(dist)
        layers: dict[int, list[Node]] = {}
        for c in cands:
            layers.setdefault(int(c.metadata.get("turn", 0)), []).append(c)
        info: dict[str, Any] = {
            "strategy": "verbalized", "method": self.method, "k": self.k, "n": self.n,
            "calls": len(gen["calls"]), "upper_bound": self.probability_upper_bound, "tau": self.tau,
            "weight_mode": mode, "selected_by": select, "selected_index": chosen,
            "distribution": {"order": [int(i) for i in dist.indices], "probs": [float(p) for p in dist.probs],
                             "filtered": [int(i) for i in dist.filtered]},
        }
        if reports:
            info["parses"] = reports
        if gen["stopped"]:
            info["stopped"] = gen["stopped"]
        return StrategyResult(item=item, root=gen["root"], selected=cands[chosen], candidates=cands,
                              layers=[layers[t] for t in sorted(layers)], extra_roots=gen["extra_roots"], info=info)


def _reward(node: Node) -> float:
    r = node.reward
    return r if r is not None and not math.isnan(r) else -math.inf


def _detached(source: Node, text: str, metadata: dict[str, Any]) -> Node:
    """A response parsed out of `source`: a node that points at it but is not part of the tree (no tokens, KV)."""
    return Node(id=source.id, kind="generated", tokens=[], parent=source, text=text,
                finish_reason=source.finish_reason, metadata=metadata)
