"""Reward vs N (PRS paper, the reward-vs-sample-budget figure): Rand, PRand and PRS variants (layer splits
(N/4, 3N/4), (N/2, N/2), (3N/4, N/4), depth 3, and PRS without feedback) select the best of N responses by the
PROXY reward model; we report the proxy reward and, in the synthetic world, the GOLD reward of what was
selected, plus the "oracle" (best gold among the same candidates) that shows how much the proxy leaves on the
table or over-optimises. At the largest N the gold reward of every candidate and of the selected ones is
plotted per method.

Real source (`source.kind: real`): no gold reward exists; the tables report the reward model's score of the
selected response (which is also the selection criterion, so it is optimistic) and the selected responses are
written in AlpacaEval's output format for an external judge.

This module also holds the sampling helpers the preference-adaptation and scaling studies reuse
(`Generation`, `Method`, `study_env`, `run_method`, `measure`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prs_jax.eval.stats import mean_se
from prs_jax.experiments.common import Record, Source, measured_config, pool_measured
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.protocol import Protocol, evaluated_seeds, pooled_ci, report_protocol
from prs_jax.models.sharding import MeshConfig
from prs_jax.strategies.base import PromptItem, StrategyResult

METHOD_KINDS = ("rand", "prand", "prs")


@dataclasses.dataclass(frozen=True)
class Method:
    """One selection method: best-of-N Rand (x only) / PRand (x and z), or PRS with a first-layer share
    `split` of the budget, `depth` layers and self-feedback on or off."""

    name: str
    kind: Literal["rand", "prand", "prs"] = "rand"
    split: float = 0.5
    depth: int = 2
    feedback: bool = True

    def widths(self, n: int) -> tuple[int, ...] | None:
        """PRS layer widths for budget n (None when n is too small for this depth, or for best-of-N)."""
        from prs_jax.strategies.prs import PRS

        if self.kind != "prs" or n < max(self.depth, 1):
            return None
        return PRS.with_budget(n, self.split, self.depth).widths


DEFAULT_METHODS: tuple[Method, ...] = (
    Method("Rand", "rand"),
    Method("PRand", "prand"),
    Method("PRS (N/4,3N/4)", "prs", split=0.25),
    Method("PRS (N/2,N/2)", "prs", split=0.5),
    Method("PRS (3N/4,N/4)", "prs", split=0.75),
    Method("PRS depth 3", "prs", split=1 / 3, depth=3),
    Method("PRS no feedback", "prs", split=0.5, feedback=False),
)


@dataclasses.dataclass(frozen=True)
class Generation:
    """Sampling settings, batching, reward-model formatting and (real checkpoints) the device mesh."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    max_new_tokens: int = 48
    feedback_max_new_tokens: int = 48
    prs_mode: Literal["conversation", "template"] = "conversation"
    batch_size: int = 16  # prompts per batched engine call
    rm_format: Literal["chat", "template"] = "chat"
    rm_template: str = "Human: {prompt}\n\nAssistant: {response}"
    rm_include_preference: bool = True  # the RM sees x and z (per-prompt-preference setting)
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"
    # > 0: children per parent padded to a power of two >= this (EngineConfig.min_rows_bucket): fewer compiled
    # decode programs across layer widths, at the cost of inactive padded rows
    min_rows_bucket: int = 0
    mesh: MeshConfig | None = None  # real checkpoints: shard policy and RM over (data, fsdp, tensor)

    def sampling(self):
        from prs_jax.tree.sampling import SamplingParams

        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              presence_penalty=self.presence_penalty)

    def env_options(self) -> dict[str, Any]:
        """StudyEnv options: engine settings beyond the shared bucket floors, mesh, reward-model formatting."""
        from prs_jax.tree.scoring import RewardFormatter

        return {"engine_options": {"attention_impl": self.attention_impl, "min_groups_bucket": self.batch_size,
                                   "min_rows_bucket": self.min_rows_bucket},
                "mesh": self.mesh, "rm_formatter": RewardFormatter(self.rm_format, self.rm_template),
                "rm_include_preference": self.rm_include_preference}


@dataclasses.dataclass(frozen=True)
class Config:
    """The reward-vs-N study."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/reward_vs_n"
    seed: int = 0
    prompts: int = 48  # held-out prompts of the world (real: at most this many from the prompt set)
    budgets: tuple[int, ...] = (4, 8, 16, 32, 64)
    methods: tuple[Method, ...] = DEFAULT_METHODS
    generation: Generation = dataclasses.field(default_factory=Generation)
    # Rand/PRand: best-of-N for every N from the first N of one draw of max(budgets) i.i.d. samples, and the arms
    # paired (run_paired_budgets: PRS's first layer at each N is PRand's first drafts); False: every (method, N)
    # drawn afresh, independently
    reuse_samples: bool = True
    # world: the teacher programs as the policy on the same prompts (gold selection), each method's ceiling
    teacher: bool = True
    # (a, b) method names: paired effects a - b per N in the tables and the effects figure; empty: every PRS
    # method vs PRand and vs Rand, and PRand vs Rand
    comparisons: tuple[tuple[str, str], ...] = ()
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs;
    # names: gold:A:B@N (policy, proxy selects, gold reported) and teacher:A:B@N (the teacher ceiling)
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
    n_boot: int = 2000  # bootstrap resamples of the effects' 95% intervals

    def __post_init__(self) -> None:
        _check(self)


# ------------------------------------------------------------------------------------------------ models
def study_env(source: Source, gen: Generation, console: Any = None, study: str = "reward_vs_n", **options: Any
              ) -> StudyEnv:
    """The StudyEnv of a sampling study: policy, proxy RM formatted as `gen` says, gold reward in the world."""
    return StudyEnv.from_source(source, console, study=study, **gen.env_options(), **options)


def load_items(env: StudyEnv, limit: int) -> list[PromptItem]:
    """The world's first `limit` held-out prompts, or the real prompt set (with its preference column)."""
    if env.kind == "world":
        return env.heldout(limit)
    opts = {"preference_column": "preference"} if env.source.real.prompt_set in ("generic", "jsonl") else {}
    return env.real_prompts(limit, **opts)


# ------------------------------------------------------------------------------------------------ running
def method_strategy(env: StudyEnv, g: Generation, method: Method, n: int) -> Any:
    """The strategy object (StrategyConfig.build) of one method at budget n."""
    from prs_jax.strategies.generate import StrategyConfig

    if method.kind == "prs":
        spec = StrategyConfig.of("prs", n, g.sampling(), split=method.split, depth=method.depth,
                                 feedback=method.feedback, mode=g.prs_mode, max_new_tokens=g.max_new_tokens,
                                 feedback_max_new_tokens=g.feedback_max_new_tokens)
    elif method.kind in ("rand", "prand"):
        spec = StrategyConfig.of(method.kind, n, g.sampling(), max_new_tokens=g.max_new_tokens)
    else:
        raise ValueError(f"method {method.name!r}: kind {method.kind!r} is not one of {METHOD_KINDS}")
    return spec.build(templates=env.templates)


def run_method(env: StudyEnv, g: Generation, items: Sequence[PromptItem], method: Method, n: int, seed: int,
               progress: Any = None) -> list[StrategyResult]:
    """Run one method at budget n on every item (batched, `g.batch_size` prompts per engine call)."""
    strategy = method_strategy(env, g, method, n)
    engine = env.engine(seed)
    out: list[StrategyResult] = []
    for start in range(0, len(items), g.batch_size):
        batch = list(items[start:start + g.batch_size])
        out += strategy.run(batch, engine, env.proxy)
        engine.release(list(engine.tree))  # results keep text and rewards; the KV is not needed any more
        if progress is not None:
            progress.update(len(batch))
    env.compilations += engine.compilations
    return out


def run_paired_budgets(env: StudyEnv, g: Generation, items: Sequence[PromptItem], methods: Sequence[Method],
                       budgets: Sequence[int], seed: int, progress: Any = None
                       ) -> dict[tuple[str, int], list[StrategyResult]]:
    """Every method at every budget on every item, paired (common random numbers), keyed (method, N run):
    Rand and PRand run once at the largest budget (best-of-N for smaller N takes the first N), and a PRS
    method's first layer at budget N IS the first drafts of the first PRand method (reused, not resampled), so
    PRS - PRand measures what refinement adds to the same drafts. One engine (one seed) serves every method; its
    draws are keyed by (seed, prompt id, prompt tokens, tree position), so batching never changes them (two
    methods that add the same prompt, or refine the same draft, get independent draws: the engine counts
    repeated roots and children). Prompts without a preference are not reused (PRS would refine drafts written
    without the preference it asks about). `progress` advances by prompts x runs."""
    runs = _runs(methods, budgets, True)
    nmax = max(budgets)
    engine = env.engine(seed)
    strategies = {(m.name, n): method_strategy(env, g, m, n) for m, n in runs}
    prand = next((m for m in methods if m.kind == "prand"), None)
    order = [r for r in runs if r[0].kind != "prs"] + [r for r in runs if r[0].kind == "prs"]
    out: dict[tuple[str, int], list[StrategyResult]] = {(m.name, n): [] for m, n in runs}
    for start in range(0, len(items), g.batch_size):
        batch = list(items[start:start + g.batch_size])
        done: dict[tuple[str, int], list[StrategyResult]] = {}
        for m, n in order:
            strategy = strategies[(m.name, n)]
            reuse = (m.kind == "prs" and prand is not None and strategy.widths[0] <= nmax
                     and all(it.preference for it in batch))
            if reuse:
                first = [r.layers[0][:strategy.widths[0]] for r in done[(prand.name, nmax)]]
                done[(m.name, n)] = strategy.run(batch, engine, env.proxy, first_layer=first)
            else:
                done[(m.name, n)] = strategy.run(batch, engine, env.proxy)
            if progress is not None:
                progress.update(len(batch))
        engine.release(list(engine.tree))  # results keep text and rewards; the KV is not needed any more
        for key, rs in done.items():
            out[key] += rs
    env.compilations += engine.compilations
    return out


def run_paired(env: StudyEnv, g: Generation, items: Sequence[PromptItem], methods: Sequence[Method], n: int,
               seed: int, progress: Any = None) -> dict[str, list[StrategyResult]]:
    """run_paired_budgets at one budget n, keyed by method name (a PRS method too small for n is left out)."""
    return {name: rs for (name, _), rs in run_paired_budgets(env, g, items, methods, (n,), seed, progress).items()}


def _argmax_first(xs: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(xs, dtype=float)))


def _seed_for(seed: int, *parts: Any) -> int:
    """A stable per-run engine seed (zlib.crc32, not hash(): str hashes change between processes)."""
    return int(np.random.SeedSequence([seed, *[zlib.crc32(str(p).encode()) for p in parts]]).generate_state(1)[0]
               % (2**31))


def _runs(methods: Sequence[Method], budgets: Sequence[int], reuse_samples: bool) -> list[tuple[Method, int]]:
    """(method, budget) of every strategy run: Rand / PRand once at the largest N when samples are reused."""
    nmax = max(budgets)
    return [(m, n) for m in methods for n in ([nmax] if (reuse_samples and m.kind != "prs") else budgets)
            if m.kind != "prs" or m.widths(n) is not None]


def _targets(m: Method, n_run: int, budgets: Sequence[int], reuse_samples: bool) -> list[int]:
    """The budgets one run reports: every N <= n_run from a reused Rand / PRand stream (its first N), else n_run."""
    return [n for n in budgets if n <= n_run] if (reuse_samples and m.kind != "prs") else [n_run]


def result_records(results: Sequence[StrategyResult], method: Method, n_run: int, gold: Callable | None
                   ) -> list[dict[str, Any]]:
    """One JSON row per prompt of a run: every candidate's text, proxy reward, refinement layer and (world) gold
    reward, in candidate order. The report is computed from these rows alone."""
    rows = []
    for r in results:
        it = r.item
        row = {"method": method.name, "kind": method.kind, "n_run": n_run, "id": it.id, "prompt": it.prompt,
               "preference": it.preference, "texts": [c.text for c in r.candidates],
               "proxy": [float(c.reward) for c in r.candidates],
               "layer": [int(c.metadata.get("layer", 0)) for c in r.candidates]}
        if gold is not None:
            row["gold"] = [float(gold(it.prompt, c.text, it.preference)) for c in r.candidates]
        rows.append(row)
    return rows


def measure_records(env: StudyEnv, gen: Generation, items: Sequence[PromptItem], methods: Sequence[Method],
                    budgets: Sequence[int], seed: int, reuse_samples: bool = True
                    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run every (method, budget) on every prompt: the per-prompt records (result_records) and the seconds per
    run (paired, run_paired_budgets, when `reuse_samples`: one total then)."""
    from tqdm import tqdm

    budgets = sorted({int(b) for b in budgets})
    runs = _runs(methods, budgets, reuse_samples)
    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    with tqdm(total=len(runs) * len(items), desc="reward_vs_n", unit="prompt", mininterval=5) as bar:
        if reuse_samples:
            t0 = time.perf_counter()
            paired = run_paired_budgets(env, gen, items, methods, budgets, _seed_for(seed, "paired", *budgets), bar)
            seconds["paired (all methods)"] = time.perf_counter() - t0
            for m, n_run in runs:
                records += result_records(paired[(m.name, n_run)], m, n_run, env.gold)
            return records, seconds
        for m, n_run in runs:
            bar.set_postfix_str(f"{m.name} N={n_run}")
            t0 = time.perf_counter()
            results = run_method(env, gen, items, m, n_run, _seed_for(seed, m.name, m.kind, n_run), bar)
            seconds[f"{m.name} N={n_run}"] = time.perf_counter() - t0
            records += result_records(results, m, n_run, env.gold)
    return records, seconds


def teacher_variant(m: Method) -> tuple[str, float | None, bool] | None:
    """Which teacher-ceiling run (prs_jax.world.ceiling.teacher_selected) is `m`'s counterpart: (method, PRS
    split, feedback); None for PRS deeper than two layers (the teacher refines once)."""
    if m.kind in ("rand", "prand"):
        return m.kind, None, True
    if m.kind == "prs" and m.depth == 2:
        return "prs", m.split, m.feedback
    return None


def teacher_records(world: Any, items: Sequence[PromptItem], methods: Sequence[Method], budgets: Sequence[int],
                    seed: int) -> list[dict[str, Any]]:
    """Per prompt, the teacher-as-policy ceiling of every method and budget: the GOLD reward of the gold-selected
    answer ({"method": "teacher", "id", "gold": {method: {N: value}}}); Rand / PRand streams are shared by all
    PRS variants, draws are keyed by (seed, prompt id, role)."""
    from prs_jax.world.ceiling import teacher_selected
    from prs_jax.world.gates import _prompt_of  # the world's Prompt parsed from a held-out row's text
    from prs_jax.world.task import gold_reward

    budgets = sorted({int(b) for b in budgets})
    rows = []
    for it in items:
        p = _prompt_of({"prompt": it.prompt, "preference": it.preference})
        cache: dict[tuple[float | None, bool], dict[str, dict[int, Any]]] = {}
        gold: dict[str, dict[str, float]] = {}
        for m in methods:
            v = teacher_variant(m)
            if v is None:
                continue
            kind, split, feedback = v
            if (split, feedback) not in cache:
                cache[(split, feedback)] = teacher_selected(world, p, budgets, seed, feedback=feedback, split=split)
            picks = cache[(split, feedback)][kind]
            gold[m.name] = {str(n): float(gold_reward(it.prompt, picks[n].text(), it.preference)) for n in budgets
                            if m.kind != "prs" or m.widths(n) is not None}
        rows.append({"method": "teacher", "kind": "teacher", "id": it.id, "gold": gold})
    return rows


def summarise_records(records: Sequence[dict[str, Any]], methods: Sequence[Method], budgets: Sequence[int],
                      reuse_samples: bool = True, console: Any = None) -> dict[str, Any]:
    """Per method and budget (pure, from the records): per-prompt proxy and gold of the selected response, oracle
    gold (best gold among the candidates), mean gold of the candidates; at the largest budget also every
    candidate's gold/proxy. Rand / PRand at N < max take the first N of the largest run's candidates."""
    budgets = sorted({int(b) for b in budgets})
    nmax = budgets[-1]
    teacher = [r for r in records if r.get("kind") == "teacher"]
    records = [r for r in records if r.get("kind") != "teacher"]
    with_gold = any("gold" in r for r in records)
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        by_run.setdefault((r["method"], int(r["n_run"])), []).append(r)
    out: dict[str, Any] = {"methods": {}, "skipped": []}
    for m in methods:
        rows: dict[str, Any] = {}
        for n in budgets:
            if m.kind == "prs" and m.widths(n) is None:
                out["skipped"].append(f"{m.name} at N={n} (needs N >= depth = {m.depth})")
        for m_, n_run in [r for r in _runs(methods, budgets, reuse_samples) if r[0] is m]:
            run = by_run.get((m.name, n_run))
            if run is None:
                raise ValueError(f"the records have no run of {m.name!r} at N={n_run}; measure again.")
            for n in _targets(m, n_run, budgets, reuse_samples):
                rows[str(n)] = _summarise_rows(run, n, with_gold, full=(n == nmax), prefix=m.kind != "prs")
                if m.kind == "prs":
                    rows[str(n)]["widths"] = list(m.widths(n) or ())
                tv = [t["gold"][m.name][str(n)] for t in teacher if str(n) in t["gold"].get(m.name, {})]
                if tv:
                    rows[str(n)]["teacher_gold"], rows[str(n)]["teacher_gold_se"] = mean_se(tv)
        out["methods"][m.name] = rows
        if console is not None:
            line = "  ".join(f"N={n}: {_fmt(rows[n], with_gold)}" for n in sorted(rows, key=int))
            console.print(f"  {m.name:<18} {line}", markup=False)
    return out


def measure(env: StudyEnv, gen: Generation, items: Sequence[PromptItem], methods: Sequence[Method],
            budgets: Sequence[int], seed: int, reuse_samples: bool = True, console: Any = None) -> dict[str, Any]:
    """measure_records + summarise_records (the summary, with "seconds" per run and the raw "records")."""
    records, seconds = measure_records(env, gen, items, methods, budgets, seed, reuse_samples)
    out = summarise_records(records, methods, budgets, reuse_samples, console)
    out.update(seconds=seconds, records=records)
    return out


def _fmt(row: dict[str, Any], with_gold: bool) -> str:
    return f"gold {row['gold']:.3f} proxy {row['proxy']:+.2f}" if with_gold else f"RM {row['proxy']:+.3f}"


def _summarise(results: Sequence[StrategyResult], n: int, gold: Callable | None, full: bool, prefix: bool
               ) -> dict[str, Any]:
    """_summarise_rows of strategy results (the row's `_items` are the results' own items)."""
    row = _summarise_rows(result_records(results, Method("", "prs"), n, gold), n, gold is not None, full, prefix)
    row["_items"] = [r.item for r in results]
    return row


def _summarise_rows(runs: Sequence[dict[str, Any]], n: int, with_gold: bool, full: bool, prefix: bool
                    ) -> dict[str, Any]:
    """Selection among the first n candidates (prefix=True, i.i.d. best-of-N) or among all candidates (PRS)."""
    sel_proxy, sel_gold, oracle, cand_mean, sel_text, sel_layer = [], [], [], [], [], []
    all_gold: list[list[float]] = []
    all_proxy: list[list[float]] = []
    for r in runs:
        k = n if prefix else len(r["proxy"])
        proxies = r["proxy"][:k]
        i = _argmax_first(proxies)
        sel_proxy.append(proxies[i])
        sel_text.append(r["texts"][i] if "texts" in r else None)  # records kept without texts (scaling)
        sel_layer.append(r["layer"][i])
        all_proxy.append(proxies)
        if with_gold:
            gs = r["gold"][:k]
            sel_gold.append(gs[i])
            oracle.append(max(gs))
            cand_mean.append(float(np.mean(gs)))
            all_gold.append(gs)
    row: dict[str, Any] = {"n": n, "prompts": len(runs)}
    row["proxy"], row["proxy_se"] = mean_se(sel_proxy)
    row["per_prompt_proxy"] = sel_proxy
    row["selected_from_refinement"] = float(np.mean([layer > 0 for layer in sel_layer]))
    if with_gold:
        row["gold"], row["gold_se"] = mean_se(sel_gold)
        row["oracle_gold"], row["oracle_gold_se"] = mean_se(oracle)
        row["candidate_gold"], row["candidate_gold_se"] = mean_se(cand_mean)
        row["per_prompt_gold"] = sel_gold
        row["per_prompt_oracle_gold"] = oracle
    row["_texts"] = sel_text  # dropped before JSON (kept for output files)
    row["_items"] = [PromptItem(r["id"], r["prompt"], r["preference"]) for r in runs]
    if full:
        row["_all_gold"] = all_gold
        row["_all_proxy"] = all_proxy
    return row


def paired_gain(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean ± s.e. of the per-prompt difference a - b."""
    return mean_se(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))


def histogram(values: Sequence[float], bins: int = 20, lo: float = 0.0, hi: float = 1.0) -> dict[str, Any]:
    """Counts of `values` in `bins` equal bins over [lo, hi] (JSON-ready)."""
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def public_rows(measured: dict[str, Any]) -> dict[str, Any]:
    """The measurement without the private (underscore) fields."""
    return {name: {n: {k: v for k, v in row.items() if not k.startswith("_")} for n, row in rows.items()}
            for name, rows in measured["methods"].items()}


def selected_gold(records: Sequence[dict[str, Any]], methods: Sequence[Method], budgets: Sequence[int],
                  reuse_samples: bool = True) -> dict[tuple[str, int], dict[str, float]]:
    """Per (method, N): prompt id -> GOLD reward of the response the proxy selects (pure, from the records;
    Rand / PRand at N < max take the first N of the largest run, as summarise_records does)."""
    budgets = sorted({int(b) for b in budgets})
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") != "teacher":
            by_run.setdefault((r["method"], int(r["n_run"])), []).append(r)
    out: dict[tuple[str, int], dict[str, float]] = {}
    for m, n_run in _runs(methods, budgets, reuse_samples):
        prefix = reuse_samples and m.kind != "prs"
        for n in _targets(m, n_run, budgets, reuse_samples):
            sel = out.setdefault((m.name, n), {})
            for r in by_run.get((m.name, n_run), []):
                k = n if prefix else len(r["proxy"])
                sel[r["id"]] = float(r["gold"][_argmax_first(r["proxy"][:k])])
    return out


ENDPOINT_KINDS = ("gold", "teacher")


def parse_endpoint(name: str) -> tuple[str, str, str, int]:
    """(kind, A, B, N) of an endpoint name `gold:A:B@N` (policy, proxy selects; A - B in gold reward per prompt)
    or `teacher:A:B@N` (the teacher ceiling, gold selects)."""
    head, at, n = name.rpartition("@")
    parts = head.split(":")
    if not at or len(parts) != 3 or parts[0] not in ENDPOINT_KINDS or not n.isdigit():
        raise ValueError(f"protocol endpoint {name!r}: expected gold:A:B@N or teacher:A:B@N (A, B method names, "
                         "N a budget), e.g. 'gold:PRS:PRand@16'.")
    return parts[0], parts[1], parts[2], int(n)


def endpoint_units(name: str, records: Sequence[dict[str, Any]], methods: Sequence[Method],
                   budgets: Sequence[int], reuse_samples: bool = True) -> np.ndarray:
    """The per-prompt paired differences of one endpoint on one seed's records (gold: selected-response gold of
    A minus B on the prompts both measured; teacher: the teacher ceiling's A minus B)."""
    kind, a, b, n = parse_endpoint(name)
    if kind == "teacher":
        rows = [r for r in records if r.get("kind") == "teacher"]
        return np.array([r["gold"][a][str(n)] - r["gold"][b][str(n)] for r in rows
                         if str(n) in r["gold"].get(a, {}) and str(n) in r["gold"].get(b, {})], float)
    return paired_gold(selected_gold(records, methods, budgets, reuse_samples), a, b, n, name)


def paired_gold(sel: dict[tuple[str, int], dict[str, float]], a: str, b: str, n: int, name: str) -> np.ndarray:
    """Per prompt both measured: the selected-response gold of a minus b at budget n (`sel`: selected_gold)."""
    if (a, n) not in sel or (b, n) not in sel:
        raise ValueError(f"protocol endpoint {name!r}: the records have no selection of {a!r} or {b!r} at N={n}.")
    return np.array([sel[(a, n)][i] - sel[(b, n)][i] for i in sel[(a, n)] if i in sel[(b, n)]], float)


def default_comparisons(methods: Sequence[Method]) -> tuple[tuple[str, str], ...]:
    """Every PRS method vs PRand and vs Rand (the first of each kind), then PRand vs Rand."""
    rand = next((m.name for m in methods if m.kind == "rand"), None)
    prand = next((m.name for m in methods if m.kind == "prand"), None)
    out = [(m.name, base) for m in methods if m.kind == "prs" for base in (prand, rand) if base]
    if prand and rand:
        out.append((prand, rand))
    return tuple(out)


def effects(by_seed: dict[int, list[dict[str, Any]]], cfg: "Config") -> list[dict[str, Any]]:
    """Per comparison (a, b) and budget: the paired gold effect a - b with its seed-stratified bootstrap 95%
    interval over the pooled prompts, and the teacher ceiling's effect (pure, from the records)."""
    budgets = sorted({int(b) for b in cfg.budgets})
    comps = cfg.comparisons or default_comparisons(cfg.methods)
    by_m = {m.name: m for m in cfg.methods}
    sel = {s: selected_gold(by_seed[s], cfg.methods, budgets, cfg.reuse_samples) for s in sorted(by_seed)}
    out = []
    for a, b in comps:
        for n in budgets:
            if any(by_m[x].kind == "prs" and by_m[x].widths(n) is None for x in (a, b)):
                continue
            per = [paired_gold(sel[s], a, b, n, f"gold:{a}:{b}@{n}") for s in sorted(by_seed)]
            mean, lo, hi = pooled_ci([list(x) for x in per], cfg.n_boot, f"gold:{a}:{b}@{n}")
            row = {"a": a, "b": b, "n": n, "effect": mean, "low": lo, "high": hi, "prompts": int(sum(map(len, per)))}
            tea = [endpoint_units(f"teacher:{a}:{b}@{n}", by_seed[s], cfg.methods, budgets) for s in sorted(by_seed)]
            if sum(map(len, tea)):
                row["teacher"] = float(np.mean(np.concatenate(tea)))
                row["fraction_of_ceiling"] = mean / row["teacher"] if abs(row["teacher"]) > 1e-9 else None
            out.append(row)
    return out


def teacher_ceilings(names: Sequence[str], records: Sequence[dict[str, Any]], budgets: Sequence[int]
                     ) -> dict[str, float]:
    """The teacher ceiling of each gold:A:B@N endpoint (the teacher's A - B, pooled over the records)."""
    out = {}
    for name in names:
        kind, a, b, n = parse_endpoint(name)
        if kind == "gold":
            t = endpoint_units(f"teacher:{a}:{b}@{n}", records, (), budgets)
            if t.size:
                out[name] = float(t.mean())
    return out


# ------------------------------------------------------------------------------------------------ report
def _pm(mean: float, se: float) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {se:.3f}"


def report(rec: Record, measured: dict[str, Any], budgets: Sequence[int], with_gold: bool, title_suffix: str = "",
           effect_rows: Sequence[dict[str, Any]] = ()) -> None:
    """Tables (gold, proxy, oracle, teacher ceiling; paired effects with 95% CIs; largest-N summary with paired
    gains over Rand) and the figures (curves with the teacher ceiling dashed, effects, distribution)."""
    methods = measured["methods"]
    budgets = sorted({int(b) for b in budgets})
    nmax = str(budgets[-1])
    heads = ["method", *[f"N={n}" for n in budgets]]

    def grid(key: str) -> list[list[str]]:
        return [[name, *[_pm(rows[str(n)][key], rows[str(n)][f"{key}_se"]) if str(n) in rows else "—"
                         for n in budgets]] for name, rows in methods.items()]

    if with_gold:
        rec.table("Gold reward of the response selected by the proxy RM (mean ± s.e. over prompts)" + title_suffix,
                  heads, grid("gold"))
    rec.table(("Proxy RM reward of the selected response" if with_gold else
               "Reward-model score of the selected response (the selection criterion; no gold reward on real data)")
              + title_suffix, heads, grid("proxy"))
    if with_gold:
        rec.table("Oracle: best gold reward among the same candidates" + title_suffix, heads, grid("oracle_gold"))
    has_teacher = with_gold and any("teacher_gold" in r for rs in methods.values() for r in rs.values())
    if has_teacher:
        rec.table("Teacher ceiling: the world's teacher programs as the policy on the same prompts, GOLD selection "
                  "(what a perfect imitator of the corpus reaches)" + title_suffix, heads,
                  [[name, *[_pm(rows[str(n)]["teacher_gold"], rows[str(n)]["teacher_gold_se"])
                            if "teacher_gold" in rows.get(str(n), {}) else "—" for n in budgets]]
                   for name, rows in methods.items()])
    if effect_rows:
        rec.table("Paired effects A - B in " + ("gold reward" if with_gold else "RM score")
                  + " (same prompts and drafts; seed-stratified bootstrap 95% CI; teacher ceiling and the share of it "
                  "reached)" + title_suffix, ["A - B", "N", "effect [95% CI]", "teacher", "of ceiling", "prompts"],
                  [[f"{e['a']} - {e['b']}", e["n"], f"{e['effect']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]",
                    f"{e['teacher']:+.3f}" if "teacher" in e else "—",
                    f"{e['fraction_of_ceiling']:.0%}" if e.get("fraction_of_ceiling") is not None else "—",
                    e["prompts"]] for e in effect_rows])
    base = methods.get("Rand", {}).get(nmax)
    key = "gold" if with_gold else "proxy"
    rows = []
    for name, rs in methods.items():
        r = rs.get(nmax)
        if r is None:
            continue
        gain = paired_gain(r[f"per_prompt_{key}"], base[f"per_prompt_{key}"]) if base is not None else (
            float("nan"), float("nan"))
        rows.append([name, *([_pm(r["gold"], r["gold_se"]), _pm(r["oracle_gold"], r["oracle_gold_se"]),
                              f"{r['oracle_gold'] - r['gold']:.3f}", _pm(r["candidate_gold"],
                                                                          r["candidate_gold_se"])]
                             if with_gold else []), _pm(r["proxy"], r["proxy_se"]), _pm(*gain),
                     f"{r['selected_from_refinement']:.2f}"])
    rec.table(f"At N={nmax}" + title_suffix,
              ["method", *(["gold (selected)", "oracle gold", "oracle - selected", "mean gold of candidates"]
                           if with_gold else []), "proxy (selected)", f"{key} gain over Rand (paired)",
               "share selected from a refinement layer"], rows)

    def draw_curves(fig: Any) -> None:
        panels = [("gold", "gold reward of the selected response"), ("proxy", "proxy RM reward (selection score)"),
                  ("oracle_gold", "oracle: best gold among candidates")] if with_gold else [
            ("proxy", "reward-model score of the selected response")]
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (k, label) in zip(axes, panels):
            for name, rs in methods.items():
                ns = sorted(int(n) for n in rs)
                line = ax.errorbar(ns, [rs[str(n)][k] for n in ns], yerr=[rs[str(n)][f"{k}_se"] for n in ns],
                                   marker="o", ms=3, capsize=2, label=name,
                                   linestyle="--" if "no feedback" in name else "-")
                tn = [n for n in ns if "teacher_gold" in rs[str(n)]]
                if k == "gold" and tn:
                    ax.plot(tn, [rs[str(n)]["teacher_gold"] for n in tn], ls=":", alpha=0.6,
                            color=line[0].get_color(), label=f"{name} teacher ceiling")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(n) for n in budgets])
            ax.set_xlabel("N (samples per prompt)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)

    rec.figure("reward_vs_n.png", draw_curves, figsize=(5.5 * (3 if with_gold else 1), 4.2))

    def draw_effects(fig: Any) -> None:
        ax = fig.subplots()
        for a, b in dict.fromkeys((e["a"], e["b"]) for e in effect_rows):
            es = [e for e in effect_rows if (e["a"], e["b"]) == (a, b)]
            ns = [e["n"] for e in es]
            d = np.array([e["effect"] for e in es])
            line = ax.errorbar(ns, d, yerr=[d - [e["low"] for e in es], [e["high"] for e in es] - d], marker="o",
                               ms=3, capsize=3, label=f"{a} - {b}")
            tn = [e for e in es if "teacher" in e]
            if tn:
                ax.plot([e["n"] for e in tn], [e["teacher"] for e in tn], ls=":", alpha=0.6,
                        color=line[0].get_color(), label=f"{a} - {b} teacher ceiling")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.set_xlabel("N (samples per prompt)")
        ax.set_ylabel("paired effect (" + ("gold" if with_gold else "RM score") + "), 95% CI")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    if effect_rows:
        rec.figure("effects.png", draw_effects, figsize=(7.5, 4.5))

    def draw_dist(fig: Any) -> None:
        ax = fig.subplots()
        names = [nm for nm in methods if nmax in methods[nm]]
        key_all, key_sel = ("_all_gold", "per_prompt_gold") if with_gold else ("_all_proxy", "per_prompt_proxy")
        data_all = [[v for vs in methods[nm][nmax][key_all] for v in vs] for nm in names]
        data_sel = [methods[nm][nmax][key_sel] for nm in names]
        pos = np.arange(len(names)) * 3.0
        for data, offset, color, label in ((data_all, -0.55, "tab:blue", "all candidates"),
                                           (data_sel, 0.55, "tab:orange", "selected by the proxy")):
            parts = ax.violinplot(data, positions=pos + offset, widths=1.0, showmeans=True, showextrema=False)
            for body in parts["bodies"]:
                body.set_facecolor(color)
                body.set_alpha(0.5)
            parts["cmeans"].set_color(color)
            ax.plot([], [], color=color, lw=6, alpha=0.5, label=label)
        ax.set_xticks(pos)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("gold reward" if with_gold else "reward-model score")
        ax.set_title(f"distribution at N={nmax}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    rec.figure("reward_distribution.png", draw_dist, figsize=(9, 4.5))


def distribution_json(measured: dict[str, Any], nmax: int, with_gold: bool) -> dict[str, Any]:
    """Histograms at the largest N: every candidate and the selected responses, per method."""
    out = {}
    for name, rows in measured["methods"].items():
        r = rows.get(str(nmax))
        if r is None:
            continue
        if with_gold:
            out[name] = {"candidates_gold": histogram([v for vs in r["_all_gold"] for v in vs]),
                         "selected_gold": histogram(r["per_prompt_gold"])}
        else:
            allp = [v for vs in r["_all_proxy"] for v in vs]
            lo, hi = float(min(allp)), float(max(allp)) + 1e-6
            out[name] = {"candidates_rm": histogram(allp, lo=lo, hi=hi),
                         "selected_rm": histogram(r["per_prompt_proxy"], lo=lo, hi=hi)}
    return out


def write_outputs(out_dir: Path, measured: dict[str, Any]) -> list[str]:
    """Selected responses per method and N in AlpacaEval's outputs format (instruction, output, generator)."""
    d = out_dir / "outputs"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for name, rows in measured["methods"].items():
        for n, r in rows.items():
            tag = "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
            path = d / f"{tag}-N{n}.json"
            path.write_text(json.dumps([{"instruction": it.prompt, "output": t, "generator": f"{name} N={n}",
                                         "id": it.id} for it, t in zip(r["_items"], r["_texts"])], indent=1))
            files.append(str(path))
    return files


RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"


def _check(cfg: Config) -> None:
    if not cfg.budgets or min(cfg.budgets) < 1:
        raise ValueError(f"budgets: need positive sample budgets, got {list(cfg.budgets)}.")
    if not cfg.methods:
        raise ValueError("methods: empty; list at least one method (see DEFAULT_METHODS).")
    names = [m.name for m in cfg.methods]
    bad = [n for n in names if ":" in n or "@" in n or not n]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"methods: names must be unique, non-empty and free of ':' and '@' (endpoint names use "
                         f"them), got {names}.")
    by_m = {m.name: m for m in cfg.methods}
    for a, b in cfg.comparisons:
        if a not in by_m or b not in by_m:
            raise ValueError(f"comparisons: [{a}, {b}] names a method that is not in methods {names}.")
    for e in cfg.protocol.endpoints:
        kind, a, b, n = parse_endpoint(e.name)
        if a not in by_m or b not in by_m or n not in cfg.budgets:
            raise ValueError(f"protocol endpoint {e.name!r}: methods must be among {names} and N among the "
                             f"budgets {list(cfg.budgets)}.")
        if any(by_m[x].kind == "prs" and by_m[x].widths(n) is None for x in (a, b)):
            raise ValueError(f"protocol endpoint {e.name!r}: a PRS method there needs N >= its depth.")
        if kind == "teacher" and (not cfg.teacher or any(teacher_variant(by_m[x]) is None for x in (a, b))):
            raise ValueError(f"protocol endpoint {e.name!r}: needs teacher: true and methods with a teacher "
                             "counterpart (Rand, PRand, two-layer PRS).")


# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "pool_dirs", "protocol", "comparisons", "n_boot")


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure: run every method at every budget (paired when reuse_samples) and, in the world, the teacher
    ceiling on the same prompts; writes OUT/records.jsonl (one row per run and prompt: every candidate's text,
    proxy and gold reward; one teacher row per prompt) and OUT/measure.json (config, timings, world facts, the
    declared protocol). No tables."""
    from prs_jax.config import to_dict
    from prs_jax.data.io import write_jsonl, write_text_atomic

    _check(cfg)
    env = study_env(cfg.source, cfg.generation, console)
    items = load_items(env, cfg.prompts)
    if console is not None:
        console.print(f"reward_vs_n: {len(items)} prompts, N in {sorted(cfg.budgets)}, methods "
                      f"{[m.name for m in cfg.methods]}" + (" (paired: shared drafts)" if cfg.reuse_samples else ""),
                      markup=False)
    records, seconds = measure_records(env, cfg.generation, items, cfg.methods, cfg.budgets, cfg.seed,
                                       cfg.reuse_samples)
    teacher_s = 0.0
    if env.world is not None and cfg.teacher:
        t0 = time.perf_counter()
        records += teacher_records(env.world.world(), items, cfg.methods, cfg.budgets, cfg.seed)
        teacher_s = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    write_jsonl(out / RECORDS, records)
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind, "prompts": len(items),
             "policy_parameters": env.param_count(), "run_seconds": seconds, "teacher_seconds": teacher_s,
             "compilations": env.compilations,
             "world_seed": None if env.world is None else env.world.config.seed,
             "world": None if env.world is None else {
                 "key": env.world.report.get("key"), "root": str(env.world.root), "seed": env.world.config.seed,
                 "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy"),
                 "sft_eval_loss": (env.world.report.get("sft_eval") or {}).get("loss"),
                 "gates": (env.world.report.get("gates") or {}).get("rows")},
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


# the world seed varies between pooled OUT directories (and the world path, when a built world is named; and the
# sampling seed, which the quickstart ties to the world seed: each world seed is its own replicate)
POOL_FREE = ("source.world.seed", "source.world.path", "seed")


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: tables, figures, the protocol's verdicts, results.json / results.md (and, on real data, the
    AlpacaEval outputs files) from the saved records alone, pooled over the world seeds of out_dir + pool_dirs;
    re-runnable without models."""
    _check(cfg)
    measured = measured_config(cfg, NOT_MEASURED)
    facts_by, by_seed = pool_measured(cfg.out_dir, cfg.pool_dirs, measured, "reward_vs_n", POOL_FREE,
                                      MEASURE_FACTS, RECORDS)
    seeds = sorted(by_seed)
    facts = next(iter(facts_by.values()))
    records = [r for s in seeds for r in by_seed[s]]
    rec = Record("reward_vs_n", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    measured = summarise_records(records, cfg.methods, cfg.budgets, cfg.reuse_samples, console)
    with_gold = facts["world"] is not None
    nmax = max(cfg.budgets)
    effect_rows = effects(by_seed, cfg) if with_gold else []
    suffix = f" — world seeds {seeds}, {sum(f['prompts'] for f in facts_by.values())} prompts" if len(seeds) > 1 else ""
    report(rec, measured, cfg.budgets, with_gold, suffix, effect_rows)
    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints and with_gold:
        used = [r for s in evaluated_seeds(proto, by_seed) for r in by_seed[s]]
        verdicts = report_protocol(
            rec, proto, by_seed,
            lambda name, rs: endpoint_units(name, rs, cfg.methods, cfg.budgets, cfg.reuse_samples),
            facts_by, MEASURE_FACTS, teacher_ceilings([e.name for e in proto.endpoints], used, cfg.budgets))
    elif proto.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the world's gold reward "
                         "(source.kind: world).")
    rec.results.update({
        "source": facts["source"], "prompts": facts["prompts"], "budgets": sorted(cfg.budgets),
        "world_seeds": seeds, "prompts_per_seed": {str(s): f["prompts"] for s, f in facts_by.items()},
        "policy_parameters": facts["policy_parameters"], "methods": public_rows(measured),
        "effects": effect_rows, "protocol": verdicts,
        "distribution_at_max_n": distribution_json(measured, nmax, with_gold), "skipped": measured["skipped"],
        "run_seconds": {str(s): f["run_seconds"] for s, f in facts_by.items()},
        "teacher_seconds": {str(s): f.get("teacher_seconds", 0.0) for s, f in facts_by.items()},
        "compilations": {str(s): f["compilations"] for s, f in facts_by.items()}})
    if with_gold:
        rec.results["world"] = facts["world"]
        rec.results["worlds"] = {str(s): f["world"] for s, f in facts_by.items()}
        acc = facts["world"].get("rm_heldout_accuracy")
        rec.notes.append("Selection is by the proxy reward model (trained on gold-ranked pairs, held-out pairwise "
                         f"accuracy {acc if acc is not None else float('nan'):.3f}"
                         + (" on world seed " + str(seeds[0]) if len(seeds) > 1 else "") + "); 'gold' is "
                         "the world's programmatic reward r*(x, z, y) of the selected response.")
        if any(r.get("kind") == "teacher" for r in records):
            rec.notes.append("Teacher ceiling: the world's teacher programs run as the policy on the same prompts "
                             "with GOLD selection (prs_jax.world.ceiling); PRS deeper than two layers has none "
                             "(the teacher refines once).")
    else:
        rec.results["outputs"] = write_outputs(Path(cfg.out_dir), measured)
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion, so it is "
                         "optimistic. Judge outputs/*.json with AlpacaEval for the paper's LC win rates.")
    if cfg.reuse_samples:
        rec.notes.append("Paired arms: Rand and PRand take best-of-N for each N over the first N of one draw of "
                         f"{nmax} i.i.d. samples per prompt, and each PRS method's first layer at N is PRand's "
                         "first drafts (reused), so A - B differences share their random numbers.")
    rec.notes += [f"skipped: {s}" for s in measured["skipped"]]
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study: results.json / results.md / PNGs; returns the record."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)
