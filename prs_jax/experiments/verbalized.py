"""Verbalized-sampling study (Zhang et al. 2025, arXiv 2510.01171): does asking for a verbalised distribution
recover the diversity that alignment takes away?

World source (the default). The world has a KNOWN base distribution p_base per category (prs_jax.world.behaviour
World.p_base): the policy's direct single-item answers were trained to sample it and its verbalised lists to
name k items with their renormalised p_base. Two parts, both measured before and after DPO:

1. The base distribution (`distribution`): on every single-item request of the world (category x wording),
   `samples` direct answers and as many verbalised lists (k in `list_ks`), each list giving one VS draw (an item
   drawn by its verbalised probabilities, keyed by seed, request, k and list index). Per request: KL(answers ||
   p_base) of Direct and of VS (the same plug-in estimator on the same number of usable answers in every arm),
   the normalised entropy, and the calibration of the verbalised probabilities (Pearson with the renormalised p_base of the listed items). The
   KL is over the USABLE answers (one item of the category; a parsed list); the usable share is its own column
   (an unusable answer is a failure to follow the format, not a draw from a distribution).
2. Diversity and quality on held-out prompts (`methods`): Direct, Sequence, Multi-turn, VS-Standard, VS-Multi
   (world templates, prs_jax.world.corpus.world_vs_templates; VS-CoT has no trained template and runs with the
   package default), every method with the same budget of `n` responses per prompt (x with z):
   - quality: mean gold reward r*(x, z, y); semantic diversity: 100 * mean over pairs of 1 - clip(cos, 0, 1)
     under prs_jax.eval.diversity.ModelEmbedder (the pre-DPO policy's mean-pooled hidden states: a WEAK
     embedder, only for comparing methods here); ROUGE-L (lower = more diverse) and distinct-2;
   - distinct item sets, item entropy (how evenly the category's items are named, / log 10), coverage@N (distinct
     item sets among the gold-optimal responses / min(N, the number of sets a gold-optimal answer can have)),
     optimal share, parse rate;
   - sweeps: k (responses per call) for `k_sweep_methods`, and the post-hoc lower bound tau on VS-Standard.

Mode collapse (`dpo`): DPO on TYPICALITY-BIASED labels (the paper's cause of mode collapse): pairs of the
policy's own direct answers to the single-item requests, the chosen one drawn by a Bradley-Terry model on
`typicality_alpha` * log p_base (the more typical item usually wins), a few steps at a high learning rate; then
both parts are measured again with the DPO policy. `labels: gold` is the older setting (best vs worst direct
sample by gold reward on training prompts), and the only one on real checkpoints (ranked by the RM).

`measure_study` writes OUT/records.jsonl (per phase, method and prompt / request: texts, rewards, weights,
metrics, sampled items, verbalised lists) and OUT/measure.json; `report_study` makes every table, figure and the
protocol's verdicts from them (per world seed and pooled over `pool_dirs`). Endpoints (`endpoint_units`, units =
single-item requests): kl_gap:PHASE (KL Direct - KL VS), kl_shift:METHOD (KL after DPO - before),
shift_gap (Direct's shift - VS's shift), calib:PHASE (per-request Pearson), entropy_gap:PHASE (VS - Direct).

Real source (`source.kind: real`): prompts from `source.real.prompt_set`, quality is the reward model's score (no
gold reward), coverage, optimal share and the base-distribution part are not defined; DPO pairs are ranked by
the RM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from prs_jax.eval.stats import mean_se
from prs_jax.experiments.common import Record, Source, measured_config, pool_measured
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.protocol import Protocol, pooled_ci, report_protocol
from prs_jax.models.sharding import MeshConfig
from prs_jax.strategies.base import PromptItem, join_preference

METHOD_LABELS = {"direct": "Direct", "cot": "CoT", "sequence": "Sequence", "multi_turn": "Multi-turn",
                 "vs_standard": "VS-Standard", "vs_cot": "VS-CoT", "vs_multi": "VS-Multi"}
SINGLE = ("direct", "multi_turn", "cot")  # one response per call
PHASES = ("sft", "dpo")
RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """DPO sharpening. `labels`: "typicality" (world: pairs of the policy's direct answers to the single-item
    requests, Bradley-Terry on typicality_alpha * log p_base) or "gold" (best vs worst of the policy's direct
    samples on training prompts by the gold reward / the RM)."""

    enabled: bool = True
    labels: Literal["typicality", "gold"] = "typicality"
    typicality_alpha: float = 5.0  # BT weight on log p_base (the paper estimates alpha ~ 0.57 on human ratings)
    pairs_per_request: int = 48  # typicality: answer pairs per single-item request
    prompts: int = 96  # gold: training prompts
    samples: int = 8  # gold: direct samples per training prompt
    temperature: float = 1.0
    steps: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.05
    loss: str = "sigmoid"
    methods: tuple[str, ...] = ("direct", "sequence", "multi_turn", "vs_standard", "vs_multi")


@dataclasses.dataclass(frozen=True)
class DistributionSettings:
    """The base-distribution part (world only): direct answers and verbalised lists on the single-item
    requests; `samples` direct answers per request and `samples` lists (split evenly over list_ks)."""

    enabled: bool = True
    samples: int = 240
    list_ks: tuple[int, ...] = (3, 4, 5)
    temperature: float = 1.0
    list_tokens: int = 48


@dataclasses.dataclass(frozen=True)
class Config:
    """The verbalized-sampling study (see the module docstring)."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/verbalized"
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig | None = None  # trainer mesh for the DPO run (real checkpoints on accelerators)
    progress: bool = True
    prompts: int = 48
    n: int = 6  # responses per prompt and method
    k: int = 3  # responses per call of the list methods
    methods: tuple[str, ...] = ("direct", "sequence", "multi_turn", "vs_standard", "vs_multi", "vs_cot")
    temperature: float = 0.7
    top_p: float = 1.0
    tokens_per_response: int = 40
    cot_tokens: int = 64  # extra budget for VS-CoT's reasoning
    batch: int = 24  # prompts per engine run
    k_sweep: tuple[int, ...] = (2, 3, 4, 6)
    k_sweep_n: int = 12
    k_sweep_methods: tuple[str, ...] = ("vs_standard", "sequence")
    taus: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4)
    min_survivors: int = 3
    embedder_model: str = ""  # default: the (pre-DPO) policy
    dpo: DPOSettings = DPOSettings()
    distribution: DistributionSettings = DistributionSettings()
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
    n_boot: int = 2000  # bootstrap resamples of the tables' 95% intervals

    def __post_init__(self) -> None:
        from prs_jax.strategies.verbalized import METHODS

        for key, ms in (("methods", self.methods), ("k_sweep_methods", self.k_sweep_methods),
                        ("dpo.methods", self.dpo.methods)):
            bad = [m for m in ms if m not in METHODS]
            if bad:
                raise ValueError(f"{key}: unknown method(s) {bad}; known: {list(METHODS)}.")
        if self.n < 2:
            raise ValueError(f"n must be >= 2 to measure diversity (got {self.n}).")
        d = self.distribution
        if d.enabled and (not d.list_ks or min(d.list_ks) < 2 or d.samples < len(d.list_ks)
                          or d.samples % len(d.list_ks)):
            raise ValueError(f"distribution: list_ks must be >= 2 and samples ({d.samples}) a positive multiple of "
                             f"their number ({len(d.list_ks)}): each k gets samples / len(list_ks) lists.")
        for e in self.protocol.endpoints:
            parse_endpoint(e.name)


# ------------------------------------------------------------------------------------------------ metrics
def optimal_set_count(x: str, z: str | None) -> int:
    """How many item sets a gold-optimal answer to (x, z) can have: n-subsets of the category's items holding
    every item to include and none to leave out."""
    from prs_jax.world.task import CATEGORIES, parse_preference, parse_prompt

    category, n, _ = parse_prompt(x)
    prefs = parse_preference(z)
    inc = {p.item for p in prefs if p.kind == "include"}
    exc = {p.item for p in prefs if p.kind == "exclude"}
    free = len(CATEGORIES[category]) - len(inc) - len(exc)
    return math.comb(free, n - len(inc)) if n >= len(inc) and free >= n - len(inc) else 0


def item_set(y: str) -> frozenset[str]:
    """The unordered set of known items an answer names."""
    from prs_jax.world.task import answer_items

    return frozenset(answer_items(y))


def prompt_metrics(texts: Sequence[str], rewards: Sequence[float], item: PromptItem | None, gold: bool,
                   n: int) -> dict[str, float]:
    """Quality, lexical and content diversity and coverage of one prompt's responses (see the module docstring)."""
    from prs_jax.eval.diversity import distinct_n, mean_pairwise_rouge_l

    out: dict[str, float] = {"responses": float(len(texts)),
                             "quality": float(np.mean(rewards)) if len(rewards) else math.nan,
                             "rouge_l": mean_pairwise_rouge_l(texts) if len(texts) > 1 else math.nan,
                             "distinct_2": distinct_n(texts, 2) if texts else math.nan,
                             "distinct_texts": len(set(texts)) / len(texts) if texts else math.nan}
    if gold and item is not None:
        sets = [item_set(t) for t in texts]
        optimal = [r >= 1.0 - 1e-9 for r in rewards]
        gt = optimal_set_count(item.prompt, item.preference)
        out["distinct_sets"] = len(set(sets)) / len(sets) if sets else math.nan
        out["optimal_share"] = float(np.mean(optimal)) if optimal else math.nan
        found = {s for s, o in zip(sets, optimal) if o}
        out["coverage"] = len(found) / min(n, gt) if gt else math.nan
        out["item_entropy"] = item_entropy(item.prompt, texts)
    return out


def item_entropy(x: str, texts: Sequence[str]) -> float:
    """Entropy of how often each of the category's items is named across the responses, over log(category
    size): 1 when every item is named equally often, low when the responses keep naming the popular few (the
    world's mode collapse); NaN when no on-topic item is named."""
    from prs_jax.world.task import CATEGORIES, CATEGORY_OF, answer_items, parse_prompt

    category, _, _ = parse_prompt(x)
    counts: dict[str, int] = {}
    for t in texts:
        for i in answer_items(t):
            if CATEGORY_OF[i] == category:
                counts[i] = counts.get(i, 0) + 1
    total = sum(counts.values())
    if not total:
        return math.nan
    p = np.asarray(list(counts.values()), np.float64) / total
    return float(-(p * np.log(p)).sum() / math.log(len(CATEGORIES[category])))


def aggregate(per_prompt: Sequence[dict[str, float]], semantic: Sequence[float]) -> dict[str, Any]:
    """Means over prompts (and standard errors of quality and semantic diversity)."""
    keys = sorted({k for row in per_prompt for k in row})
    out: dict[str, Any] = {}
    for k in keys:
        vals = [row[k] for row in per_prompt if k in row and not math.isnan(row[k])]
        out[k] = float(np.mean(vals)) if vals else math.nan
    q = [row["quality"] for row in per_prompt if not math.isnan(row["quality"])]
    out["quality_se"] = mean_se(q)[1] if q else math.nan
    sem = [s for s in semantic if not math.isnan(s)]
    out["semantic"], out["semantic_se"] = mean_se(sem) if sem else (math.nan, math.nan)
    return out


# ------------------------------------------------------------------------------------------------ base distribution
def request_id(p: Any) -> str:
    """The stable id of a single-item request: category/wording."""
    return f"{p.category}/{p.form}"


def list_distribution(text: str, base: dict[str, float], k: int) -> list[tuple[str, float]] | None:
    """(item, verbalised probability) of a single-item verbalised list of the k answers asked for, or None when
    it is not one: k lines, each naming one distinct item of the category with a written probability in (0, 1],
    summing to 1 within 0.1 (whole-percent rounding)."""
    from prs_jax.strategies.vs_parse import parse_verbalized, weight_value
    from prs_jax.world.task import answer_items

    parsed = parse_verbalized(text)
    out: list[tuple[str, float]] = []
    for it in parsed.items:
        names = answer_items(it.text)
        p, _ = weight_value(it.raw_weight)
        if len(names) != 1 or names[0] not in base or not (0.0 < p <= 1.0):
            return None
        out.append((names[0], p))
    if len(out) != k or len({i for i, _ in out}) != k or abs(sum(p for _, p in out) - 1.0) > 0.1:
        return None
    return out


def single_item(text: str, base: dict[str, float]) -> str | None:
    """The item of a direct single-item answer, or None when it does not name exactly one item of the category."""
    from prs_jax.world.task import answer_items

    items = answer_items(text)
    return items[0] if len(items) == 1 and items[0] in base else None


def vs_draw(lst: list[tuple[str, float]] | None, seed: int, rid: str, k: int, j: int) -> str | None:
    """One VS draw from a verbalised list: an item with probability proportional to its verbalised probability
    (keyed by seed, request, k and list index)."""
    if not lst:
        return None
    p = np.asarray([x for _, x in lst], np.float64)
    rng = np.random.default_rng([seed, zlib.crc32(rid.encode()), k, j])
    return lst[int(rng.choice(len(lst), p=p / p.sum()))][0]


def kl_to_base(items: Sequence[str | None], base: dict[str, float]) -> float:
    """Plug-in KL(empirical distribution of the usable answers || p_base) in nats; unusable answers (None) are left
    out (their share is reported separately as "usable answers"); NaN when none is usable."""
    vals = [x for x in items if x is not None and x in base]
    if not vals:
        return math.nan
    q = np.array([sum(x == i for x in vals) for i in base], np.float64) / len(vals)
    pb = np.array([base[i] for i in base])
    nz = q > 0
    return float(np.sum(q[nz] * np.log(q[nz] / pb[nz])))


def norm_entropy(items: Sequence[str | None], base: dict[str, float]) -> float:
    """Entropy of the valid answers' item frequencies / log(category size) (1: every item equally often)."""
    vals = [x for x in items if x is not None]
    if not vals:
        return math.nan
    _, c = np.unique(vals, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(base)))


def measure_distribution(env: StudyEnv, model: Any, world: Any, d: DistributionSettings, seed: int, phase: str
                         ) -> list[dict[str, Any]]:
    """Per single-item request: `d.samples` direct answers and as many verbalised lists (one VS draw each);
    records of kind "dist" (method direct / vs: the sampled items, None for an unusable answer) and "lists" (the
    parsed lists)."""
    from prs_jax.tree.sampling import SamplingParams
    from prs_jax.world.corpus import VS_SUFFIX, single_requests

    reqs = single_requests()
    per_k = d.samples // len(d.list_ks)
    samp = SamplingParams(temperature=d.temperature)
    engine = env.engine(seed, model=model)
    rows: list[dict[str, Any]] = []
    roots = engine.add_prompts([[{"role": "user", "content": s.x}] for s in reqs],
                               ids=[request_id(s) for s in reqs])
    direct = engine.expand(roots, d.samples, samp, max_new_tokens=8)
    for s, ks in zip(reqs, direct):
        base = world.p_base(s.category)
        rows.append({"kind": "dist", "phase": phase, "method": "direct", "request": request_id(s),
                     "category": s.category, "items": [single_item(k.text, base) for k in ks]})
    engine.release(list(engine.tree))
    pairs = [(s, k) for s in reqs for k in d.list_ks]
    roots = engine.add_prompts([[{"role": "user", "content": s.x + VS_SUFFIX.format(k=k)}] for s, k in pairs],
                               ids=[f"{request_id(s)}/vs{k}" for s, k in pairs])
    lists = engine.expand(roots, per_k, samp, max_new_tokens=d.list_tokens)
    by_req: dict[str, dict[str, Any]] = {}
    for (s, k), ks in zip(pairs, lists):
        base = world.p_base(s.category)
        rid = request_id(s)
        r = by_req.setdefault(rid, {"kind": "lists", "phase": phase, "request": rid, "category": s.category,
                                    "lists": [], "draws": []})
        for j, c in enumerate(ks):
            lst = list_distribution(c.text, base, k)
            r["lists"].append({"k": k, "items": lst, "text": c.text if lst is None else None})
            r["draws"].append(vs_draw(lst, seed, rid, k, j))
    engine.release(list(engine.tree))
    env.compilations += engine.compilations
    for rid, r in by_req.items():
        rows.append({"kind": "dist", "phase": phase, "method": "vs", "request": rid, "category": r["category"],
                     "items": r.pop("draws")})
        rows.append(r)
    return rows


def calibration_points(lists_row: dict[str, Any], base: dict[str, float]) -> tuple[list[float], list[float]]:
    """(verbalised, true renormalised p_base) of every item of one request's parsed lists."""
    verb, true = [], []
    for lst in lists_row["lists"]:
        if lst["items"]:
            z = sum(base[i] for i, _ in lst["items"])
            verb += [p for _, p in lst["items"]]
            true += [base[i] / z for i, _ in lst["items"]]
    return verb, true


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def typicality_label(a: str, b: str, base: dict[str, float], alpha: float, seed: int, rid: str, j: int
                     ) -> tuple[str, str, bool] | None:
    """(chosen, rejected, whether the more typical answer was chosen) of two direct answers, or None unless both
    name distinct items of the category: a Bradley-Terry draw on alpha * (log p_base(a) - log p_base(b)), keyed by
    (seed, request, pair index)."""
    ia, ib = single_item(a, base), single_item(b, base)
    if ia is None or ib is None or ia == ib:
        return None
    logit = alpha * (math.log(base[ia]) - math.log(base[ib]))
    u = np.random.default_rng([seed, zlib.crc32(rid.encode()), j]).random()
    first = bool(u < 1.0 / (1.0 + math.exp(-logit)))
    return (a, b, base[ia] >= base[ib]) if first else (b, a, base[ib] >= base[ia])


def typicality_pairs(env: StudyEnv, model: Any, world: Any, cfg: Config) -> list[dict[str, Any]]:
    """DPO rows from the policy's own direct answers to the single-item requests: consecutive answers form a
    pair when both name distinct items of the category; the chosen one is drawn by a Bradley-Terry model on
    typicality_alpha * log p_base (keyed by seed, request and pair index)."""
    from prs_jax.tree.sampling import SamplingParams
    from prs_jax.world.corpus import single_requests

    d = cfg.dpo
    reqs = single_requests()
    engine = env.engine(cfg.seed + 7919, model=model)
    roots = engine.add_prompts([[{"role": "user", "content": s.x}] for s in reqs], ids=[request_id(s) for s in reqs])
    kids = engine.expand(roots, 2 * d.pairs_per_request, SamplingParams(temperature=d.temperature),
                         max_new_tokens=8)
    rows = []
    for s, ks in zip(reqs, kids):
        base = world.p_base(s.category)
        rid = request_id(s)
        for j in range(d.pairs_per_request):
            label = typicality_label(ks[2 * j].text, ks[2 * j + 1].text, base, d.typicality_alpha, cfg.seed, rid, j)
            if label is None:
                continue
            chosen, rejected, typical = label
            rows.append({"id": f"{rid}/{j}", "prompt": [{"role": "user", "content": s.x}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "typical_chosen": typical})
    engine.release(list(engine.tree))
    env.compilations += engine.compilations
    return rows


# ------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class Setting:
    """Policy, prompts, how responses are scored (gold or RM), the VS templates, the DPO training prompts."""

    policy: str
    items: list[PromptItem]
    dpo_items: list[PromptItem]
    score: Callable[[Sequence[PromptItem], Sequence[str]], list[float]]
    gold: bool
    templates: dict[str, str]


def _setting(cfg: Config, env: StudyEnv) -> Setting:
    """Prompts and scoring from the study env: world held-out prompts scored by the gold reward, DPO prompts from
    its RM-training prompts; real: the prompt set (the first `prompts`, then the DPO ones) scored by the RM."""
    if env.kind == "world":
        from prs_jax.world.task import split_query

        items = env.heldout(cfg.prompts, strict=False)
        dpo_items, seen = [], set()
        for line in (env.world.data / "rm_train.jsonl").read_text().splitlines():
            if len(dpo_items) >= cfg.dpo.prompts:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            q = row["prompt"][0]["content"]
            if q in seen:
                continue
            seen.add(q)
            x, z = split_query(q)
            dpo_items.append(PromptItem(str(row.get("id", len(dpo_items))), x, z))
        gold = env.gold

        def score(its: Sequence[PromptItem], texts: Sequence[str]) -> list[float]:
            return [gold(it.prompt, t, it.preference) for it, t in zip(its, texts)]

        return Setting(str(env.policy), items, dpo_items, score, True, env.vs_templates)

    items = env.real_prompts(cfg.prompts + cfg.dpo.prompts)

    def score(its: Sequence[PromptItem], texts: Sequence[str]) -> list[float]:
        return [float(r) for r in env.proxy([it.prompt for it in its], list(texts), [it.preference for it in its])]

    return Setting(str(env.policy), items[:cfg.prompts], items[cfg.prompts:], score, False, {})


def run_method(cfg: Config, setting: Setting, env: StudyEnv, model: Any, method: str, k: int, n: int,
               seed: int) -> list[dict[str, Any]]:
    """Run one method on every prompt; per prompt the responses (at most n), their weights and parse flags."""
    from prs_jax.strategies.generate import StrategyConfig
    from prs_jax.tree.sampling import SamplingParams

    single = method in ("direct", "multi_turn", "cot")
    budget = cfg.tokens_per_response * (1 if single else k) + (8 * k if method.startswith("vs") else 0)
    if method in ("vs_cot", "cot"):
        budget += cfg.cot_tokens
    spec = StrategyConfig.of("vs", n, SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p),
                             vs_method=method, k=k, max_new_tokens=budget)
    vs = spec.build(templates=setting.templates, min_survivors=cfg.min_survivors, select="probability", seed=seed)
    out = []
    for s in range(0, len(setting.items), cfg.batch):
        results = vs.run(setting.items[s:s + cfg.batch], env.engine(seed, model=model), scorer=None)  # keyed by item id
        for r in results:
            cands = r.candidates[:n]
            out.append({"texts": [c.text for c in cands],
                        "weights": [c.metadata.get("weight") for c in cands],
                        "parsed": [bool(c.metadata.get("parsed", False)) for c in cands],
                        "raw": r.candidates[0].parent.text if r.candidates and r.candidates[0].parent is not None
                        and not r.candidates[0].tokens else None})
    return out


def method_records(setting: Setting, gens: Sequence[dict[str, Any]], embedder: Any, n: int, phase: str,
                   method: str, k: int, sweep: str) -> list[dict[str, Any]]:
    """One record per prompt of one method's generations: texts, rewards (every response scored), verbalised
    weights, parse flags, the semantic diversity and prompt_metrics."""
    from prs_jax.eval.diversity import semantic_diversity_groups

    flat_items = [it for it, g in zip(setting.items, gens) for _ in g["texts"]]
    flat = [t for g in gens for t in g["texts"]]
    rewards = setting.score(flat_items, flat) if flat else []
    _, semantic = semantic_diversity_groups([g["texts"] for g in gens], embedder)
    rows, i = [], 0
    for it, g, sem in zip(setting.items, gens, semantic):
        r = [float(x) for x in rewards[i:i + len(g["texts"])]]
        i += len(g["texts"])
        rows.append({"kind": "prompt", "phase": phase, "sweep": sweep, "method": method, "k": k, "n": n,
                     "id": it.id, "prompt": it.prompt, "preference": it.preference, "texts": g["texts"],
                     "rewards": r, "weights": g["weights"], "parsed": g["parsed"], "semantic": sem,
                     "metrics": prompt_metrics(g["texts"], r, it, setting.gold, n)})
    return rows


def gold_pairs(cfg: Config, setting: Setting, env: StudyEnv, model: Any) -> tuple[list[dict[str, Any]], float]:
    """DPO rows: best vs worst (by the gold reward / the RM) of the policy's direct samples on training prompts,
    and the mean reward gap of the prompts whose samples differ."""
    from prs_jax.tree.sampling import SamplingParams

    d = cfg.dpo
    items = setting.dpo_items
    if not items:
        raise ValueError("verbalized: no DPO training prompts (world: rm_train.jsonl; real: prompts beyond "
                         "`prompts` in the prompt set).")
    texts: list[list[str]] = []
    for s in range(0, len(items), cfg.batch):
        engine = env.engine(cfg.seed + 7919, model=model)  # keyed by item id and path: cfg.batch changes nothing
        roots = engine.add_prompts([[{"role": "user", "content": join_preference(it.prompt, it.preference)}]
                                    for it in items[s:s + cfg.batch]], ids=[it.id for it in items[s:s + cfg.batch]])
        kids = engine.expand(roots, d.samples, SamplingParams(temperature=d.temperature),
                             max_new_tokens=cfg.tokens_per_response)
        texts += [[c.text for c in ks] for ks in kids]
    flat_items = [it for it, ts in zip(items, texts) for _ in ts]
    rewards = setting.score(flat_items, [t for ts in texts for t in ts])
    rows, gaps, i = [], [], 0
    for it, ts in zip(items, texts):
        r = rewards[i:i + len(ts)]
        i += len(ts)
        if max(r) > min(r):
            gaps.append(max(r) - min(r))
        keep = [j for j, t in enumerate(ts) if t.strip()]  # an empty sample is no response to train on
        if len(keep) < 2:
            continue
        best = max(keep, key=lambda j: r[j])
        worst = min(keep, key=lambda j: r[j])
        if r[best] == r[worst]:
            continue
        rows.append({"id": it.id, "prompt": [{"role": "user", "content": join_preference(it.prompt, it.preference)}],
                     "chosen": [{"role": "assistant", "content": ts[best]}],
                     "rejected": [{"role": "assistant", "content": ts[worst]}]})
    return rows, float(np.mean(gaps)) if gaps else math.nan


def dpo_sharpen(cfg: Config, setting: Setting, env: StudyEnv, model: Any, work: Path, console: Console
                ) -> tuple[str, dict[str, Any]]:
    """DPO on the configured labels (typicality-biased pairs or best-vs-worst); returns the exported policy
    directory and a summary (pairs, label facts, trainer metrics)."""
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    d = cfg.dpo
    summary: dict[str, Any] = {"labels": d.labels}
    if d.labels == "typicality":
        rows = typicality_pairs(env, model, env.world.world(), cfg)
        summary["typical_chosen"] = float(np.mean([r["typical_chosen"] for r in rows])) if rows else math.nan
        rows = [{k: v for k, v in r.items() if k != "typical_chosen"} for r in rows]
    else:
        rows, gap = gold_pairs(cfg, setting, env, model)
        summary["mean_gold_gap" if setting.gold else "mean_rm_gap"] = gap
    if not rows:
        raise ValueError(f"verbalized: DPO ({d.labels} labels) found no usable pair; raise dpo.pairs_per_request "
                         "or dpo.samples.")
    path = work / "dpo_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    console.print(f"verbalized: DPO on {len(rows)} {d.labels} pairs ({d.steps} steps, lr {d.lr}, beta {d.beta})",
                  markup=False)
    run_cfg = TrainRunConfig(
        model=setting.policy, dtype=cfg.dtype,
        data=DataConfig(train=str(path), max_length=192, max_prompt_length=None, use_chat_template=True,
                        pad_multiple=32, on_too_long="drop"),
        loss=LossConfig(name=d.loss, beta=d.beta),
        optim=OptimConfig(lr=d.lr, warmup_steps=2, schedule="constant"),
        trainer=TrainerConfig(out_dir=str(work / "dpo"), steps=d.steps, batch_size=d.batch_size, seed=cfg.seed,
                              log_every=5, progress=cfg.progress, async_checkpoint=False, tensorboard=False,
                              mesh=cfg.mesh),
        precompute_ref=True, ref_cache_dir=str(work / "ref_cache"), export_dir=str(work / "dpo_policy"))
    summary["final_metrics"] = run_train("dpo", run_cfg, console=console)
    summary["pairs"] = len(rows)
    return str(work / "dpo_policy"), summary


# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "pool_dirs", "protocol", "n_boot", "progress")


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure both parts before and after DPO; writes OUT/records.jsonl and OUT/measure.json. No tables."""
    from prs_jax.config import to_dict
    from prs_jax.data.io import write_jsonl, write_text_atomic
    from prs_jax.eval.diversity import ModelEmbedder
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    out = Path(cfg.out_dir)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # real: quality is the RM's score of (x, z, y); the policy loads in the study's dtype, the RM in the source's
    env = StudyEnv.from_source(cfg.source, console, study="verbalized",
                               require=("policy", "reward_model", "prompts_path"), rm_include_preference=True)
    if env.kind != "world" and cfg.dpo.enabled and cfg.dpo.labels == "typicality":
        raise ValueError("dpo.labels: typicality needs the world's known p_base; use dpo.labels: gold on real "
                         "checkpoints (pairs ranked by the reward model).")
    setting = _setting(cfg, env)
    model = env.load_policy(dtype=cfg.dtype)
    tok = env.tokenizer
    emb_path = cfg.embedder_model or setting.policy
    embedder = ModelEmbedder(model if emb_path == setting.policy else load_causal_lm(emb_path, dtype=cfg.dtype),
                             tok if emb_path == setting.policy else load_tokenizer(emb_path))
    world = env.world.world() if env.kind == "world" else None
    console.print(f"verbalized: {len(cfg.methods)} methods x {len(setting.items)} prompts x n={cfg.n} (k={cfg.k})"
                  + (f"; base distribution: {cfg.distribution.samples} answers and lists per single-item request"
                     if world is not None and cfg.distribution.enabled else ""), markup=False)
    records: list[dict[str, Any]] = []

    def run_phase(m: Any, methods: Sequence[str], phase: str) -> None:
        for method in methods:
            gens = run_method(cfg, setting, env, m, method, cfg.k, cfg.n, cfg.seed)
            rows = method_records(setting, gens, embedder, cfg.n, phase, method, cfg.k, "main")
            records.extend(rows)
            q = np.nanmean([r["metrics"]["quality"] for r in rows]) if rows else math.nan
            console.print(f"  [{phase}] {METHOD_LABELS[method]}: quality {q:.3f}", markup=False)
        if world is not None and cfg.distribution.enabled:
            t1 = time.perf_counter()
            records.extend(measure_distribution(env, m, world, cfg.distribution, cfg.seed, phase))
            timings[f"distribution_{phase}_s"] = time.perf_counter() - t1

    timings["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_phase(model, cfg.methods, "sft")
    timings["methods_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for method in cfg.k_sweep_methods:
        for k in cfg.k_sweep:
            gens = run_method(cfg, setting, env, model, method, k, cfg.k_sweep_n, cfg.seed + 1)
            records.extend(method_records(setting, gens, embedder, cfg.k_sweep_n, "sft", method, k, "k"))
    timings["k_sweep_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dpo_summary: dict[str, Any] | None = None
    if cfg.dpo.enabled:
        dpo_dir, dpo_summary = dpo_sharpen(cfg, setting, env, model, work, console)
        run_phase(load_causal_lm(dpo_dir, dtype=cfg.dtype), cfg.dpo.methods, "dpo")
    timings["dpo_s"] = time.perf_counter() - t0
    write_jsonl(out / RECORDS, records)
    wrep = None if env.world is None else {"key": env.world.report.get("key"), "root": str(env.world.root),
                                           "seed": env.world.config.seed}
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind, "gold": setting.gold,
             "prompts": len(setting.items), "world": wrep, "world_seed": None if wrep is None else wrep["seed"],
             "p_base": None if world is None else {c: world.p_base(c) for c in
                                                   sorted({r["category"] for r in records if "category" in r})},
             "dpo": dpo_summary, "timings": timings, "compilations": env.compilations,
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2, default=str))
    return out


# ------------------------------------------------------------------------------------------------ report
def method_summary(rows: Sequence[dict[str, Any]], n: int, single: bool) -> dict[str, Any]:
    """Aggregate metrics of one (phase, method, sweep) from its per-prompt records (pure)."""
    agg = aggregate([r["metrics"] for r in rows], [r["semantic"] for r in rows])
    agg["parse_rate"] = 1.0 if single else float(np.mean([sum(r["parsed"]) / n for r in rows])) if rows else math.nan
    agg["example"] = rows[0]["texts"][:3] if rows else []
    return agg


def tau_sweep(rows: Sequence[dict[str, Any]], taus: Sequence[float], min_survivors: int, n: int, gold: bool
              ) -> dict[str, dict[str, float]]:
    """Post-hoc lower bound tau on the verbalised probabilities of VS-Standard's per-prompt records: survivors,
    their quality and diversity, and the expected reward of one draw from the resulting distribution."""
    from prs_jax.strategies.vs_parse import verbalized_distribution

    out = {}
    for tau in taus:
        per, expected, survivors = [], [], []
        for r in rows:
            if not r["texts"]:
                continue
            w = np.asarray([x if x is not None else 0.0 for x in r["weights"]], np.float64)
            has = any(x is not None for x in r["weights"])
            dist = verbalized_distribution(w, tau=tau if has else 0.0, min_survivors=min_survivors,
                                           mode="elicited" if has else "uniform")
            idx = [int(j) for j in dist.indices]
            texts = [r["texts"][j] for j in idx]
            rewards = [r["rewards"][j] for j in idx]
            survivors.append(len(idx))
            expected.append(float(np.dot(dist.probs, rewards)) if idx else math.nan)
            per.append(prompt_metrics(texts, rewards, PromptItem(r["id"], r["prompt"], r["preference"]), gold, n))
        agg = aggregate(per, [])
        out[f"{tau:g}"] = {"tau": tau, "survivors": float(np.mean(survivors)),
                           "expected_reward": float(np.nanmean(expected)),
                           **{k: agg[k] for k in ("quality", "rouge_l", "distinct_sets", "item_entropy", "coverage")
                              if k in agg}}
    return out


ENDPOINT_KINDS = ("kl_gap", "kl_shift", "shift_gap", "calib", "entropy_gap")


def parse_endpoint(name: str) -> tuple[str, str | None]:
    """(kind, argument) of an endpoint name (see endpoint_units)."""
    kind, _, arg = name.partition(":")
    ok = {"kl_gap": PHASES, "entropy_gap": PHASES, "calib": PHASES, "kl_shift": ("direct", "vs"), "shift_gap": ("",)}
    if kind not in ok or arg not in ok[kind]:
        raise ValueError(f"verbalized protocol: endpoint {name!r}: the name must be kl_gap:PHASE, entropy_gap:PHASE, "
                         "calib:PHASE (PHASE sft or dpo), kl_shift:direct, kl_shift:vs or shift_gap (see "
                         "verbalized.endpoint_units)")
    return kind, arg or None


def request_table(records: Sequence[dict[str, Any]], p_base: dict[str, dict[str, float]]
                  ) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(phase, method) -> request -> {kl, entropy, valid}; method "lists" -> request -> {pearson, parsed} (pure).
    KL and entropy use the same number of usable answers in every (phase, method) of a request: the first m,
    m the smallest usable count among them (answers are i.i.d., so the first m are a fair subsample), so the
    plug-in estimates compared across arms have the same sample size; NaN for a request where some arm has none."""
    usable = {}
    for r in records:
        if r["kind"] == "dist" and r.get("category") in p_base:
            base = p_base[r["category"]]
            usable[(r["phase"], r["method"], r["request"])] = [x for x in r["items"] if x is not None and x in base]
    m_of: dict[str, int] = {}
    for (_, _, rid), vals in usable.items():
        m_of[rid] = min(m_of.get(rid, len(vals)), len(vals))
    out: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for r in records:
        base = p_base[r["category"]] if r.get("category") in p_base else None
        if r["kind"] == "dist" and base is not None:
            first = usable[(r["phase"], r["method"], r["request"])][:m_of[r["request"]]]
            out.setdefault((r["phase"], r["method"]), {})[r["request"]] = {
                "kl": kl_to_base(first, base), "entropy": norm_entropy(first, base), "usable_compared": len(first),
                "valid": float(np.mean([x is not None for x in r["items"]])) if r["items"] else math.nan}
        elif r["kind"] == "lists" and base is not None:
            verb, true = calibration_points(r, base)
            out.setdefault((r["phase"], "lists"), {})[r["request"]] = {
                "pearson": _pearson(verb, true), "parsed": float(np.mean([x["items"] is not None
                                                                          for x in r["lists"]]))}
    return out


def endpoint_units(name: str, records: Sequence[dict[str, Any]], p_base: dict[str, dict[str, float]]) -> np.ndarray:
    """Per single-item request, from one seed's records (pure):
      kl_gap:PHASE      KL(Direct || p_base) - KL(VS || p_base) in that phase, over the usable answers (> 0: VS is
                        closer to p_base);
      entropy_gap:PHASE normalised entropy of VS's answers - Direct's;
      kl_shift:METHOD   KL after DPO - KL before (> 0: DPO moved the method away from p_base);
      shift_gap         kl_shift:direct - kl_shift:vs (> 0: DPO collapsed Direct more than VS);
      calib:PHASE       Pearson(verbalised probability, renormalised p_base) over the request's parsed lists.
    A request that gives no finite value (some arm without usable answers; for calib fewer than 3 points or no
    spread) is left out of every endpoint alike."""
    kind, arg = parse_endpoint(name)
    t = request_table(records, p_base)

    def get(phase: str, method: str, key: str) -> dict[str, float]:
        if (phase, method) not in t:
            raise KeyError(f"verbalized protocol: endpoint {name!r} needs the base-distribution records of {method} "
                           f"in phase {phase!r} (distribution.enabled, and dpo.enabled for the dpo phase)")
        return {rid: v[key] for rid, v in t[(phase, method)].items()}

    if kind == "calib":
        vals = list(get(arg, "lists", "pearson").values())
    elif kind in ("kl_gap", "entropy_gap"):
        key = "kl" if kind == "kl_gap" else "entropy"
        d, v = get(arg, "direct", key), get(arg, "vs", key)
        sign = 1.0 if kind == "kl_gap" else -1.0
        vals = [sign * (d[r] - v[r]) for r in d if r in v]
    else:
        def shift(method: str) -> dict[str, float]:
            a, b = get("dpo", method, "kl"), get("sft", method, "kl")
            return {r: a[r] - b[r] for r in a if r in b}

        if kind == "kl_shift":
            vals = list(shift(arg).values())
        else:
            sd, sv = shift("direct"), shift("vs")
            vals = [sd[r] - sv[r] for r in sd if r in sv]
    # a request without usable answers in some arm (or a list set with no spread, for calib) is no unit
    return np.array([x for x in vals if math.isfinite(x)])


def _finite_mean(xs: Sequence[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return float(np.mean(vals)) if vals else math.nan


def _ci(groups: Sequence[Sequence[float]], n_boot: int, key: str) -> str:
    m, lo, hi = pooled_ci(groups, n_boot, key)
    return "-" if math.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: every table, figure and the protocol's verdicts from the saved records (per world seed and pooled
    over out_dir + pool_dirs); re-runnable without models."""
    facts_by, by_seed = pool_measured(cfg.out_dir, cfg.pool_dirs, measured_config(cfg, NOT_MEASURED), "verbalized",
                                      ("source.world.seed",), MEASURE_FACTS, RECORDS)
    facts = next(iter(facts_by.values()))
    records = next(iter(by_seed.values()))
    seeds = list(by_seed)
    rec = Record("verbalized", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    gold = bool(facts["gold"])
    quality_name = "gold reward" if gold else "RM reward"

    def summary(phase: str, sweep: str = "main") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for method in dict.fromkeys(r["method"] for r in records if r["kind"] == "prompt" and r["phase"] == phase
                                    and r["sweep"] == sweep):
            for k in sorted({r["k"] for r in records if r["kind"] == "prompt" and r["method"] == method
                             and r["phase"] == phase and r["sweep"] == sweep}):
                rows = [r for r in records if r["kind"] == "prompt" and r["phase"] == phase and r["sweep"] == sweep
                        and r["method"] == method and r["k"] == k]
                key = method if sweep == "main" else f"{method}/k={k}"
                out[key] = {"method": method, "k": k, **method_summary(rows, rows[0]["n"], method in SINGLE)}
        return out

    before, after, ks = summary("sft"), summary("dpo"), summary("sft", "k")
    cols = ["method", f"quality ({quality_name})", "semantic div. %", "ROUGE-L (lower = diverse)", "distinct-2"]
    cols += ["distinct item sets", "item entropy", "coverage@N", "optimal share"] if gold else []
    cols += ["parse rate"]

    def rows_of(res: dict[str, Any]) -> list[list[Any]]:
        out = []
        for m, r in res.items():
            row = [METHOD_LABELS[m], f"{r['quality']:.3f} ± {r['quality_se']:.3f}",
                   f"{r['semantic']:.2f} ± {r['semantic_se']:.2f}", r["rouge_l"], r["distinct_2"]]
            row += [r.get("distinct_sets", math.nan), r.get("item_entropy", math.nan), r.get("coverage", math.nan),
                    r.get("optimal_share", math.nan)] if gold else []
            out.append(row + [r["parse_rate"]])
        return out

    rec.table(f"methods on {facts['prompts']} held-out prompts, N = {cfg.n} responses each (k = {cfg.k} per call, "
              f"T = {cfg.temperature}); means over prompts ± s.e. (world seed {seeds[0]})", cols, rows_of(before))
    if ks:
        rec.table(f"k sweep (N = {cfg.k_sweep_n} responses per prompt; k per call; the world trained k = 2..4; "
                  f"world seed {seeds[0]})",
                  ["method", "k", f"quality ({quality_name})", "semantic div. %", "ROUGE-L", "distinct item sets",
                   "item entropy", "coverage@N", "parse rate"],
                  [[METHOD_LABELS[r["method"]], r["k"], r["quality"], r["semantic"], r["rouge_l"],
                    r.get("distinct_sets", math.nan), r.get("item_entropy", math.nan), r.get("coverage", math.nan),
                    r["parse_rate"]] for r in ks.values()])
    taus: dict[str, Any] = {}
    vs_rows = [r for r in records if r["kind"] == "prompt" and r["phase"] == "sft" and r["sweep"] == "main"
               and r["method"] == "vs_standard"]
    if vs_rows and cfg.taus:
        taus = tau_sweep(vs_rows, cfg.taus, cfg.min_survivors, cfg.n, gold)
        rec.table(f"post-hoc probability lower bound tau on VS-Standard (N = {cfg.n}, keep >= {cfg.min_survivors}; "
                  f"world seed {seeds[0]})",
                  ["tau", "survivors", f"mean {quality_name}", "E[reward] of one draw", "ROUGE-L",
                   "item entropy", "coverage@N"],
                  [[r["tau"], r["survivors"], r["quality"], r["expected_reward"], r["rouge_l"],
                    r.get("item_entropy", math.nan), r.get("coverage", math.nan)] for r in taus.values()])
    dpo = facts.get("dpo")
    if after and dpo:
        rec.table(f"after DPO ({dpo['pairs']} {dpo['labels']} pairs, {cfg.dpo.steps} steps, lr {cfg.dpo.lr}, beta "
                  f"{cfg.dpo.beta}); same prompts and metrics (world seed {seeds[0]})", cols, rows_of(after))
        keep = [m for m in after if m in before]
        rec.table(f"before -> after DPO (semantic diversity %, item entropy, quality; world seed {seeds[0]})",
                  ["method", "semantic before", "semantic after", "retained", "item entropy before",
                   "item entropy after", "quality before", "quality after"],
                  [[METHOD_LABELS[m], before[m]["semantic"], after[m]["semantic"],
                    after[m]["semantic"] / before[m]["semantic"] if before[m]["semantic"] else math.nan,
                    before[m].get("item_entropy", math.nan), after[m].get("item_entropy", math.nan),
                    before[m]["quality"], after[m]["quality"]] for m in keep])

    # the base distribution, pooled over the world seeds (each seed has its own p_base)
    dist: dict[str, Any] = {}
    p_bases = {s: facts_by[s].get("p_base") or {} for s in seeds}
    tables = {s: request_table(by_seed[s], p_bases[s]) for s in seeds}
    phases = [p for p in PHASES if any((p, "direct") in t for t in tables.values())]
    if phases:
        rows = []
        for phase in phases:
            for method in ("direct", "vs"):
                per = [[v["kl"] for v in t.get((phase, method), {}).values()] for t in tables.values()]
                ent = [[v["entropy"] for v in t.get((phase, method), {}).values()] for t in tables.values()]
                val = [[v["valid"] for v in t.get((phase, method), {}).values()] for t in tables.values()]
                dist[f"{phase}/{method}"] = {"kl": _finite_mean([x for p in per for x in p]),
                                             "entropy": _finite_mean([x for p in ent for x in p]),
                                             "valid": _finite_mean([x for p in val for x in p])}
                rows.append([phase, "Direct" if method == "direct" else "VS (one draw per list)",
                             _ci(per, cfg.n_boot, f"kl:{phase}:{method}"),
                             _ci(ent, cfg.n_boot, f"entropy:{phase}:{method}"),
                             _ci(val, cfg.n_boot, f"valid:{phase}:{method}")])
            verb, true = [], []
            for s in seeds:
                for r in by_seed[s]:
                    if r["kind"] == "lists" and r["phase"] == phase:
                        v, t_ = calibration_points(r, p_bases[s][r["category"]])
                        verb += v
                        true += t_
            dist[f"{phase}/calibration"] = {"pearson": _pearson(verb, true), "points": len(verb)}
        base_ent = float(np.mean([-(np.log(list(b.values())) * list(b.values())).sum() / math.log(len(b))
                                  for pb in p_bases.values() for b in pb.values()]))
        rec.table(f"the known base distribution: single-item requests x {cfg.distribution.samples} answers "
                  f"(world seeds {seeds}; mean over requests, bootstrap 95% CI; p_base's own normalised entropy "
                  f"{base_ent:.3f})", ["phase", "method", "KL(answers || p_base), nats", "normalised entropy",
                                       "usable answers"], rows)
        rec.table("calibration of the verbalised probabilities (Pearson with the renormalised p_base, all parsed "
                  "lists pooled)", ["phase", "Pearson", "points"],
                  [[p, dist[f"{p}/calibration"]["pearson"], dist[f"{p}/calibration"]["points"]] for p in phases])

    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints and phases:
        verdicts = report_protocol(rec, proto, {s: (by_seed[s], p_bases[s]) for s in seeds},
                                   lambda name, m: endpoint_units(name, *m), facts_by, MEASURE_FACTS)
    elif proto.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the base-distribution records (world "
                         "source, distribution.enabled).")

    _plots(rec, before, after, ks, taus, gold)
    if phases:
        _plot_base(rec, by_seed, p_bases, phases)
    rec.results.update({"methods": before, "k_sweep": ks, "tau_sweep": taus, "distribution": dist,
                        "world": facts["world"], "world_seeds": seeds, "timings": facts["timings"],
                        # methods / k_sweep / tau_sweep / dpo are of this seed; distribution and protocol pool seeds
                        "methods_world_seed": seeds[0],
                        "compilations": facts["compilations"], "protocol": verdicts})
    if dpo:
        rec.results["dpo"] = {"summary": dpo, "methods": after}
    rec.notes.extend(_notes(cfg, before, after, gold, dist, dpo))
    return rec.finish(console)


def _plot_base(rec: Record, by_seed: dict[int, list[dict[str, Any]]], p_bases: dict[int, dict[str, Any]],
               phases: Sequence[str]) -> None:
    """Answer frequency by the item's rank in p_base (averaged over requests and seeds): p_base itself, Direct
    and VS before and after DPO."""
    def freq(phase: str, method: str) -> np.ndarray:
        out = []
        for s, recs in by_seed.items():
            for r in recs:
                if r["kind"] == "dist" and r["phase"] == phase and r["method"] == method:
                    base = p_bases[s][r["category"]]
                    ranked = sorted(base, key=base.get, reverse=True)
                    n = max(len(r["items"]), 1)
                    out.append([sum(x == it for x in r["items"]) / n for it in ranked])
        return np.mean(out, axis=0) if out else np.full(10, np.nan)

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        b = np.mean([sorted(v.values(), reverse=True) for pb in p_bases.values() for v in pb.values()], axis=0)
        ranks = np.arange(1, len(b) + 1)
        ax.plot(ranks, b, "k-", lw=2, label="p_base (known)")
        styles = {"sft": "-", "dpo": "--"}
        for phase in phases:
            for i, method in enumerate(("direct", "vs")):
                ax.plot(ranks, freq(phase, method), styles[phase], marker="os"[i], color=f"C{i}",
                        label=f"{'Direct' if method == 'direct' else 'VS'} ({'SFT' if phase == 'sft' else 'after DPO'})")
        ax.set_yscale("log")
        ax.set_xlabel("item rank in p_base")
        ax.set_ylabel("answer frequency (mean over requests)")
        ax.set_title("single-item answers vs the known base distribution")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    rec.figure("base_distribution.png", draw, figsize=(6.5, 4.5))


def _notes(cfg: Config, before: dict[str, Any], after: dict[str, Any], gold: bool, dist: dict[str, Any],
           dpo: dict[str, Any] | None) -> list[str]:
    """Plain statements computed from the numbers."""
    out = [("semantic diversity uses ModelEmbedder (mean-pooled hidden states of the pre-DPO policy): a weak "
            "embedder whose cosines sit high; compare methods with it, not with the paper's numbers.")]
    if not gold:
        out.append("real source: quality is the reward model's score; coverage needs a gold answer set and is not "
                   "reported.")
    if dpo and dpo.get("labels") == "typicality":
        out.append(f"DPO labels: typicality-biased (Bradley-Terry on {cfg.dpo.typicality_alpha:g} x log p_base); the "
                   f"more typical item was chosen in {dpo.get('typical_chosen', math.nan):.0%} of "
                   f"{dpo['pairs']} pairs.")
    for phase in PHASES:
        if f"{phase}/direct" in dist:
            d, v = dist[f"{phase}/direct"], dist[f"{phase}/vs"]
            out.append(f"base distribution ({phase}): KL to p_base Direct {d['kl']:.3f} vs VS {v['kl']:.3f} nats; "
                       f"normalised entropy {d['entropy']:.3f} vs {v['entropy']:.3f}; calibration Pearson "
                       f"{dist[f'{phase}/calibration']['pearson']:.3f}.")
    d = before.get("direct")
    for m in ("vs_standard", "vs_multi", "sequence", "multi_turn"):
        if d and m in before:
            r = before[m]
            out.append(f"{METHOD_LABELS[m]} vs Direct: semantic diversity {r['semantic']:.2f} vs {d['semantic']:.2f} "
                       f"({r['semantic'] / d['semantic']:.2f}x), quality {r['quality']:.3f} vs {d['quality']:.3f}"
                       + (f", item entropy {r.get('item_entropy', math.nan):.3f} vs "
                          f"{d.get('item_entropy', math.nan):.3f}, coverage@N {r.get('coverage', math.nan):.3f} vs "
                          f"{d.get('coverage', math.nan):.3f}" if gold else "") + f", parse rate {r['parse_rate']:.2f}.")
    if "vs_cot" in before:
        out.append(f"VS-CoT ran with prs_jax's default template (not trained in the world): parse rate "
                   f"{before['vs_cot']['parse_rate']:.2f}.")
    for m, a in after.items():
        b = before.get(m)
        if b and b["semantic"]:
            out.append(f"DPO: {METHOD_LABELS[m]} keeps {a['semantic'] / b['semantic']:.0%} of its semantic "
                       f"diversity ({b['semantic']:.2f} -> {a['semantic']:.2f})"
                       + (f", item entropy {b.get('item_entropy', math.nan):.3f} -> "
                          f"{a.get('item_entropy', math.nan):.3f}" if gold else "")
                       + f", quality {b['quality']:.3f} -> {a['quality']:.3f}.")
    return out


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study; returns the result record (results.json)."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)


def _plots(rec: Record, before: dict[str, Any], after: dict[str, Any], ks: dict[str, Any], taus: dict[str, Any],
           gold: bool) -> None:
    def draw_dq(fig: Any) -> None:
        metrics = [("semantic", "semantic diversity (%)"), ("rouge_l", "mean pairwise ROUGE-L (lower = diverse)")]
        for j, (key, label) in enumerate(metrics):
            ax = fig.add_subplot(1, 2, j + 1)
            for i, (m, r) in enumerate(before.items()):
                color = f"C{i}"
                ax.errorbar(r[key], r["quality"], yerr=r["quality_se"], fmt="o", color=color, capsize=3,
                            label=METHOD_LABELS[m])
                if m in after:
                    a = after[m]
                    ax.errorbar(a[key], a["quality"], yerr=a["quality_se"], fmt="s", mfc="none", color=color,
                                capsize=3)
                    ax.annotate("", (a[key], a["quality"]), (r[key], r["quality"]),
                                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
            if key == "rouge_l":
                ax.invert_xaxis()
            ax.set_xlabel(label)
            ax.set_ylabel("quality (gold reward)" if gold else "quality (RM reward)")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, title="filled: SFT, hollow: after DPO" if after else None, title_fontsize=7)

    rec.figure("diversity_vs_quality.png", draw_dq, figsize=(11, 4.5))
    if after:
        def draw_ba(fig: Any) -> None:
            keys = [("semantic", "semantic diversity (%)")] + ([("item_entropy", "item entropy"),
                                                                ("distinct_sets", "distinct item sets / N"),
                                                                ("coverage", "coverage@N")] if gold else
                                                               [("distinct_2", "distinct-2")])
            ms = [m for m in after if m in before]
            x = np.arange(len(ms))
            for j, (key, label) in enumerate(keys):
                ax = fig.add_subplot(1, len(keys), j + 1)
                ax.bar(x - 0.2, [before[m].get(key, math.nan) for m in ms], 0.4, label="SFT policy")
                ax.bar(x + 0.2, [after[m].get(key, math.nan) for m in ms], 0.4, label="after DPO")
                ax.set_xticks(x, [METHOD_LABELS[m] for m in ms], rotation=30, ha="right")
                ax.set_title(label, fontsize=9)
                ax.grid(axis="y", alpha=0.3)
                if j == 0:
                    ax.legend(fontsize=8)

        rec.figure("before_after_dpo.png", draw_ba, figsize=(12, 4))
    if ks or taus:
        def draw_sweeps(fig: Any) -> None:
            ax = fig.add_subplot(1, 2, 1)
            for i, method in enumerate(dict.fromkeys(r["method"] for r in ks.values())):
                rows = [r for r in ks.values() if r["method"] == method]
                key = "item_entropy" if gold else "semantic"
                ax.plot([r["k"] for r in rows], [r[key] for r in rows], "o-", color=f"C{i}",
                        label=f"{METHOD_LABELS[method]}" + (" item entropy" if gold else ""))
                if gold:
                    ax.plot([r["k"] for r in rows], [r["coverage"] for r in rows], "^--", color=f"C{i}",
                            label=f"{METHOD_LABELS[method]} coverage@N")
            ax.set_xlabel("k (responses per call)")
            ax.set_ylabel("item entropy, coverage@N" if gold else "semantic diversity (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax2 = fig.add_subplot(1, 2, 2)
            ts = list(taus.values())
            if ts:
                ax2.plot([r["tau"] for r in ts], [r["quality"] for r in ts], "o-", label="mean reward of survivors")
                ax2.plot([r["tau"] for r in ts], [r["expected_reward"] for r in ts], "s-", label="E[reward], one draw")
                if gold:
                    ax2.plot([r["tau"] for r in ts], [r["item_entropy"] for r in ts], "^--",
                             label="item entropy")
                ax3 = ax2.twinx()
                ax3.plot([r["tau"] for r in ts], [r["survivors"] for r in ts], "k:", label="survivors")
                ax3.set_ylabel("survivors per prompt")
                ax2.set_xlabel("tau (post-hoc lower bound, VS-Standard)")
                ax2.legend(fontsize=7, loc="lower left")
                ax2.grid(alpha=0.3)

        rec.figure("sweeps.png", draw_sweeps, figsize=(11, 4.2))
