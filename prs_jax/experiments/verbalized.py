"""Verbalized-sampling study (Zhang et al. 2025, arXiv 2510.01171): diversity, quality and coverage of Direct,
Sequence, Multi-turn, VS-Standard and VS-Multi sampling, before and after DPO sharpens the policy.

World source (the default). The policy is the world's SFT policy; the methods use
`prs_jax.world.corpus.world_vs_templates()` (the wording the world trained: direct, sequence, multi_turn,
vs_standard, vs_multi). VS-CoT has no trained template in the world: when listed it runs with prs_jax's DEFAULT
template and its parse rate says whether the policy can follow it. Probability upper bounds are not trained in the
world either, so the paper's bound sweep is out of scope here; the post-hoc lower bound tau (the package's knob)
is swept on the VS-Standard candidates instead.

Every method gets the same budget of `n` responses per held-out prompt (x with its preference z). Per prompt:

- quality: mean gold reward r*(x, z, y) of the responses;
- semantic diversity: 100 * mean over pairs of 1 - clip(cos, 0, 1) under prs_jax.eval.diversity.ModelEmbedder
  (mean-pooled hidden states of the pre-DPO SFT policy: a WEAK embedder, only for comparing methods here);
- lexical diversity: mean pairwise ROUGE-L F1 (lower = more diverse) and distinct-2;
- distinct item sets: |distinct unordered item sets| / responses (content diversity beyond style);
- item entropy: entropy of how often each of the category's items is named across the responses / log(10);
  the world's own mode collapse is towards its popular items, so this is the sharpest content measure here;
- coverage@N: the number of distinct item sets among the GOLD-OPTIMAL responses (gold reward 1: right count, on
  topic, no repeats, every preference met) divided by min(N, number of item sets a gold-optimal answer can have),
  so 1.0 means every response was optimal and each named a different set; the denominator counts the n-subsets
  of the category's items that contain the items to include and none to leave out;
- optimal share: the fraction of responses with gold reward 1;
- parse rate: responses parsed from the list methods' output / n.

Sweeps: k (responses per call) for `k_sweep_methods` at budget `k_sweep_n`; tau (post-hoc lower bound on the
verbalised probability, keeping at least `min_survivors`) on the VS-Standard candidates.

Mode collapse: the policy is trained with DPO (run_train "dpo") on best-vs-worst pairs of its own direct samples
(by gold reward) on TRAINING prompts, a few steps at a high learning rate, then `dpo.methods` are measured again.

Real source (`source.kind: real`): prompts from `source.real.prompt_set`, quality is the reward model's score
(no gold reward), coverage and optimal share are not defined (reported as null), DPO pairs are ranked by the RM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from prs_jax.eval.stats import mean_se
from prs_jax.experiments.common import Record, Source
from prs_jax.experiments.env import StudyEnv
from prs_jax.models.sharding import MeshConfig
from prs_jax.strategies.base import PromptItem, join_preference

METHOD_LABELS = {"direct": "Direct", "cot": "CoT", "sequence": "Sequence", "multi_turn": "Multi-turn",
                 "vs_standard": "VS-Standard", "vs_cot": "VS-CoT", "vs_multi": "VS-Multi"}


@dataclasses.dataclass(frozen=True)
class DPOSettings:
    """DPO sharpening: best-vs-worst pairs of the policy's own direct samples on training prompts."""

    enabled: bool = True
    prompts: int = 96
    samples: int = 8
    temperature: float = 1.0
    steps: int = 40
    batch_size: int = 16
    lr: float = 1e-3
    beta: float = 0.05
    loss: str = "sigmoid"
    methods: tuple[str, ...] = ("direct", "sequence", "multi_turn", "vs_standard", "vs_multi")


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

    def __post_init__(self) -> None:
        from prs_jax.strategies.verbalized import METHODS

        for key, ms in (("methods", self.methods), ("k_sweep_methods", self.k_sweep_methods),
                        ("dpo.methods", self.dpo.methods)):
            bad = [m for m in ms if m not in METHODS]
            if bad:
                raise ValueError(f"{key}: unknown method(s) {bad}; known: {list(METHODS)}.")
        if self.n < 2:
            raise ValueError(f"n must be >= 2 to measure diversity (got {self.n}).")


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


def measure(setting: Setting, gens: Sequence[dict[str, Any]], embedder: Any, n: int, single: bool
            ) -> dict[str, Any]:
    """Aggregate metrics of one method's generations (scores every response)."""
    from prs_jax.eval.diversity import semantic_diversity_groups

    flat_items = [it for it, g in zip(setting.items, gens) for _ in g["texts"]]
    flat = [t for g in gens for t in g["texts"]]
    rewards = setting.score(flat_items, flat) if flat else []
    per, i = [], 0
    for it, g in zip(setting.items, gens):
        r = rewards[i:i + len(g["texts"])]
        g["rewards"] = list(r)
        i += len(g["texts"])
        per.append(prompt_metrics(g["texts"], r, it, setting.gold, n))
    _, semantic = semantic_diversity_groups([g["texts"] for g in gens], embedder)
    agg = aggregate(per, semantic)
    parsed = [sum(g["parsed"]) / n for g in gens]
    agg["parse_rate"] = 1.0 if single else float(np.mean(parsed))
    return agg


def tau_sweep(setting: Setting, gens: Sequence[dict[str, Any]], taus: Sequence[float], min_survivors: int,
              n: int) -> dict[str, dict[str, float]]:
    """Post-hoc lower bound tau on the verbalised probabilities: survivors, their quality and diversity, and the
    expected reward of one draw from the resulting distribution."""
    from prs_jax.strategies.vs_parse import verbalized_distribution

    out = {}
    for tau in taus:
        per, expected, survivors = [], [], []
        for it, g in zip(setting.items, gens):
            if not g["texts"]:
                continue
            w = np.asarray([x if x is not None else 0.0 for x in g["weights"]], np.float64)
            has = any(x is not None for x in g["weights"])
            dist = verbalized_distribution(w, tau=tau if has else 0.0, min_survivors=min_survivors,
                                           mode="elicited" if has else "uniform")
            idx = [int(j) for j in dist.indices]
            texts = [g["texts"][j] for j in idx]
            rewards = [g["rewards"][j] for j in idx]
            survivors.append(len(idx))
            expected.append(float(np.dot(dist.probs, rewards)) if idx else math.nan)
            per.append(prompt_metrics(texts, rewards, it, setting.gold, n))
        agg = aggregate(per, [])
        out[f"{tau:g}"] = {"tau": tau, "survivors": float(np.mean(survivors)),
                           "expected_reward": float(np.nanmean(expected)),
                           **{k: agg[k] for k in ("quality", "rouge_l", "distinct_sets", "item_entropy", "coverage") if k in agg}}
    return out


def dpo_sharpen(cfg: Config, setting: Setting, env: StudyEnv, model: Any, work: Path, console: Console
                ) -> tuple[str, dict[str, Any]]:
    """DPO on best-vs-worst pairs of the policy's direct samples (training prompts); returns the exported policy
    directory and a summary (pairs, trainer metrics)."""
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
    from prs_jax.train.trainer import OptimConfig, TrainerConfig
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
    rows, i = [], 0
    for it, ts in zip(items, texts):
        r = rewards[i:i + len(ts)]
        i += len(ts)
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
    path = work / "dpo_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    console.print(f"verbalized: DPO on {len(rows)} best-vs-worst pairs ({d.steps} steps, lr {d.lr}, beta {d.beta})",
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
    metrics = run_train("dpo", run_cfg, console=console)
    gaps = [max(r) - min(r) for r in _chunks(rewards, [len(ts) for ts in texts]) if max(r) > min(r)]
    return str(work / "dpo_policy"), {"pairs": len(rows), "mean_gold_gap" if setting.gold else "mean_rm_gap":
                                      float(np.mean(gaps)) if gaps else math.nan, "final_metrics": metrics}


def _chunks(flat: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    out, i = [], 0
    for s in sizes:
        out.append(list(flat[i:i + s]))
        i += s
    return out


# ------------------------------------------------------------------------------------------------ run
def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """Run the study; returns the result record (results.json)."""
    from prs_jax.eval.diversity import ModelEmbedder
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    rec = Record("verbalized", cfg, cfg.out_dir, cfg.seed)
    work = rec.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # real: quality is the RM's score of (x, z, y); the policy loads in the study's dtype, the RM in the source's
    env = StudyEnv.from_source(cfg.source, console, study="verbalized",
                               require=("policy", "reward_model", "prompts_path"), rm_include_preference=True)
    setting = _setting(cfg, env)
    model = env.load_policy(dtype=cfg.dtype)
    tok = env.tokenizer
    emb_path = cfg.embedder_model or setting.policy
    embedder = ModelEmbedder(model if emb_path == setting.policy else load_causal_lm(emb_path, dtype=cfg.dtype),
                             tok if emb_path == setting.policy else load_tokenizer(emb_path))
    quality_name = "gold reward" if setting.gold else "RM reward"
    console.print(f"verbalized: {len(cfg.methods)} methods x {len(setting.items)} prompts x n={cfg.n} (k={cfg.k})",
                  markup=False)

    def run_all(m: Any, methods: Sequence[str], tag: str) -> tuple[dict[str, Any], dict[str, list]]:
        res, gens_by = {}, {}
        for method in methods:
            gens = run_method(cfg, setting, env, m, method, cfg.k, cfg.n, cfg.seed)
            res[method] = measure(setting, gens, embedder, cfg.n, method in ("direct", "multi_turn", "cot"))
            res[method]["example"] = gens[0]["texts"][:3] if gens else []
            gens_by[method] = gens
            console.print(f"  [{tag}] {METHOD_LABELS[method]}: quality {res[method]['quality']:.3f}, semantic "
                          f"{res[method]['semantic']:.1f}, ROUGE-L {res[method]['rouge_l']:.3f}, parse "
                          f"{res[method]['parse_rate']:.2f}", markup=False)
        return res, gens_by

    timings["setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    before, gens_before = run_all(model, cfg.methods, "sft")
    timings["methods_s"] = time.perf_counter() - t0
    rec.results["methods"] = before
    cols = ["method", f"quality ({quality_name})", "semantic div. %", "ROUGE-L (lower = diverse)", "distinct-2"]
    cols += ["distinct item sets", "item entropy", "coverage@N", "optimal share"] if setting.gold else []
    cols += ["parse rate"]

    def rows_of(res: dict[str, Any]) -> list[list[Any]]:
        out = []
        for m, r in res.items():
            row = [METHOD_LABELS[m], f"{r['quality']:.3f} ± {r['quality_se']:.3f}",
                   f"{r['semantic']:.2f} ± {r['semantic_se']:.2f}", r["rouge_l"], r["distinct_2"]]
            row += [r.get("distinct_sets", math.nan), r.get("item_entropy", math.nan), r.get("coverage", math.nan),
                    r.get("optimal_share", math.nan)] if setting.gold else []
            out.append(row + [r["parse_rate"]])
        return out

    rec.table(f"methods on {len(setting.items)} held-out prompts, N = {cfg.n} responses each (k = {cfg.k} per call, "
              f"T = {cfg.temperature}); means over prompts ± s.e.", cols, rows_of(before))

    # k sweep
    t0 = time.perf_counter()
    ks: dict[str, dict[str, Any]] = {}
    for method in cfg.k_sweep_methods:
        for k in cfg.k_sweep:
            gens = run_method(cfg, setting, env, model, method, k, cfg.k_sweep_n, cfg.seed + 1)
            r = measure(setting, gens, embedder, cfg.k_sweep_n, False)
            ks[f"{method}/k={k}"] = {"method": method, "k": k, **{key: r.get(key, math.nan) for key in (
                "quality", "semantic", "rouge_l", "distinct_sets", "item_entropy", "coverage", "parse_rate")}}
    if ks:
        rec.results["k_sweep"] = ks
        rec.table(f"k sweep (N = {cfg.k_sweep_n} responses per prompt; k per call; the world trained k = 2..4)",
                  ["method", "k", f"quality ({quality_name})", "semantic div. %", "ROUGE-L", "distinct item sets",
                   "item entropy", "coverage@N", "parse rate"],
                  [[METHOD_LABELS[r["method"]], r["k"], r["quality"], r["semantic"], r["rouge_l"],
                    r["distinct_sets"], r["item_entropy"], r["coverage"], r["parse_rate"]] for r in ks.values()])

    timings["k_sweep_s"] = time.perf_counter() - t0
    # tau sweep
    taus: dict[str, Any] = {}
    if "vs_standard" in gens_before and cfg.taus:
        taus = tau_sweep(setting, gens_before["vs_standard"], cfg.taus, cfg.min_survivors, cfg.n)
        rec.results["tau_sweep"] = taus
        rec.table(f"post-hoc probability lower bound tau on VS-Standard (N = {cfg.n}, keep >= {cfg.min_survivors})",
                  ["tau", "survivors", f"mean {quality_name}", "E[reward] of one draw", "ROUGE-L",
                   "item entropy", "coverage@N"],
                  [[r["tau"], r["survivors"], r["quality"], r["expected_reward"], r["rouge_l"],
                    r.get("item_entropy", math.nan), r.get("coverage", math.nan)] for r in taus.values()])

    # DPO sharpening
    t0 = time.perf_counter()
    after: dict[str, Any] = {}
    if cfg.dpo.enabled:
        dpo_dir, summary = dpo_sharpen(cfg, setting, env, model, work, console)
        dpo_model = load_causal_lm(dpo_dir, dtype=cfg.dtype)
        after, _ = run_all(dpo_model, cfg.dpo.methods, "dpo")
        rec.results["dpo"] = {"summary": summary, "methods": after}
        rec.table(f"after DPO sharpening ({summary['pairs']} best-vs-worst pairs, {cfg.dpo.steps} steps, lr "
                  f"{cfg.dpo.lr}, beta {cfg.dpo.beta}); same prompts and metrics", cols, rows_of(after))
        keep = [m for m in cfg.dpo.methods if m in before]
        rec.table("before -> after DPO (semantic diversity %, item entropy, quality)",
                  ["method", "semantic before", "semantic after", "retained", "item entropy before",
                   "item entropy after", "quality before", "quality after"],
                  [[METHOD_LABELS[m], before[m]["semantic"], after[m]["semantic"],
                    after[m]["semantic"] / before[m]["semantic"] if before[m]["semantic"] else math.nan,
                    before[m].get("item_entropy", math.nan), after[m].get("item_entropy", math.nan),
                    before[m]["quality"], after[m]["quality"]] for m in keep])

    timings["dpo_s"] = time.perf_counter() - t0
    rec.results["timings"] = timings
    _plots(rec, before, after, ks, taus, setting.gold)
    rec.notes.extend(_notes(cfg, before, after, setting.gold))
    return rec.finish(console)


def _notes(cfg: Config, before: dict[str, Any], after: dict[str, Any], gold: bool) -> list[str]:
    """Plain statements computed from the numbers."""
    out = [("semantic diversity uses ModelEmbedder (mean-pooled hidden states of the pre-DPO policy): a weak "
            "embedder whose cosines sit high; compare methods with it, not with the paper's numbers.")]
    if not gold:
        out.append("real source: quality is the reward model's score; coverage needs a gold answer set and is not "
                   "reported.")
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
    if after:
        for m, a in after.items():
            b = before.get(m)
            if b and b["semantic"]:
                out.append(f"DPO: {METHOD_LABELS[m]} keeps {a['semantic'] / b['semantic']:.0%} of its semantic "
                           f"diversity ({b['semantic']:.2f} -> {a['semantic']:.2f})"
                           + (f", item entropy {b.get('item_entropy', math.nan):.3f} -> "
                              f"{a.get('item_entropy', math.nan):.3f}" if gold else "")
                           + f", quality {b['quality']:.3f} -> {a['quality']:.3f}.")
    return out


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
