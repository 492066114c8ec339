"""The README's main job: build (or reuse) the synthetic world, then run Rand, PRand and PRS at budgets N on
held-out prompts, selecting with the proxy reward model and reporting the GOLD reward of what was selected.

Also measures the world's own acceptance checks on the pretrained policy: the spread of gold reward among its
samples (oracle best-of-16 vs the mean), and refinements after the true feedback vs after no feedback.
Writes results JSON (config, seed, commit, versions, wall time), a PNG of gold reward vs N, and prints tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from prs_jax.models import load_causal_lm, load_reward_model, load_tokenizer
from prs_jax.strategies.base import PromptItem, RewardModelScorer
from prs_jax.strategies.prs import PRS, BestOfN
from prs_jax.strategies.templates import require_turn_text
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.scoring import RewardScorer
from prs_jax.world.build import BuiltWorld, build_world, preset
from prs_jax.world.corpus import (
    FEEDBACK_TURN,
    REFINE_TURN,
    REFINE_TURN_NO_FEEDBACK,
    feedback_text,
    world_templates,
)
from prs_jax.world.task import (
    Prompt,
    gold_reward,
    parse_preference,
    parse_prompt,
    violations,
)

METHODS = ("rand", "prand", "prs")


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs."""

    preset: str = "default"
    world_root: str = "runs/world"
    out_dir: str = "runs/quickstart"
    seed: int = 0
    prompts: int = 48
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    temperature: float = 1.0
    max_new_tokens: int = 48
    feedback_max_new_tokens: int = 48
    check_prompts: int = 48
    check_samples: int = 16


def smoke_config(**overrides: Any) -> QuickstartConfig:
    """A CI-sized run (tiny world, few prompts, N up to 4): checks the pipeline, not the numbers."""
    return dataclasses.replace(QuickstartConfig(preset="smoke", prompts=4, budgets=(1, 2, 4), max_new_tokens=24,
                                                feedback_max_new_tokens=16, check_prompts=4, check_samples=4),
                               **overrides)


def _engine(model, tok, seed: int, rows: int) -> TreeEngine:
    # every expansion padded to `rows` children per parent: one decode program serves all budgets N
    return TreeEngine(model, tok, seed=seed, config=EngineConfig(min_prefix_bucket=64, min_new_tokens_bucket=32,
                                                                 min_extend_bucket=32, min_rows_bucket=rows))


def _mean_se(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else 0.0


def _prompt_of(item: PromptItem) -> Prompt:
    cat, n, form = parse_prompt(item.prompt)
    return Prompt(cat, n, parse_preference(item.preference), form)


def compare_methods(built: BuiltWorld, cfg: QuickstartConfig, items: list[PromptItem], console: Console,
                    timings: dict[str, float]) -> dict[str, Any]:
    """Gold and proxy reward of the selected response per method and budget (seconds per run into `timings`)."""
    tok = load_tokenizer(built.policy)
    policy = load_causal_lm(built.policy)
    proxy = RewardModelScorer(RewardScorer(load_reward_model(built.reward_model), tok), include_preference=True)
    sampling = SamplingParams(temperature=cfg.temperature)
    rows: dict[str, dict[str, Any]] = {m: {} for m in METHODS}
    for n in cfg.budgets:
        for method in METHODS:
            t0 = time.perf_counter()
            if method == "prs":
                strategy: Any = PRS.with_budget(n, depth=min(2, n), sampling=sampling, templates=world_templates(),
                                                max_new_tokens=cfg.max_new_tokens,
                                                feedback_max_new_tokens=cfg.feedback_max_new_tokens)
            else:
                strategy = BestOfN(n=n, variant=method, sampling=sampling, max_new_tokens=cfg.max_new_tokens)
            results = strategy.run(items, _engine(policy, tok, cfg.seed, max(cfg.budgets)), proxy)
            gold = [gold_reward(r.item.prompt, r.selected.text, r.item.preference) for r in results]
            mean, se = _mean_se(gold)
            timings[f"{method}_{n}"] = time.perf_counter() - t0
            rows[method][str(n)] = {"gold": mean, "gold_se": se, "proxy": float(np.mean([r.reward for r in results])),
                                    "example": {"prompt": items[0].prompt, "preference": items[0].preference,
                                                "response": results[0].selected.text}}
            console.print(f"  N={n:>2} {method:<5} gold {mean:.3f} ± {se:.3f}  proxy "
                          f"{rows[method][str(n)]['proxy']:+.3f}  ({time.perf_counter() - t0:.1f} s)", markup=False)
    return rows


def world_checks(built: BuiltWorld, cfg: QuickstartConfig, items: list[PromptItem]) -> dict[str, Any]:
    """Spread of the policy's samples, and refinement after the true feedback vs after no feedback."""
    tok = load_tokenizer(built.policy)
    policy = load_causal_lm(built.policy)
    engine = _engine(policy, tok, cfg.seed + 1, cfg.check_samples)
    sampling = SamplingParams(temperature=cfg.temperature)
    k = cfg.check_samples
    roots = engine.add_prompts([[{"role": "user", "content": f"{it.prompt}\n\n{it.preference}"}] for it in items])
    kids = engine.expand(roots, k, sampling, max_new_tokens=cfg.max_new_tokens)
    gold = np.array([[gold_reward(it.prompt, c.text, it.preference) for c in ks] for it, ks in zip(items, kids)])
    # one draft per prompt (the first sample) is refined in three ways
    drafts = [ks[0] for ks in kids]
    prompts = [_prompt_of(it) for it in items]
    ask = engine.append(drafts, [require_turn_text(tok, FEEDBACK_TURN.format(preference=it.preference), d)
                                 for it, d in zip(items, drafts)])
    true_fb = [feedback_text(p, violations(p.x, p.z, d.text)) for p, d in zip(prompts, drafts)]
    with_true = engine.append(ask, [f + require_turn_text(tok, REFINE_TURN) for f in true_fb])
    self_fb = [ks[0] for ks in engine.expand(ask, 1, sampling, max_new_tokens=cfg.feedback_max_new_tokens)]
    with_self = engine.append(self_fb, [require_turn_text(tok, REFINE_TURN, f) for f in self_fb])
    without = engine.append(drafts, [require_turn_text(tok, REFINE_TURN_NO_FEEDBACK.format(preference=it.preference),
                                                       d) for it, d in zip(items, drafts)])
    out: dict[str, Any] = {}
    for name, parents in (("true_feedback", with_true), ("self_feedback", with_self), ("no_feedback", without)):
        ref = engine.expand(parents, k, sampling, max_new_tokens=cfg.max_new_tokens)
        g = [gold_reward(it.prompt, c.text, it.preference) for it, ks in zip(items, ref) for c in ks]
        out[f"refine_{name}"] = _mean_se(g)
    out["draft"] = _mean_se([gold_reward(it.prompt, d.text, it.preference) for it, d in zip(items, drafts)])
    out["sample_mean"] = _mean_se(gold.mean(axis=1).tolist())
    out["sample_std"] = float(gold.std(axis=1).mean())
    out[f"oracle_best_of_{k}"] = _mean_se(gold.max(axis=1).tolist())
    out["self_feedback_example"] = self_fb[0].text
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> Path:
    """Gold reward vs N (log2 axis) per method with standard-error bars; proxy reward in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, by_n in rows.items():
        ns = sorted(int(n) for n in by_n)
        axes[0].errorbar(ns, [by_n[str(n)]["gold"] for n in ns], yerr=[by_n[str(n)]["gold_se"] for n in ns],
                         marker="o", capsize=3, label=method.upper() if method == "prs" else method.capitalize())
        axes[1].plot(ns, [by_n[str(n)]["proxy"] for n in ns], marker="o", label=method)
    for ax, label in zip(axes, ("gold reward of the selected response", "proxy RM reward (selection score)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (samples per prompt)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_quickstart(cfg: QuickstartConfig = QuickstartConfig(), console: Console | None = None) -> dict[str, Any]:
    """Build or load the world, compare the methods, run the checks, print tables, write JSON + PNG."""
    console = console or Console()
    t_start = time.perf_counter()
    built = build_world(preset(cfg.preset, seed=cfg.seed), root=cfg.world_root, console=console)  # type: ignore[arg-type]
    t_world = time.perf_counter() - t_start
    held = built.heldout()
    items = [PromptItem(r["id"], r["prompt"], r["preference"]) for r in held[: cfg.prompts]]
    console.print(f"comparing {', '.join(METHODS)} on {len(items)} held-out prompts, N in {list(cfg.budgets)}",
                  markup=False)
    timings: dict[str, float] = {}
    rows = compare_methods(built, cfg, items, console, timings)
    checks = world_checks(built, cfg, [PromptItem(r["id"], r["prompt"], r["preference"])
                                       for r in held[: cfg.check_prompts]])
    wall = time.perf_counter() - t_start

    table = Table(title=f"gold reward of the response selected by the proxy RM ({len(items)} held-out prompts, "
                        "mean ± s.e.)")
    table.add_column("N", justify="right")
    for m in METHODS:
        table.add_column(m.upper() if m == "prs" else m.capitalize(), justify="right")
    for n in cfg.budgets:
        table.add_row(str(n), *[f"{rows[m][str(n)]['gold']:.3f} ± {rows[m][str(n)]['gold_se']:.3f}" for m in METHODS])
    console.print(table)
    t2 = Table(title="the pretrained policy (world acceptance checks, gold reward)")
    t2.add_column("measure")
    t2.add_column("gold reward", justify="right")
    for key, value in checks.items():
        if isinstance(value, tuple):
            t2.add_row(key, f"{value[0]:.3f} ± {value[1]:.3f}")
        elif isinstance(value, float):
            t2.add_row(key, f"{value:.3f}")
    t2.add_row("proxy RM held-out pairwise accuracy", f"{built.report.get('rm_heldout_accuracy', float('nan')):.3f}")
    console.print(t2)

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "-smoke" if cfg.preset == "smoke" else ""
    png = plot(rows, out / f"reward_vs_n{tag}.png",
               f"synthetic world {built.report['key']}: best-of-N by the proxy RM, judged by the gold reward")
    result = {"config": dataclasses.asdict(cfg), "world": {"key": built.report["key"], "root": str(built.root),
                                                           "rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"),
                                                           "build_timings": built.report.get("timings")},
              "methods": rows, "checks": {k: list(v) if isinstance(v, tuple) else v for k, v in checks.items()},
              "git_commit": _git_commit(), "versions": built.report.get("versions"), "seed": cfg.seed,
              "world_seconds": t_world, "wall_seconds": wall, "run_seconds": timings}
    (out / f"results{tag}.json").write_text(json.dumps(result, indent=2))
    console.print(f"results: {out / f'results{tag}.json'}; plot: {png}; world: {built.root} "
                  f"(policy, rm, tokenizer; try `prs-jax info {built.policy}`); {wall:.0f} s in all", markup=False)
    return result
