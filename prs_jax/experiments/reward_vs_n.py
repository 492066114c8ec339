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
def run_method(env: StudyEnv, g: Generation, items: Sequence[PromptItem], method: Method, n: int, seed: int,
               progress: Any = None) -> list[StrategyResult]:
    """Run one method at budget n on every item (batched, `g.batch_size` prompts per engine call)."""
    from prs_jax.strategies.generate import StrategyConfig

    if method.kind == "prs":
        spec = StrategyConfig.of("prs", n, g.sampling(), split=method.split, depth=method.depth,
                                 feedback=method.feedback, mode=g.prs_mode, max_new_tokens=g.max_new_tokens,
                                 feedback_max_new_tokens=g.feedback_max_new_tokens)
    elif method.kind in ("rand", "prand"):
        spec = StrategyConfig.of(method.kind, n, g.sampling(), max_new_tokens=g.max_new_tokens)
    else:
        raise ValueError(f"method {method.name!r}: kind {method.kind!r} is not one of {METHOD_KINDS}")
    strategy = spec.build(templates=env.templates)
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


def _argmax_first(xs: Sequence[float]) -> int:
    return int(np.argmax(np.asarray(xs, dtype=float)))


def _seed_for(seed: int, *parts: Any) -> int:
    """A stable per-run engine seed (zlib.crc32, not hash(): str hashes change between processes)."""
    return int(np.random.SeedSequence([seed, *[zlib.crc32(str(p).encode()) for p in parts]]).generate_state(1)[0]
               % (2**31))


def measure(env: StudyEnv, gen: Generation, items: Sequence[PromptItem], methods: Sequence[Method],
            budgets: Sequence[int], seed: int, reuse_samples: bool = True, console: Any = None) -> dict[str, Any]:
    """Per method and budget: per-prompt proxy and gold of the selected response, oracle gold (best gold among
    the candidates), mean gold of the candidates; at the largest budget also every candidate's gold/proxy."""
    from tqdm import tqdm

    budgets = sorted({int(b) for b in budgets})
    nmax = budgets[-1]
    gold = env.gold
    runs = [(m, n) for m in methods for n in ([nmax] if (reuse_samples and m.kind != "prs") else budgets)
            if m.kind != "prs" or m.widths(n) is not None]
    out: dict[str, Any] = {"methods": {}, "skipped": [], "seconds": {}}
    bar = tqdm(total=len(runs) * len(items), desc="reward_vs_n", unit="prompt", mininterval=5)
    for m in methods:
        rows: dict[str, Any] = {}
        for n in budgets:
            if m.kind == "prs" and m.widths(n) is None:
                out["skipped"].append(f"{m.name} at N={n} (needs N >= depth = {m.depth})")
        for m_, n_run in [r for r in runs if r[0] is m]:
            bar.set_postfix_str(f"{m.name} N={n_run}")
            t0 = time.perf_counter()
            results = run_method(env, gen, items, m, n_run, _seed_for(seed, m.name, m.kind, n_run), bar)
            out["seconds"][f"{m.name} N={n_run}"] = time.perf_counter() - t0
            targets = [n for n in budgets if n <= n_run] if (reuse_samples and m.kind != "prs") else [n_run]
            for n in targets:
                rows[str(n)] = _summarise(results, n, gold, full=(n == nmax), prefix=m.kind != "prs")
                if m.kind == "prs":
                    rows[str(n)]["widths"] = list(m.widths(n) or ())
        out["methods"][m.name] = rows
        if console is not None:
            line = "  ".join(f"N={n}: {_fmt(rows[n], gold is not None)}" for n in sorted(rows, key=int))
            console.print(f"  {m.name:<18} {line}", markup=False)
    bar.close()
    return out


def _fmt(row: dict[str, Any], with_gold: bool) -> str:
    return f"gold {row['gold']:.3f} proxy {row['proxy']:+.2f}" if with_gold else f"RM {row['proxy']:+.3f}"


def _summarise(results: Sequence[StrategyResult], n: int, gold: Callable | None, full: bool, prefix: bool
               ) -> dict[str, Any]:
    """Selection among the first n candidates (prefix=True, i.i.d. best-of-N) or among all candidates (PRS)."""
    sel_proxy, sel_gold, oracle, cand_mean, sel_text, sel_layer = [], [], [], [], [], []
    all_gold: list[list[float]] = []
    all_proxy: list[list[float]] = []
    for r in results:
        cands = r.candidates[:n] if prefix else r.candidates
        proxies = [float(c.reward) for c in cands]
        i = _argmax_first(proxies)
        sel_proxy.append(proxies[i])
        sel_text.append(cands[i].text)
        sel_layer.append(int(cands[i].metadata.get("layer", 0)))
        all_proxy.append(proxies)
        if gold is not None:
            gs = [float(gold(r.item.prompt, c.text, r.item.preference)) for c in cands]
            sel_gold.append(gs[i])
            oracle.append(max(gs))
            cand_mean.append(float(np.mean(gs)))
            all_gold.append(gs)
    row: dict[str, Any] = {"n": n, "prompts": len(results)}
    row["proxy"], row["proxy_se"] = mean_se(sel_proxy)
    row["per_prompt_proxy"] = sel_proxy
    row["selected_from_refinement"] = float(np.mean([layer > 0 for layer in sel_layer]))
    if gold is not None:
        row["gold"], row["gold_se"] = mean_se(sel_gold)
        row["oracle_gold"], row["oracle_gold_se"] = mean_se(oracle)
        row["candidate_gold"], row["candidate_gold_se"] = mean_se(cand_mean)
        row["per_prompt_gold"] = sel_gold
        row["per_prompt_oracle_gold"] = oracle
    row["_texts"] = sel_text  # dropped before JSON (kept for output files)
    row["_items"] = [r.item for r in results]
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


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """Run the study, write results.json / results.md / PNGs, return the record."""
    if not cfg.budgets or min(cfg.budgets) < 1:
        raise ValueError(f"budgets: need positive sample budgets, got {list(cfg.budgets)}.")
    if not cfg.methods:
        raise ValueError("methods: empty; list at least one method (see DEFAULT_METHODS).")
    rec = Record("reward_vs_n", cfg, cfg.out_dir, cfg.seed)
    env = study_env(cfg.source, cfg.generation, console)
    items = load_items(env, cfg.prompts)
    with_gold = env.gold is not None
    if console is not None:
        console.print(f"reward_vs_n: {len(items)} prompts, N in {sorted(cfg.budgets)}, methods "
                      f"{[m.name for m in cfg.methods]}", markup=False)
    measured = measure(env, cfg.generation, items, cfg.methods, cfg.budgets, cfg.seed, cfg.reuse_samples, console)
    nmax = max(cfg.budgets)
    report(rec, measured, cfg.budgets, with_gold)
    rec.results.update({
        "source": cfg.source.kind, "prompts": len(items), "budgets": sorted(cfg.budgets),
        "policy_parameters": env.param_count(), "methods": public_rows(measured),
        "distribution_at_max_n": distribution_json(measured, nmax, with_gold), "skipped": measured["skipped"],
        "run_seconds": measured["seconds"], "compilations": env.compilations})
    if env.world is not None:
        rec.results["world"] = {"key": env.world.report.get("key"), "root": str(env.world.root),
                                "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy"),
                                "sft_eval_loss": (env.world.report.get("sft_eval") or {}).get("loss")}
        rec.notes.append("Selection is by the proxy reward model (trained on gold-ranked pairs, held-out pairwise "
                         f"accuracy {env.world.report.get('rm_heldout_accuracy', float('nan')):.3f}); 'gold' is "
                         "the world's programmatic reward r*(x, z, y) of the selected response.")
    else:
        rec.results["outputs"] = write_outputs(Path(cfg.out_dir), measured)
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion, so it is "
                         "optimistic. Judge outputs/*.json with AlpacaEval for the paper's LC win rates.")
    if cfg.reuse_samples:
        rec.notes.append("Rand and PRand: best-of-N for each N is taken over the first N of one draw of "
                         f"{nmax} i.i.d. samples per prompt (the same estimator as separate draws, less noise "
                         "between N); PRS is run afresh at each N.")
    rec.notes += [f"skipped: {s}" for s in measured["skipped"]]
    return rec.finish(console)
