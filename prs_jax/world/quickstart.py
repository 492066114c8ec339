"""The README's main job (v2): build (or reuse) the synthetic world, then compare Rand, PRand and PRS at budgets N
on held-out prompts in a PAIRED design, selecting with the proxy reward model and reporting the GOLD reward.

Common random numbers: Rand and PRand at budget N select among the first N of one stream of 16 samples per
prompt, and PRS's first layer at budget N is PRand's first N // 2 samples (then one self-critique of the best by
the proxy RM and N - N // 2 refinements). Effects PRS - PRand and PRS - Rand are per-prompt differences with
bootstrap 95% intervals, each beside its teacher ceiling (the teacher programs as the policy, gold selection;
prs_jax.world.ceiling). The world's skill-gate table is printed with them. Writes results JSON (config, world,
commit, versions, wall time), a PNG with the intervals, and prints the tables.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from prs_jax.config import check_ranges
from prs_jax.errors import ConfigError
from prs_jax.eval.stats import bootstrap_ci, mean_se, paired_bootstrap_ci
from prs_jax.models import load_causal_lm, load_reward_model, load_tokenizer
from prs_jax.strategies.base import PromptItem, RewardModelScorer, join_preference, score_nodes
from prs_jax.strategies.prs import PRS
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.scoring import RewardScorer
from prs_jax.world.build import BuiltWorld, build_world, load_world, preset
from prs_jax.world.ceiling import METHODS, prs_widths, teacher_best_of_n
from prs_jax.world.corpus import world_templates
from prs_jax.world.gates import gate_table
from prs_jax.world.task import Prompt, gold_reward, parse_preference, parse_prompt


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs."""

    preset: str = "default"
    world_root: str = "runs/world"
    world_dir: str = ""  # an existing built world (e.g. `world build sft_steps=2800`): used instead of the preset,
    # and its seed becomes the sampling seed
    out_dir: str = "runs/quickstart"
    seed: int = 0  # the world's seed (and the sampling seed)
    prompts: int = 256
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16)
    temperature: float = 1.0
    max_new_tokens: int = 40
    feedback_max_new_tokens: int = 40
    bootstrap: int = 2000
    allow_weak: bool = True  # the gate table is printed either way; False (--strict) stops on a failed gate

    def __post_init__(self) -> None:
        check_ranges(self, "", {"prompts": ">= 1", "temperature": "> 0", "max_new_tokens": ">= 1",
                                "feedback_max_new_tokens": ">= 1", "bootstrap": ">= 1"})
        if not self.budgets or any(n <= 0 for n in self.budgets):
            raise ConfigError(f"budgets must be positive integers (every N must be >= 1), got {list(self.budgets)}.")


def smoke_config(**overrides: Any) -> QuickstartConfig:
    """A CI-sized run (tiny world, few prompts, N up to 4): checks the pipeline, not the numbers."""
    return dataclasses.replace(QuickstartConfig(preset="smoke", prompts=4, budgets=(1, 2, 4), max_new_tokens=24,
                                                feedback_max_new_tokens=16, bootstrap=200), **overrides)


def _prompt_of(item: PromptItem) -> Prompt:
    cat, n, form = parse_prompt(item.prompt)
    return Prompt(cat, n, parse_preference(item.preference), form)


def paired_run(built: BuiltWorld, cfg: QuickstartConfig, items: list[PromptItem], console: Console
               ) -> dict[str, dict[int, dict[str, np.ndarray]]]:
    """Per method and budget: per-prompt gold reward of the proxy-selected answer ("proxy") and of the
    gold-selected one ("oracle"), plus the proxy reward, all [prompts] arrays."""
    tok = load_tokenizer(built.policy)
    policy = load_causal_lm(built.policy)
    proxy = RewardModelScorer(RewardScorer(load_reward_model(built.reward_model), tok), include_preference=True)
    engine = TreeEngine(policy, tok, seed=cfg.seed, config=EngineConfig(
        min_prefix_bucket=64, min_new_tokens_bucket=32, min_extend_bucket=32, min_rows_bucket=8))
    sampling = SamplingParams(temperature=cfg.temperature)
    top = max(cfg.budgets)
    out: dict[str, dict[int, dict[str, np.ndarray]]] = {m: {} for m in METHODS}

    def pick(it: PromptItem, nodes) -> tuple[float, float, float]:
        gold = [gold_reward(it.prompt, k.text, it.preference) for k in nodes]
        proxy_r = [k.reward for k in nodes]
        j = int(np.argmax(proxy_r))
        return gold[j], max(gold), proxy_r[j]

    streams = {}
    for method, with_z in (("rand", False), ("prand", True)):
        t0 = time.perf_counter()
        roots = engine.add_prompts([[{"role": "user", "content": join_preference(it.prompt, it.preference)
                                      if with_z else it.prompt}] for it in items],
                                   metadata=[{"prompt_id": it.id} for it in items])
        kids = engine.expand(roots, top, sampling, max_new_tokens=cfg.max_new_tokens)
        score_nodes(proxy, [it for it, ks in zip(items, kids) for _ in ks], [k for ks in kids for k in ks])
        streams[method] = kids
        for n in cfg.budgets:
            vals = np.array([pick(it, ks[:n]) for it, ks in zip(items, kids)])
            out[method][n] = {"proxy": vals[:, 0], "oracle": vals[:, 1], "proxy_reward": vals[:, 2]}
        console.print(f"  {method}: {len(items)} prompts x {top} samples ({time.perf_counter() - t0:.1f} s)",
                      markup=False)
        if method == "rand":  # nothing builds on Rand's samples: give their KV pages back
            engine.release(roots + [k for ks in kids for k in ks])
    for n in cfg.budgets:
        t0 = time.perf_counter()
        if n < 2:
            out["prs"][n] = dict(out["prand"][n])
            continue
        first, _ = prs_widths(n)
        strategy = PRS(widths=prs_widths(n), sampling=sampling, templates=world_templates(),
                       max_new_tokens=cfg.max_new_tokens, feedback_max_new_tokens=cfg.feedback_max_new_tokens)
        results = strategy.run(items, engine, proxy, first_layer=[ks[:first] for ks in streams["prand"]])
        vals = np.array([pick(r.item, r.candidates) for r in results])
        out["prs"][n] = {"proxy": vals[:, 0], "oracle": vals[:, 1], "proxy_reward": vals[:, 2]}
        engine.release_descendants([k for ks in streams["prand"] for k in ks])  # the next N builds afresh
        console.print(f"  prs N={n}: widths {prs_widths(n)} ({time.perf_counter() - t0:.1f} s)", markup=False)
    return out


def summarise(policy: dict[str, dict[int, dict[str, np.ndarray]]], teacher: dict[str, dict[int, np.ndarray]],
              budgets: tuple[int, ...], n_boot: int, seed: int) -> dict[str, Any]:
    """Means with intervals per method and N, and the paired effects with their teacher ceilings."""
    rows: dict[str, Any] = {}
    for n in budgets:
        r: dict[str, Any] = {}
        for m in METHODS:
            mean, lo, hi = bootstrap_ci(policy[m][n]["proxy"], n_boot, seed=seed)
            r[m] = {"gold": mean, "ci": [lo, hi], "se": mean_se(policy[m][n]["proxy"])[1],
                    "oracle": float(policy[m][n]["oracle"].mean()),
                    "proxy_reward": float(policy[m][n]["proxy_reward"].mean()),
                    "teacher": float(teacher[m][n].mean())}
        for a, b in (("prs", "prand"), ("prs", "rand"), ("prand", "rand")):
            d, lo, hi = paired_bootstrap_ci(policy[a][n]["proxy"], policy[b][n]["proxy"], n_boot, seed=seed)
            td, tlo, thi = paired_bootstrap_ci(teacher[a][n], teacher[b][n], n_boot, seed=seed)
            r[f"{a}-{b}"] = {"effect": d, "ci": [lo, hi], "teacher": td, "teacher_ci": [tlo, thi],
                             "fraction_of_ceiling": d / td if abs(td) > 1e-9 else None}
        rows[str(n)] = r
    return rows


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(rows: dict[str, Any], path: Path, title: str) -> Path:
    """Left: gold reward vs N per method with 95% intervals, teacher ceiling dashed. Right: the paired effects
    PRS - PRand and PRS - Rand with 95% intervals beside their teacher ceilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(n) for n in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"rand": "tab:gray", "prand": "tab:blue", "prs": "tab:red"}
    for m in METHODS:
        mean = np.array([rows[str(n)][m]["gold"] for n in ns])
        ci = np.array([rows[str(n)][m]["ci"] for n in ns]).T
        axes[0].errorbar(ns, mean, yerr=[mean - ci[0], ci[1] - mean], marker="o", capsize=3, color=colors[m],
                         label=f"{m.upper() if m == 'prs' else m.capitalize()} (policy, proxy RM selects)")
        axes[0].plot(ns, [rows[str(n)][m]["teacher"] for n in ns], ls="--", color=colors[m], alpha=0.6,
                     label=f"{m} teacher ceiling (gold selects)")
    for key, color in (("prs-prand", "tab:red"), ("prs-rand", "tab:purple")):
        d = np.array([rows[str(n)][key]["effect"] for n in ns])
        ci = np.array([rows[str(n)][key]["ci"] for n in ns]).T
        axes[1].errorbar(ns, d, yerr=[d - ci[0], ci[1] - d], marker="o", capsize=3, color=color,
                         label=f"{key.upper().replace('PRAND', 'PRand').replace('RAND', 'Rand')} (policy)")
        axes[1].plot(ns, [rows[str(n)][key]["teacher"] for n in ns], ls="--", color=color, alpha=0.6,
                     label=f"{key} teacher ceiling")
    axes[1].axhline(0.0, color="black", lw=0.8)
    for ax, label in zip(axes, ("gold reward of the selected response", "paired effect (gold), 95% CI")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (samples per prompt)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_records(path: Path, cfg: QuickstartConfig, built: BuiltWorld, items: list[PromptItem],
                  policy: dict[str, dict[int, dict[str, np.ndarray]]], teacher: dict[str, dict[int, np.ndarray]]
                  ) -> Path:
    """The raw per-prompt measurements (gold of the proxy-selected and of the gold-selected answer, the proxy
    reward; the teacher's gold-selected value), so tables and pooled reports are recomputed without sampling."""
    rec = {"config": dataclasses.asdict(cfg), "world": {"key": built.report["key"], "seed": built.config.seed},
           "prompt_ids": [it.id for it in items],
           "policy": {m: {str(n): {k: [float(v) for v in a] for k, a in policy[m][n].items()} for n in policy[m]}
                      for m in policy},
           "teacher": {m: {str(n): [float(v) for v in teacher[m][n]] for n in teacher[m]} for m in teacher}}
    path.write_text(json.dumps(rec))
    return path


# The quickstart's declared endpoints (pooled over world seeds by `pooled_report`): the design's positive control
# (the teacher as the policy shows the PRS mechanism), then the learned policy's claims.
QUICKSTART_N = 4


def quickstart_protocol(seeds: tuple[int, ...], units: int) -> Any:
    from prs_jax.experiments.protocol import Endpoint, Protocol

    n = QUICKSTART_N
    return Protocol(seeds=seeds, units=units, endpoints=(
        Endpoint(f"teacher prs-prand@{n}", f"the world rewards refinement over resampling (teacher, N={n})",
                 margin=0.1, control=True),
        Endpoint(f"prs-prand@{n}", f"PRS beats PRand at N={n} (proxy RM selects, gold reported)"),
        Endpoint(f"prs-rand@{n}", f"PRS beats Rand at N={n}"),
        Endpoint(f"prand-rand@{n}", f"the preference helps sampling: PRand beats Rand at N={n}")))


def pooled_report(dirs: list[str | Path], out_dir: str | Path, console: Console | None = None) -> dict[str, Any]:
    """Pool the quickstart records of several world seeds (one results directory per seed) under the declared
    protocol: per-seed and pooled effects with bootstrap 95% CIs, Holm p, the fraction of the teacher ceiling and
    a verdict per claim. Writes pooled.json and pooled.md into `out_dir`; measures nothing."""
    from prs_jax.experiments.protocol import evaluate, verdict_table

    console = console or Console()
    recs = []
    for d in dirs:
        f = Path(d) / "records.json"
        if not f.is_file() and (Path(d) / "records-smoke.json").is_file():
            f = Path(d) / "records-smoke.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no quickstart records; run `prs-jax quickstart --seed S --out {d}` first "
                                    "(results written before per-prompt records existed cannot be pooled).")
        recs.append(json.loads(f.read_text()))
    seeds = tuple(int(r["world"]["seed"]) for r in recs)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"quickstart pool: the records come from world seeds {list(seeds)}; pool distinct seeds.")
    n = str(QUICKSTART_N)
    diffs: dict[str, dict[int, np.ndarray]] = {}
    ceilings: dict[str, float] = {}
    for r, s in zip(recs, seeds):
        pol = {m: np.asarray(r["policy"][m][n]["proxy"]) for m in METHODS}
        tea = {m: np.asarray(r["teacher"][m][n]) for m in METHODS}
        diffs.setdefault(f"teacher prs-prand@{n}", {})[s] = tea["prs"] - tea["prand"]
        for a, b in (("prs", "prand"), ("prs", "rand"), ("prand", "rand")):
            diffs.setdefault(f"{a}-{b}@{n}", {})[s] = pol[a] - pol[b]
    for a, b in (("prs", "prand"), ("prs", "rand"), ("prand", "rand")):
        ceilings[f"{a}-{b}@{n}"] = float(np.mean(np.concatenate(
            [np.asarray(r["teacher"][a][n]) - np.asarray(r["teacher"][b][n]) for r in recs])))
    units = min(len(r["prompt_ids"]) for r in recs)
    results = evaluate(quickstart_protocol(seeds, units), diffs, ceilings)
    table = verdict_table(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pooled = {"seeds": list(seeds), "worlds": [r["world"]["key"] for r in recs], "units_per_seed": units,
              "sources": [str(d) for d in dirs], "results": [x.to_dict() for x in results]}
    (out / "pooled.json").write_text(json.dumps(pooled, indent=2))
    (out / "pooled.md").write_text(f"Quickstart pooled over world seeds {list(seeds)} "
                                   f"(worlds {', '.join(pooled['worlds'])}), {units} held-out prompts each\n\n"
                                   + table + "\n")
    console.print(table, markup=False)
    console.print(f"pooled report: {out / 'pooled.json'}, {out / 'pooled.md'}", markup=False)
    return pooled


def _ci(x: dict[str, Any]) -> str:
    return f"{x['effect']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]"


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig(), console: Console | None = None) -> dict[str, Any]:
    """Build or load the world, run the paired comparison and the teacher ceiling, print tables, write JSON + PNG."""
    console = console or Console()
    t_start = time.perf_counter()
    if cfg.world_dir:
        built = load_world(cfg.world_dir, allow_weak=cfg.allow_weak, console=console)
        cfg = dataclasses.replace(cfg, seed=built.config.seed)
    else:
        built = build_world(preset(cfg.preset, seed=cfg.seed), root=cfg.world_root,  # type: ignore[arg-type]
                            console=console, allow_weak=cfg.allow_weak)
    t_world = time.perf_counter() - t_start
    held = built.heldout()
    if len(held) < cfg.prompts:
        console.print(f"quickstart: the world has {len(held)} held-out prompts; using all of them (asked for "
                      f"{cfg.prompts}).", markup=False)
    items = [PromptItem(r["id"], r["prompt"], r["preference"]) for r in held[: cfg.prompts]]
    console.print(f"comparing Rand, PRand, PRS on {len(items)} held-out prompts, N in {list(cfg.budgets)} "
                  "(paired: shared sample streams)", markup=False)
    t0 = time.perf_counter()
    policy = paired_run(built, cfg, items, console)
    t_policy = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = teacher_best_of_n(built.world(), [_prompt_of(it) for it in items], cfg.budgets, seed=cfg.seed)
    t_teacher = time.perf_counter() - t0
    rows = summarise(policy, teacher, tuple(cfg.budgets), cfg.bootstrap, cfg.seed)
    wall = time.perf_counter() - t_start

    table = Table(title=f"gold reward of the response the proxy RM selects ({len(items)} held-out prompts; "
                        "mean, paired effects with bootstrap 95% CI; teacher = ceiling with gold selection)")
    for col in ("N", "Rand", "PRand", "PRS", "PRS - PRand", "teacher", "PRS - Rand", "teacher"):
        table.add_column(col, justify="right")
    for n in cfg.budgets:
        r = rows[str(n)]
        table.add_row(str(n), *[f"{r[m]['gold']:.3f}" for m in METHODS], _ci(r["prs-prand"]),
                      f"{r['prs-prand']['teacher']:+.3f}", _ci(r["prs-rand"]), f"{r['prs-rand']['teacher']:+.3f}")
    console.print(table)
    gates = built.report.get("gates") or {}
    if gates:
        console.print(gate_table(gates, title=f"skill gates of world {built.report['key']} (measured at build)"))
        failed = [g["gate"] for g in gates.get("rows", []) if g.get("passed") is False]
        if failed:
            console.print(f"[yellow]warning:[/] this world misses {len(failed)} skill gate(s) ({', '.join(failed)}): "
                          "an effect that depends on a missing skill is bounded by it; compare with the teacher "
                          "ceiling column. `--strict` stops here instead.")
    console.print(f"proxy RM held-out pairwise accuracy {built.report.get('rm_heldout_accuracy', float('nan')):.3f}",
                  markup=False)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-smoke" if cfg.preset == "smoke" else ""
    png = plot(rows, out / f"reward_vs_n{tag}.png",
               f"synthetic world {built.report['key']} (seed {cfg.seed}): Rand / PRand / PRS, paired, 95% CI")
    result = {"config": dataclasses.asdict(cfg),
              "world": {"key": built.report["key"], "root": str(built.root), "seed": built.config.seed,
                        "rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"),
                        "build_timings": built.report.get("timings"), "gates": gates.get("rows")},
              "rows": rows, "prompts": len(items), "git_commit": _git_commit(),
              "versions": built.report.get("versions"), "world_seconds": t_world, "policy_seconds": t_policy,
              "teacher_seconds": t_teacher, "wall_seconds": wall}
    (out / f"results{tag}.json").write_text(json.dumps(result, indent=2))
    write_records(out / f"records{tag}.json", cfg, built, items, policy, teacher)
    console.print(f"results: {out / f'results{tag}.json'}; plot: {png}; world: {built.root} "
                  f"(policy, rm, tokenizer; try `prs-jax info {built.policy}`); {wall:.0f} s in all", markup=False)
    return result
