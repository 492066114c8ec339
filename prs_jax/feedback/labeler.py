"""The AI preference labeler (RLAIF): soft labels for response pairs from one forward pass per prompt.

Per pair and candidate order, the labeler prompt ends with the label ending; the distribution over positions is
the softmax of the log-probs of the label tokens ("1", "2") there. Position debiasing asks both orders and
averages by candidate identity, P(A) = (q_ab[0] + q_ba[1]) / 2. Chain of thought decodes a rationale on the tree
engine (greedy, bounded), appends it and the ending, and reads the labels; self-consistency samples k rationales
(temperature T, top-k 40) and averages the k distributions. Both orders of a pair share their common prompt
prefix on the tree, and the rationales of one order share that order's prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from prs_jax.config import check_ranges, require
from prs_jax.errors import ConfigError
from prs_jax.feedback.probs import debias, normalize, split_labels
from prs_jax.feedback.prompts import (
    PromptBuilder,
    PromptConfig,
    context_text,
    response_text,
)
from prs_jax.feedback.reader import (
    LabelQuery,
    LabelReader,
    ReaderConfig,
    encode_text,
    raw_lead,
    read_texts,
    share_prefixes,
)
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.tree import Node


@dataclasses.dataclass(frozen=True)
class LabelerConfig:
    """How pairs are labelled: prompt, labels, debiasing, chain of thought, self-consistency, batching."""

    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    labels: tuple[str, str] = ("1", "2")
    both_orders: bool = True  # position debiasing
    cot: bool = False
    cot_max_new_tokens: int = 512
    self_consistency: int = 1  # k rationales; 1 decodes greedily
    temperature: float = 0.7
    top_k: int = 40
    stop_at_ending: bool = True  # cut a rationale where the model starts writing the ending itself
    exclusive: bool = True  # labels that prefix other labels exclude those continuations (see probs.py)
    max_rows: int = 128
    min_row_bucket: int = 16
    min_prefix_bucket: int = 64
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"

    def __post_init__(self) -> None:
        check_ranges(self, "labeler", {"cot_max_new_tokens": ">= 1", "top_k": ">= 0", "max_rows": ">= 1",
                                       "min_row_bucket": ">= 1", "min_prefix_bucket": ">= 1"})
        require(self.temperature > 0, "labeler.temperature",
                "> 0 (it samples the self-consistency rationales; labeler.self_consistency=1 decodes greedily)",
                self.temperature)
        if self.self_consistency < 1:
            raise ConfigError(f"labeler.self_consistency must be >= 1 (got {self.self_consistency}).")
        if self.self_consistency > 1 and not self.cot:
            raise ConfigError("labeler.self_consistency > 1 samples rationales; it needs labeler.cot=true.")
        if len(set(self.labels)) != 2:
            raise ConfigError(f"labeler.labels must be two different strings (got {self.labels}).")


@dataclasses.dataclass
class Judgement:
    """One order of one pair: the distribution over positions (mean over rationales with CoT), each
    rationale's distribution and text, and the token ids each distribution was read after."""

    dist: np.ndarray
    samples: list[np.ndarray] = dataclasses.field(default_factory=list)
    rationales: list[str] = dataclasses.field(default_factory=list)
    contexts: list[list[int]] = dataclasses.field(default_factory=list, repr=False)


@dataclasses.dataclass
class PairLabel:
    """Soft label of a pair (A, B): P(A), P(B), and the raw judgements of each order."""

    p_a: float
    p_b: float
    ab: Judgement
    ba: Judgement | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: p_a, p_b, q_ab / q_ba (over positions 1, 2), and per-rationale data with CoT."""
        out: dict[str, Any] = {"p_a": self.p_a, "p_b": self.p_b, "q_ab": self.ab.dist.tolist(),
                               "q_ba": self.ba.dist.tolist() if self.ba is not None else None}
        for name, j in (("ab", self.ab), ("ba", self.ba)):
            if j is not None and j.rationales:
                out[f"rationales_{name}"] = list(j.rationales)
                out[f"samples_{name}"] = [s.tolist() for s in j.samples]
        return out


def kept_rationale(tokenizer: Any, node: Node) -> tuple[int, str]:
    """(generated tokens to keep, text they do not cover) for a rationale node: trailing tokens without text
    (EOS, end of turn) are dropped, and a stop-string cut inside a token leaves its covered text to re-encode."""
    toks, text = node.tokens, node.text

    def dec(k: int) -> str:
        return tokenizer.decode(toks[:k], skip_special_tokens=True)

    if dec(len(toks)) == text:
        k = len(toks)
    else:  # a stop string was cut off: the longest token prefix whose text the kept text starts with
        lo, hi = 0, len(toks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(dec(mid)):
                lo = mid
            else:
                hi = mid - 1
        k = lo
    covered = dec(k)
    while k > 0 and dec(k - 1) == covered:
        k -= 1
    return k, text[len(covered):]


class AILabeler:
    """Soft preference labels for (context, A, B) from a causal LM, on the tree engine."""

    def __init__(self, model: Any, tokenizer: Any, config: LabelerConfig = LabelerConfig()):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prompts = PromptBuilder.build(config.prompt, "pair", tokenizer)
        self.compilations = 0

    @classmethod
    def from_pretrained(cls, path: str, config: LabelerConfig = LabelerConfig(), dtype: str = "float32"
                        ) -> AILabeler:
        """A labeler on a local HF causal-LM checkpoint."""
        from prs_jax.models import load_causal_lm, load_tokenizer

        return cls(load_causal_lm(path, dtype=dtype), load_tokenizer(path), config)

    def input_tokens(self, context: Any, response_a: Any, response_b: Any) -> int:
        """An upper bound on the tokens the labeler reads for one pair (the longer order; with chain of thought
        the rationale budget and the ending after it), for the context-window check before any work."""
        c, tok = self.config, self.tokenizer
        x, a, b = context_text(context), response_text(response_a), response_text(response_b)
        lead = 0 if self.prompts.chat else len(raw_lead(tok))
        orders = [(a, b), (b, a)] if c.both_orders else [(a, b)]
        longest = max(len(encode_text(tok, self.prompts.render(x, [f, s], cot=c.cot))) for f, s in orders)
        extra = max(len(encode_text(tok, label)) for label in c.labels)  # the label read after the ending
        if c.cot:
            extra += c.cot_max_new_tokens + len(encode_text(tok, self.prompts.after_rationale()))
        return lead + longest + extra

    def _engine(self, seed: int) -> tuple[TreeEngine, LabelReader]:
        c = self.config
        engine = TreeEngine(self.model, self.tokenizer, seed=seed,
                            config=EngineConfig(attention_impl=c.attention_impl, min_prefix_bucket=c.min_prefix_bucket))
        return engine, LabelReader(engine, ReaderConfig(max_rows=c.max_rows, min_row_bucket=c.min_row_bucket))

    def label(self, contexts: Sequence[Any], responses_a: Sequence[Any], responses_b: Sequence[Any],
              seed: int = 0) -> list[PairLabel]:
        """Soft labels for pairs; contexts and responses are text or message lists. `seed` fixes the sampled
        rationales of self-consistency."""
        if not len(contexts) == len(responses_a) == len(responses_b):
            raise ValueError(f"label: {len(contexts)} contexts, {len(responses_a)} A and {len(responses_b)} B "
                             "responses; they must match.")
        ctx = [context_text(c) for c in contexts]
        a = [response_text(r) for r in responses_a]
        b = [response_text(r) for r in responses_b]
        groups = [[(x, ra, rb), (x, rb, ra)] if self.config.both_orders else [(x, ra, rb)]
                  for x, ra, rb in zip(ctx, a, b)]
        judged = self.judge(groups, seed)
        out = []
        for js in judged:
            if len(js) == 2:
                p_a, p_b = debias(js[0].dist, js[1].dist)
                out.append(PairLabel(p_a, p_b, js[0], js[1]))
            else:
                out.append(PairLabel(float(js[0].dist[0]), float(js[0].dist[1]), js[0]))
        return out

    def judge(self, groups: Sequence[Sequence[tuple[str, str, str]]], seed: int = 0) -> list[list[Judgement]]:
        """Distribution over positions for each (context, first, second) item; the items of one group share
        their common prompt prefix on the tree."""
        engine, reader = self._engine(seed)
        try:
            if self.config.cot:
                return self._judge_cot(engine, reader, groups)
            texts = [[self.prompts.render(x, [f, s]) for x, f, s in g] for g in groups]
            lps = read_texts(reader, texts, self.config.labels, chat=self.prompts.chat,
                             exclusive=self.config.exclusive)
            return [[Judgement(dist=normalize(lp)) for lp in g] for g in lps]
        finally:
            self.compilations += engine.compilations + reader.compilations

    def _judge_cot(self, engine: TreeEngine, reader: LabelReader, groups: Sequence[Sequence[tuple[str, str, str]]]
                   ) -> list[list[Judgement]]:
        c, tok = self.config, self.tokenizer
        lead = [] if self.prompts.chat else raw_lead(tok)
        seqs = [[lead + encode_text(tok, self.prompts.render(x, [f, s], cot=True)) for x, f, s in g] for g in groups]
        shared = share_prefixes(engine, seqs, min_tail=1)
        flat = [item for sh in shared for item in sh]
        fixed = engine.append([root for root, _, _ in flat], [tail for _, _, tail in flat])
        k = c.self_consistency
        sampling = SamplingParams(greedy=True) if k == 1 else SamplingParams(temperature=c.temperature,
                                                                             top_k=c.top_k)
        stop = [self.prompts.ending.strip()] if c.stop_at_ending else None
        kids = engine.expand(fixed, k, sampling, max_new_tokens=c.cot_max_new_tokens, stop=stop)
        queries = []
        for ks in kids:
            for kid in ks:
                kept, rest = kept_rationale(tok, kid)
                seg, labels = split_labels(lambda s: encode_text(tok, s), self.prompts.after_rationale(rest), c.labels)
                queries.append(LabelQuery(kid, kid.context_len - len(kid.tokens) + kept, encode_text(tok, seg), labels))
        lps = reader.log_probs(queries, c.exclusive)
        judgements, qi = [], 0
        for ks in kids:
            samples = [normalize(lp) for lp in lps[qi:qi + len(ks)]]
            contexts = [q.parent.context_tokens()[:q.keep] + q.tail for q in queries[qi:qi + len(ks)]]
            qi += len(ks)
            judgements.append(Judgement(dist=np.mean(samples, axis=0), samples=samples,
                                        rationales=[kid.text for kid in ks], contexts=contexts))
        out, i = [], 0
        for g in groups:
            out.append(judgements[i:i + len(g)])
            i += len(g)
        return out
