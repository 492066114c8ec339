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
from prs_jax.experiments.common import Record, Source
from prs_jax.experiments.env import StudyEnv
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
    # Rand/PRand: best-of-N for every N from the first N of one draw of max(budgets) i.i.d. samples
    reuse_samples: bool = True


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


def run_paired(env: StudyEnv, g: Generation, items: Sequence[PromptItem], methods: Sequence[Method], n: int,
               seed: int, progress: Any = None) -> dict[str, list[StrategyResult]]:
    """Every method at budget n on every item, paired: a PRS method's first layer IS the first drafts of the
    first PRand method (reused, not resampled), so PRS - PRand measures what refinement adds to the same drafts.
    One engine (one seed) serves every method; its draws are keyed by (seed, prompt id, prompt tokens, tree
    position), so batching never changes them (two methods that add the same prompt get independent draws: the
    engine counts repeated roots). Prompts without a preference are not reused (PRS would refine drafts written
    without the preference it asks about). `progress` advances by prompts x methods."""
    engine = env.engine(seed)
    strategies = {m.name: method_strategy(env, g, m, n) for m in methods}
    prand = next((m for m in methods if m.kind == "prand"), None)
    order = [m for m in methods if m.kind != "prs"] + [m for m in methods if m.kind == "prs"]
    out: dict[str, list[StrategyResult]] = {m.name: [] for m in methods}
    for start in range(0, len(items), g.batch_size):
        batch = list(items[start:start + g.batch_size])
        done: dict[str, list[StrategyResult]] = {}
        for m in order:
            strategy = strategies[m.name]
            reuse = (m.kind == "prs" and prand is not None and strategy.widths[0] <= strategies[prand.name].n
                     and all(it.preference for it in batch))
            if reuse:
                first = [r.layers[0][:strategy.widths[0]] for r in done[prand.name]]
                done[m.name] = strategy.run(batch, engine, env.proxy, first_layer=first)
            else:
                done[m.name] = strategy.run(batch, engine, env.proxy)
            if progress is not None:
                progress.update(len(batch))
        engine.release(list(engine.tree))  # results keep text and rewards; the KV is not needed any more
        for name, rs in done.items():
            out[name] += rs
    env.compilations += engine.compilations
    return out


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
    run."""
    from tqdm import tqdm

    budgets = sorted({int(b) for b in budgets})
    runs = _runs(methods, budgets, reuse_samples)
    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    bar = tqdm(total=len(runs) * len(items), desc="reward_vs_n", unit="prompt", mininterval=5)
    for m, n_run in runs:
        bar.set_postfix_str(f"{m.name} N={n_run}")
        t0 = time.perf_counter()
        results = run_method(env, gen, items, m, n_run, _seed_for(seed, m.name, m.kind, n_run), bar)
        seconds[f"{m.name} N={n_run}"] = time.perf_counter() - t0
        records += result_records(results, m, n_run, env.gold)
    bar.close()
    return records, seconds


def summarise_records(records: Sequence[dict[str, Any]], methods: Sequence[Method], budgets: Sequence[int],
                      reuse_samples: bool = True, console: Any = None) -> dict[str, Any]:
    """Per method and budget (pure, from the records): per-prompt proxy and gold of the selected response, oracle
    gold (best gold among the candidates), mean gold of the candidates; at the largest budget also every
    candidate's gold/proxy. Rand / PRand at N < max take the first N of the largest run's candidates."""
    budgets = sorted({int(b) for b in budgets})
    nmax = budgets[-1]
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
            targets = [n for n in budgets if n <= n_run] if (reuse_samples and m.kind != "prs") else [n_run]
            for n in targets:
                rows[str(n)] = _summarise_rows(run, n, with_gold, full=(n == nmax), prefix=m.kind != "prs")
                if m.kind == "prs":
                    rows[str(n)]["widths"] = list(m.widths(n) or ())
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
        k = n if prefix else len(r["texts"])
        proxies = r["proxy"][:k]
        i = _argmax_first(proxies)
        sel_proxy.append(proxies[i])
        sel_text.append(r["texts"][i])
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


# ------------------------------------------------------------------------------------------------ report
def _pm(mean: float, se: float) -> str:
    return "n/a" if mean is None or (isinstance(mean, float) and math.isnan(mean)) else f"{mean:.3f} ± {se:.3f}"


def report(rec: Record, measured: dict[str, Any], budgets: Sequence[int], with_gold: bool, title_suffix: str = ""
           ) -> None:
    """Tables (gold, proxy, oracle; largest-N summary with paired gains over Rand) and the two figures."""
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
                ax.errorbar(ns, [rs[str(n)][k] for n in ns], yerr=[rs[str(n)][f"{k}_se"] for n in ns], marker="o",
                            ms=3, capsize=2, label=name, linestyle="--" if "no feedback" in name else "-")
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [str(n) for n in budgets])
            ax.set_xlabel("N (samples per prompt)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)

    rec.figure("reward_vs_n.png", draw_curves, figsize=(5.5 * (3 if with_gold else 1), 4.2))

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


def _measured_config(cfg: Config) -> dict[str, Any]:
    """The config keys that decide the records (everything but out_dir), as plain JSON."""
    from prs_jax.config import to_dict

    return json.loads(json.dumps({k: v for k, v in to_dict(cfg).items() if k != "out_dir"}, default=str))


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure: run every method at every budget and write OUT/records.jsonl (one row per run and prompt: every
    candidate's text, proxy and gold reward) and OUT/measure.json (config, timings, world facts). No tables."""
    from prs_jax.data.io import write_jsonl, write_text_atomic

    _check(cfg)
    env = study_env(cfg.source, cfg.generation, console)
    items = load_items(env, cfg.prompts)
    if console is not None:
        console.print(f"reward_vs_n: {len(items)} prompts, N in {sorted(cfg.budgets)}, methods "
                      f"{[m.name for m in cfg.methods]}", markup=False)
    records, seconds = measure_records(env, cfg.generation, items, cfg.methods, cfg.budgets, cfg.seed,
                                       cfg.reuse_samples)
    out = Path(cfg.out_dir)
    write_jsonl(out / RECORDS, records)
    facts = {"config": _measured_config(cfg), "source": cfg.source.kind, "prompts": len(items),
             "policy_parameters": env.param_count(), "run_seconds": seconds, "compilations": env.compilations,
             "world": None if env.world is None else {
                 "key": env.world.report.get("key"), "root": str(env.world.root),
                 "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy"),
                 "sft_eval_loss": (env.world.report.get("sft_eval") or {}).get("loss")}}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: tables, figures, results.json / results.md (and, on real data, the AlpacaEval outputs files) from
    OUT/records.jsonl and OUT/measure.json alone; re-runnable without models."""
    out = Path(cfg.out_dir)
    facts_file, records_file = out / MEASURE_FACTS, out / RECORDS
    if not facts_file.is_file() or not records_file.is_file():
        raise FileNotFoundError(f"{out}: no {MEASURE_FACTS} / {RECORDS}; measure first (prs-jax experiment "
                                "reward_vs_n CONFIG, without --report).")
    _check(cfg)
    facts = json.loads(facts_file.read_text())
    now = _measured_config(cfg)
    diff = sorted(k for k in set(now) | set(facts["config"]) if now.get(k) != facts["config"].get(k))
    if diff:
        raise ValueError(f"{facts_file}: measured with another config (keys {', '.join(diff)} differ); report with "
                         "the config it was measured with, or measure again.")
    with records_file.open(encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    rec = Record("reward_vs_n", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    measured = summarise_records(records, cfg.methods, cfg.budgets, cfg.reuse_samples, console)
    with_gold = facts["world"] is not None
    nmax = max(cfg.budgets)
    report(rec, measured, cfg.budgets, with_gold)
    rec.results.update({
        "source": facts["source"], "prompts": facts["prompts"], "budgets": sorted(cfg.budgets),
        "policy_parameters": facts["policy_parameters"], "methods": public_rows(measured),
        "distribution_at_max_n": distribution_json(measured, nmax, with_gold), "skipped": measured["skipped"],
        "run_seconds": facts["run_seconds"], "compilations": facts["compilations"]})
    if with_gold:
        world = facts["world"]
        rec.results["world"] = world
        acc = world.get("rm_heldout_accuracy")
        rec.notes.append("Selection is by the proxy reward model (trained on gold-ranked pairs, held-out pairwise "
                         f"accuracy {acc if acc is not None else float('nan'):.3f}); 'gold' is "
                         "the world's programmatic reward r*(x, z, y) of the selected response.")
    else:
        rec.results["outputs"] = write_outputs(out, measured)
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion, so it is "
                         "optimistic. Judge outputs/*.json with AlpacaEval for the paper's LC win rates.")
    if cfg.reuse_samples:
        rec.notes.append("Rand and PRand: best-of-N for each N is taken over the first N of one draw of "
                         f"{nmax} i.i.d. samples per prompt (the same estimator as separate draws, less noise "
                         "between N); PRS is run afresh at each N.")
    rec.notes += [f"skipped: {s}" for s in measured["skipped"]]
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study: results.json / results.md / PNGs; returns the record."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)
