"""Scaling: reward vs N across policy sizes. Each size is its own synthetic-world build (the policy pretrained
with the same corpus, steps and learning rate; only its Llama dimensions differ, via WorldSpec overrides), or
on accelerators a real checkpoint (the Pythia suite). For every size the reward-vs-N measurement of
`prs_jax.experiments.reward_vs_n` runs on the same held-out prompts; the plots are log-log (1 - gold reward of
the selected response) against the policy's parameter count, per method and N, and the gain of PRS over Rand.

The proxy reward model is FIXED across sizes by default (`rm: fixed`: the reward model of `source`, i.e. the
reference world or `source.real.reward_model`), so that only the policy scales, as when one RM (UltraRM) judges
every policy; `rm: per_size` uses each size's own world RM instead (which is initialised from and as large as
that policy). The Sr-DPO part of the scaling study is `prs_jax.experiments.sr_dpo`'s business.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from typing import Any, Literal

import numpy as np

from prs_jax.experiments.common import Record, Source, build_world_from
from prs_jax.experiments.reward_vs_n import (
    DEFAULT_METHODS,
    Generation,
    Method,
    Models,
    load_items,
    measure,
    paired_gain,
    public_rows,
    world_items,
)


@dataclasses.dataclass(frozen=True)
class Size:
    """One policy size: WorldConfig overrides merged over source.world.overrides (world), or a policy
    checkpoint directory (real; `reward_model` replaces source.real.reward_model when rm is per_size)."""

    name: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    policy: str = ""
    reward_model: str = ""


DEFAULT_SIZES: tuple[Size, ...] = (
    Size("h64-l2", {"policy.hidden_size": 64, "policy.intermediate_size": 192, "policy.num_hidden_layers": 2}),
    Size("h96-l3", {"policy.hidden_size": 96, "policy.intermediate_size": 288, "policy.num_hidden_layers": 3}),
    Size("h128-l4", {"policy.hidden_size": 128, "policy.intermediate_size": 384, "policy.num_hidden_layers": 4}),
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The scaling study (reward vs N per policy size)."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/scaling"
    seed: int = 0
    sizes: tuple[Size, ...] = DEFAULT_SIZES
    rm: Literal["fixed", "per_size"] = "fixed"
    prompts: int = 32
    budgets: tuple[int, ...] = (4, 16)
    methods: tuple[Method, ...] = (DEFAULT_METHODS[0], DEFAULT_METHODS[1], DEFAULT_METHODS[3])
    generation: Generation = dataclasses.field(default_factory=Generation)
    reuse_samples: bool = True


def _size_models(cfg: Config, size: Size, ref: Any, console: Any) -> tuple[Models, dict[str, Any]]:
    """Models for one size (building its world if needed) and facts about the build."""
    if cfg.source.kind == "world":
        from prs_jax.world.corpus import world_templates
        from prs_jax.world.task import gold_reward

        spec = dataclasses.replace(cfg.source.world, overrides={**cfg.source.world.overrides, **size.overrides})
        t0 = time.perf_counter()
        built = build_world_from(spec, console)
        seconds = time.perf_counter() - t0
        rm_dir = ref.reward_model if cfg.rm == "fixed" else built.reward_model
        models = Models(built.policy, rm_dir, cfg.generation, gold=gold_reward, templates=world_templates(),
                        world=built)
        facts = {"world_key": built.report.get("key"), "world_root": str(built.root),
                 "build_seconds_this_run": seconds, "build_timings": built.report.get("timings"),
                 "sft_eval_loss": (built.report.get("sft_eval") or {}).get("loss"),
                 "own_rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"), "rm_dir": str(rm_dir),
                 "overrides": spec.overrides}
        return models, facts
    real = cfg.source.real
    if not size.policy:
        raise ValueError(f"sizes[{size.name}].policy: empty; give the policy checkpoint directory of this size.")
    rm_dir = size.reward_model if (cfg.rm == "per_size" and size.reward_model) else real.reward_model
    src = dataclasses.replace(cfg.source, real=dataclasses.replace(real, policy=size.policy, reward_model=rm_dir))
    return Models.from_source(src, cfg.generation, console), {"policy": size.policy, "rm_dir": rm_dir}


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """Measure reward vs N for every size; write results.json / results.md / PNG; return the record."""
    if len(cfg.sizes) < 2:
        raise ValueError("sizes: a scaling study needs at least two policy sizes.")
    names = [s.name for s in cfg.sizes]
    if len(set(names)) != len(names):
        raise ValueError(f"sizes: names must be distinct, got {names}.")
    rec = Record("scaling", cfg, cfg.out_dir, cfg.seed)
    ref = build_world_from(cfg.source.world, console) if cfg.source.kind == "world" else None
    items = world_items(ref, cfg.prompts) if ref is not None else None
    per_size: dict[str, Any] = {}
    with_gold = cfg.source.kind == "world"
    for size in cfg.sizes:
        if console is not None:
            console.print(f"scaling: size {size.name}", markup=False)
        models, facts = _size_models(cfg, size, ref, console)
        its = items if items is not None else load_items(cfg.source, models, cfg.prompts)
        t0 = time.perf_counter()
        measured = measure(models, its, cfg.methods, cfg.budgets, cfg.seed, cfg.reuse_samples, console)
        per_size[size.name] = {"parameters": models.param_count(), **facts,
                               "measure_seconds": time.perf_counter() - t0, "methods": public_rows(measured),
                               "compilations": models.compilations}
        del models
        gc.collect()
    budgets = sorted(set(cfg.budgets))
    key = "gold" if with_gold else "proxy"
    rec.results.update({"source": cfg.source.kind, "rm": cfg.rm, "prompts": cfg.prompts, "budgets": budgets,
                        "sizes": per_size})
    order = sorted(per_size, key=lambda s: per_size[s]["parameters"])

    # log-log fit of (1 - gold) against parameters, per method and N
    fits: dict[str, dict[str, float]] = {}
    if with_gold:
        for m in cfg.methods:
            for n in budgets:
                xs = [per_size[s]["parameters"] for s in order if str(n) in per_size[s]["methods"][m.name]]
                ys = [1.0 - per_size[s]["methods"][m.name][str(n)]["gold"] for s in order
                      if str(n) in per_size[s]["methods"][m.name]]
                if len(xs) >= 2 and all(y > 0 for y in ys):
                    slope, icpt = np.polyfit(np.log10(xs), np.log10(ys), 1)
                    fits[f"{m.name} N={n}"] = {"slope": float(slope), "intercept": float(icpt)}
        rec.results["loglog_fits"] = fits

    heads = ["size", "parameters", *[f"{m.name} N={n}" for n in budgets for m in cfg.methods]]
    rows = []
    for s in order:
        r = per_size[s]
        cells = []
        for n in budgets:
            for m in cfg.methods:
                x = r["methods"][m.name].get(str(n))
                cells.append(f"{x[key]:.3f} ± {x[key + '_se']:.3f}" if x else "—")
        rows.append([s, f"{r['parameters']:,}", *cells])
    rec.table(("Gold reward of the response selected by the proxy RM" if with_gold else
               "Reward-model score of the selected response (no gold reward on real data)")
              + " (mean ± s.e. over prompts)", heads, rows)
    base = cfg.methods[0].name
    others = [m.name for m in cfg.methods[1:]]
    gheads = ["size", *[f"{o} - {base} N={n}" for n in budgets for o in others]]
    grows = []
    for s in order:
        r = per_size[s]["methods"]
        cells = []
        for n in budgets:
            for o in others:
                if str(n) in r[o] and str(n) in r[base]:
                    g = paired_gain(r[o][str(n)][f"per_prompt_{key}"], r[base][str(n)][f"per_prompt_{key}"])
                    cells.append(f"{g[0]:+.3f} ± {g[1]:.3f}")
                else:
                    cells.append("—")
        grows.append([s, *cells])
    rec.table(f"Paired {key} gain over {base}", gheads, grows)
    if with_gold:
        rec.table("Oracle (best gold among the candidates) and the world facts per size",
                  ["size", "parameters", "SFT eval loss", *[f"oracle {m.name} N={budgets[-1]}" for m in cfg.methods]],
                  [[s, f"{per_size[s]['parameters']:,}", f"{per_size[s]['sft_eval_loss']:.3f}",
                    *[f"{per_size[s]['methods'][m.name][str(budgets[-1])]['oracle_gold']:.3f}"
                      if str(budgets[-1]) in per_size[s]["methods"][m.name] else "—" for m in cfg.methods]]
                   for s in order])
        if fits:
            rec.table("log10(1 - gold) = slope * log10(parameters) + intercept",
                      ["method, N", "slope", "intercept"],
                      [[k, f"{v['slope']:.3f}", f"{v['intercept']:.3f}"] for k, v in fits.items()])

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        params = [per_size[s]["parameters"] for s in order]
        colors = {m.name: f"C{i}" for i, m in enumerate(cfg.methods)}  # colour = method, line style = N
        for m in cfg.methods:
            for n, style in zip(budgets, ["--", "-", ":", "-."] * 4):
                pts = [(p, per_size[s]["methods"][m.name][str(n)]) for p, s in zip(params, order)
                       if str(n) in per_size[s]["methods"][m.name]]
                if not pts:
                    continue
                ys = [1.0 - r[key] if with_gold else r[key] for _, r in pts]
                axes[0].errorbar([p for p, _ in pts], ys, yerr=[r[f"{key}_se"] for _, r in pts], marker="o", ms=3,
                                 capsize=2, linestyle=style, color=colors[m.name], label=f"{m.name} N={n}")
        axes[0].set_xscale("log")
        if with_gold:
            axes[0].set_yscale("log")
        axes[0].set_xlabel("policy parameters")
        axes[0].set_ylabel("1 - gold reward of the selected response" if with_gold else "RM score of the selected")
        axes[0].legend(fontsize=6)
        for n, style in zip(budgets, ["--", "-", ":", "-."] * 4):
            for o in others:
                gains = [paired_gain(per_size[s]["methods"][o][str(n)][f"per_prompt_{key}"],
                                     per_size[s]["methods"][base][str(n)][f"per_prompt_{key}"]) for s in order]
                axes[1].errorbar(params, [g[0] for g in gains], yerr=[g[1] for g in gains], marker="o", ms=3,
                                 capsize=2, linestyle=style, color=colors[o], label=f"{o} - {base} N={n}")
        axes[1].axhline(0.0, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("policy parameters")
        axes[1].set_ylabel(f"{key} gain over {base} (paired)")
        axes[1].legend(fontsize=6)
        for ax in axes:
            ax.grid(alpha=0.3, which="both")

    rec.figure("scaling.png", draw, figsize=(11, 4.2))
    rec.notes.append(f"Proxy RM: {'fixed across sizes (the reference RM of `source`)' if cfg.rm == 'fixed' else 'each size uses its own RM'}"
                     "; the same held-out prompts for every size.")
    if with_gold and any(math.isnan(per_size[s]["sft_eval_loss"] or math.nan) for s in order):
        rec.notes.append("Some sizes have no SFT eval loss in their world report.")
    if not with_gold:
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion (optimistic).")
    return rec.finish(console)
