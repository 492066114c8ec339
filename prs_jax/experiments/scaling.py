"""Scaling: reward vs N and Sr-DPO vs DPO across policy sizes. Each size is its own synthetic-world build (the
policy pretrained with the same corpus, steps and learning rate; only its Llama dimensions differ, via
WorldSpec overrides), or on accelerators a real checkpoint (the Pythia suite). `parts` chooses what runs per size:

- reward_vs_n: the measurement of `prs_jax.experiments.reward_vs_n` on the same held-out prompts for every size;
  log-log plot of (1 - gold reward of the selected response) against the policy's parameter count, per method
  and N, and the paired gain over the first method (Rand).
- sr_dpo: the study of `prs_jax.experiments.sr_dpo` (config `sr_dpo`; its source, out_dir and seed are set per
  size, and its work_dir gets one subdirectory per size) from each size's SFT policy: pairs sampled from that policy, the listed runs (default DPO
  and Sr-DPO) trained from it; log-log plot of (1 - mean gold reward of the policy's samples) against parameters
  for the SFT start and every run, win rates vs SFT and the Sr-* vs base head-to-head per size.

The proxy reward model is FIXED across sizes by default (`rm: fixed`: the reward model of `source`, i.e. the
reference world or `source.real.reward_model`), so that only the policy scales, as when one RM (UltraRM) judges
every policy; `rm: per_size` uses each size's own world RM instead (which is initialised from and as large as
that policy).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from pathlib import Path
from typing import Any, Literal

from prs_jax.eval.stats import loglog_fit
from prs_jax.experiments import sr_dpo
from prs_jax.experiments.common import Record, Source, build_world_from
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.reward_vs_n import (
    DEFAULT_METHODS,
    Generation,
    Method,
    load_items,
    measure,
    paired_gain,
    public_rows,
    study_env,
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


Part = Literal["reward_vs_n", "sr_dpo"]


def _default_sr_dpo() -> sr_dpo.Config:
    return sr_dpo.Config(runs=(sr_dpo.RunSpec("sigmoid"), sr_dpo.RunSpec("sr_dpo", 0.5)), timing_steps=0,
                         work_dir="", pairs=sr_dpo.PairsConfig(flip_rates=(0.0,)))


@dataclasses.dataclass(frozen=True)
class Config:
    """The scaling study (reward vs N and / or Sr-DPO per policy size)."""

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
    parts: tuple[Part, ...] = ("reward_vs_n",)
    fit_boot: int = 2000  # bootstrap resamples of the log-log fits' 95% intervals (prompts resampled per size)
    # the Sr-DPO part's settings; its source, out_dir and seed are set per size, and work_dir ("" = OUT_DIR/work)
    # gets one subdirectory per size
    sr_dpo: sr_dpo.Config = dataclasses.field(default_factory=_default_sr_dpo)


def _size_source(cfg: Config, size: Size) -> Source:
    """The study's source with this size's world overrides merged in (world) or its policy directory (real)."""
    if cfg.source.kind == "world":
        return dataclasses.replace(cfg.source, world=dataclasses.replace(
            cfg.source.world, overrides={**cfg.source.world.overrides, **size.overrides}))
    real = cfg.source.real
    if not size.policy:
        raise ValueError(f"sizes[{size.name}].policy: empty; give the policy checkpoint directory of this size.")
    rm_dir = size.reward_model if (cfg.rm == "per_size" and size.reward_model) else real.reward_model
    return dataclasses.replace(cfg.source, real=dataclasses.replace(real, policy=size.policy, reward_model=rm_dir))


def _size_env(cfg: Config, size: Size, ref: Any, console: Any) -> tuple[StudyEnv, dict[str, Any]]:
    """The study environment of one size (building its world if needed) and facts about the build."""
    src = _size_source(cfg, size)
    if src.kind == "world":
        built, facts = _build_size_world(src, console)
        rm_dir = ref.reward_model if cfg.rm == "fixed" else built.reward_model
        env = StudyEnv.from_world(built, source=src, reward_model=rm_dir, **cfg.generation.env_options())
        return env, {**facts, "rm_dir": str(rm_dir)}
    return study_env(src, cfg.generation, console, study="scaling"), {"policy": src.real.policy,
                                                                      "rm_dir": src.real.reward_model}


def _build_size_world(src: Source, console: Any) -> tuple[Any, dict[str, Any]]:
    """Build or reuse one size's world; the facts the tables report about it."""
    t0 = time.perf_counter()
    built = build_world_from(src.world, console)
    return built, {"world_key": built.report.get("key"), "world_root": str(built.root),
                   "build_seconds_this_run": time.perf_counter() - t0, "build_timings": built.report.get("timings"),
                   "sft_eval_loss": (built.report.get("sft_eval") or {}).get("loss"),
                   "own_rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"),
                   "overrides": src.world.overrides}


def _sr_dpo_config(cfg: Config, size: Size, src: Source) -> sr_dpo.Config:
    """The sr_dpo study's config for one size: its source, its own output and work directories, the study seed."""
    work = Path(cfg.sr_dpo.work_dir or Path(cfg.out_dir) / "work")
    return dataclasses.replace(cfg.sr_dpo, source=src, seed=cfg.seed,
                               out_dir=str(Path(cfg.out_dir) / "sr_dpo" / size.name), work_dir=str(work / size.name))


def _sr_dpo_size(cfg: Config, size: Size, ref: Any, console: Any) -> dict[str, Any]:
    """The Sr-DPO study from this size's SFT policy (the world built or reused first); its compact results."""
    src = _size_source(cfg, size)
    facts: dict[str, Any] = {}
    fixed_rm = None  # real: _size_source already picked the fixed or the per-size RM
    if src.kind == "world":
        _, facts = _build_size_world(src, console)
        fixed_rm = ref.reward_model if cfg.rm == "fixed" else None
    sub = _sr_dpo_config(cfg, size, src)
    record = sr_dpo.run(sub, console, reward_model=fixed_rm)
    r = record["results"]
    keep = ("loss", "lam", "label", "win_rate", "win_rate_se", "judge_mean", "judge_mean_se", "judge_per_prompt",
            "average_marginal", "accuracy", "prompt_augmented_accuracy", "pearson", "spearman", "vs_base",
            "train_wall_s")
    return {"parameters": r["policy_parameters"], **facts, "rm_dir": r["reward_model"], "judge": r["judge"],
            "pairs": r["pairs"], "starting_policy": r["starting_policy"],
            # the runs at the first flip rate (the scaling configs use one), keyed by their tag
            "runs": {v["tag"]: {k: v[k] for k in keep if k in v} for v in r["runs"].values()
                     if v["flip"] == sub.pairs.flip_rates[0]},
            "wall_seconds": record["wall_seconds"], "out_dir": sub.out_dir}


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """Run the chosen parts for every size; write results.json / results.md / PNGs; return the record."""
    if len(cfg.sizes) < 2:
        raise ValueError("sizes: a scaling study needs at least two policy sizes.")
    names = [s.name for s in cfg.sizes]
    if len(set(names)) != len(names):
        raise ValueError(f"sizes: names must be distinct, got {names}.")
    if not cfg.parts or len(set(cfg.parts)) != len(cfg.parts):
        raise ValueError(f"parts: give one or both of reward_vs_n, sr_dpo (each once), got {list(cfg.parts)}.")
    if "sr_dpo" in cfg.parts:  # fail now, not after the reward-vs-N part has run
        sr_dpo.validate(_sr_dpo_config(cfg, cfg.sizes[0], _size_source(cfg, cfg.sizes[0])))
    rec = Record("scaling", cfg, cfg.out_dir, cfg.seed)
    ref = StudyEnv.from_source(cfg.source, console, study="scaling").world if cfg.source.kind == "world" else None
    with_gold = cfg.source.kind == "world"
    rec.results.update({"source": cfg.source.kind, "rm": cfg.rm, "parts": list(cfg.parts)})
    if "reward_vs_n" in cfg.parts:
        _reward_vs_n_part(rec, cfg, ref, with_gold, console)
    if "sr_dpo" in cfg.parts:
        per_size = {}
        for size in cfg.sizes:
            if console is not None:
                console.print(f"scaling (sr_dpo): size {size.name}", markup=False)
            per_size[size.name] = _sr_dpo_size(cfg, size, ref, console)
            gc.collect()
        rec.results["sr_dpo"] = {"sizes": per_size}
        _sr_dpo_report(rec, per_size, with_gold, cfg.fit_boot, cfg.seed)
    rm_note = "fixed across sizes (the reference RM of `source`)" if cfg.rm == "fixed" else "each size uses its own RM"
    rec.notes.append(f"Proxy RM: {rm_note}; the same held-out prompts for every size.")
    if not with_gold:
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion and the judge "
                         "(optimistic).")
    return rec.finish(console)


def _loglog(xs: list[float], ys: list[float], units: list[list[float]] | None = None, paired: bool = False,
            n_boot: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """prs_jax.eval.stats.loglog_fit of log10(ys) on log10(xs) as a results.json dict (slope, intercept and their
    bootstrap 95% intervals); with `units` (per x, the per-prompt values whose means are ys) the bootstrap
    resamples prompts, shared across x when `paired`. None for fewer than two points or a non-positive y."""
    if len(xs) < 2 or len(set(xs)) < 2 or not all(y > 0 for y in ys):  # nan > 0 is False
        return None
    fit = loglog_fit(xs, None if units else ys, n_boot=n_boot, seed=seed, units=units or None,
                     paired_units=paired)
    return fit.to_dict()


def _fit_rows(fits: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Table rows: the slope and intercept with their bootstrap 95% intervals."""
    return [[k, f"{v['slope']:.3f}", f"[{v['slope_ci'][0]:.3f}, {v['slope_ci'][1]:.3f}]", f"{v['intercept']:.3f}",
             f"[{v['intercept_ci'][0]:.3f}, {v['intercept_ci'][1]:.3f}]"] for k, v in fits.items()]


def _reward_vs_n_part(rec: Record, cfg: Config, ref: Any, with_gold: bool, console: Any) -> None:
    """Reward vs N per size: measure, tables, log-log fits and scaling.png."""
    items = StudyEnv.from_world(ref).heldout(cfg.prompts) if ref is not None else None
    per_size: dict[str, Any] = {}
    for size in cfg.sizes:
        if console is not None:
            console.print(f"scaling: size {size.name}", markup=False)
        env, facts = _size_env(cfg, size, ref, console)
        its = items if items is not None else load_items(env, cfg.prompts)
        t0 = time.perf_counter()
        measured = measure(env, cfg.generation, its, cfg.methods, cfg.budgets, cfg.seed, cfg.reuse_samples, console)
        per_size[size.name] = {"parameters": env.param_count(), **facts,
                               "measure_seconds": time.perf_counter() - t0, "methods": public_rows(measured),
                               "compilations": env.compilations}
        del env
        gc.collect()
    budgets = sorted(set(cfg.budgets))
    key = "gold" if with_gold else "proxy"
    rec.results.update({"prompts": cfg.prompts, "budgets": budgets, "sizes": per_size})
    order = sorted(per_size, key=lambda s: per_size[s]["parameters"])

    # log-log fit of (1 - gold) against parameters, per method and N
    fits: dict[str, dict[str, float]] = {}
    if with_gold:
        for m in cfg.methods:
            for n in budgets:
                have = [s for s in order if str(n) in per_size[s]["methods"][m.name]]
                xs = [per_size[s]["parameters"] for s in have]
                ys = [1.0 - per_size[s]["methods"][m.name][str(n)]["gold"] for s in have]
                # the same held-out prompts for every size: resample prompts jointly across sizes
                units = [[1.0 - g for g in per_size[s]["methods"][m.name][str(n)]["per_prompt_gold"]] for s in have]
                fit = _loglog(xs, ys, units, paired=len({len(u) for u in units}) == 1, n_boot=cfg.fit_boot,
                              seed=cfg.seed)
                if fit is not None:
                    fits[f"{m.name} N={n}"] = fit
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
            rec.table("log10(1 - gold) = slope * log10(parameters) + intercept (95% bootstrap intervals over "
                      "prompts, resampled jointly across sizes)",
                      ["method, N", "slope", "slope 95% CI", "intercept", "intercept 95% CI"], _fit_rows(fits))

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
    if with_gold and any(math.isnan(per_size[s]["sft_eval_loss"] or math.nan) for s in order):
        rec.notes.append("Some sizes have no SFT eval loss in their world report.")



def _sr_dpo_report(rec: Record, per_size: dict[str, Any], with_gold: bool, n_boot: int = 2000, seed: int = 0
                   ) -> None:
    """Sr-DPO part: per-size tables, log-log fits of (1 - mean gold of the policy's samples) and scaling_sr_dpo.png."""
    order = sorted(per_size, key=lambda s: per_size[s]["parameters"])
    tags = list(per_size[order[0]]["runs"])
    label = {t: per_size[order[0]]["runs"][t]["label"] for t in tags}
    what = "gold reward" if with_gold else "reward-model score"
    params = [per_size[s]["parameters"] for s in order]

    def judge(s: str, tag: str | None) -> tuple[float, float]:
        r = per_size[s]["starting_policy"] if tag is None else per_size[s]["runs"][tag]
        return r["judge_mean"], r["judge_mean_se"]

    def per_prompt(s: str, tag: str | None) -> list[float] | None:
        r = per_size[s]["starting_policy"] if tag is None else per_size[s]["runs"][tag]
        return r.get("judge_per_prompt")

    rec.table(f"Sr-DPO part: mean {what} of the policy's samples on held-out prompts (mean ± s.e.)",
              ["size", "parameters", "SFT", *[label[t] for t in tags]],
              [[s, f"{per_size[s]['parameters']:,}", *[f"{m:.3f} ± {e:.3f}" for m, e in
                                                        (judge(s, t) for t in (None, *tags))]] for s in order])
    rec.table(f"Sr-DPO part: win rate vs the SFT policy ({what}; ties ½) and held-out pair accuracy",
              ["size", *[f"{label[t]} win rate" for t in tags], *[f"{label[t]} accuracy" for t in tags]],
              [[s, *[f"{per_size[s]['runs'][t]['win_rate']:.3f} ± {per_size[s]['runs'][t]['win_rate_se']:.3f}"
                     for t in tags], *[per_size[s]["runs"][t]["accuracy"] for t in tags]] for s in order])
    h2h = [t for t in tags if "vs_base" in per_size[order[0]]["runs"][t]]
    if h2h:
        rec.table("Sr-DPO part: Sr-* vs its base loss, head to head per size (same prompts and sampling seed)",
                  ["size", "run", "vs", "win", "tie", "lose", "win rate (ties ½)"],
                  [[s, label[t], v["base"], v["win"], v["tie"], v["lose"],
                    f"{v['win_rate']:.3f} ± {v['win_rate_se']:.3f}"]
                   for s in order for t in h2h for v in [per_size[s]["runs"][t]["vs_base"]]])
    fits: dict[str, dict[str, float]] = {}
    if with_gold:
        for tag in (None, *tags):
            pp = [per_prompt(s, tag) for s in order]
            units = [[1.0 - g for g in u] for u in pp] if all(pp) else None  # else resample the sizes
            fit = _loglog(params, [1.0 - judge(s, tag)[0] for s in order], units, n_boot=n_boot, seed=seed)
            if fit is not None:
                fits["SFT" if tag is None else label[tag]] = fit
        if fits:
            rec.table("Sr-DPO part: log10(1 - mean gold) = slope * log10(parameters) + intercept (95% bootstrap "
                      "intervals over prompts, resampled within each size)",
                      ["policy", "slope", "slope 95% CI", "intercept", "intercept 95% CI"], _fit_rows(fits))
    rec.results["sr_dpo"]["loglog_fits"] = fits

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for i, tag in enumerate((None, *tags)):
            ms = [judge(s, tag) for s in order]
            ys = [1.0 - m if with_gold else m for m, _ in ms]
            axes[0].errorbar(params, ys, yerr=[e for _, e in ms], marker="o", ms=3, capsize=2, color=f"C{i}",
                             label="SFT (start)" if tag is None else label[tag])
        axes[0].set_xscale("log")
        if with_gold:
            axes[0].set_yscale("log")
        axes[0].set_ylabel("1 - mean gold reward of samples" if with_gold else "mean RM score of samples")
        for i, tag in enumerate(tags):
            r = [per_size[s]["runs"][tag] for s in order]
            axes[1].errorbar(params, [x["win_rate"] for x in r], yerr=[x["win_rate_se"] for x in r], marker="o",
                             ms=3, capsize=2, color=f"C{i + 1}", label=f"{label[tag]} vs SFT")
            if "vs_base" in r[0]:
                axes[1].errorbar(params, [x["vs_base"]["win_rate"] for x in r],
                                 yerr=[x["vs_base"]["win_rate_se"] for x in r], marker="s", ms=3, capsize=2,
                                 linestyle="--", color=f"C{i + 1}", label=f"{label[tag]} vs {r[0]['vs_base']['base']}")
        axes[1].axhline(0.5, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_ylabel(f"win rate ({what}, ties ½)")
        for ax in axes:
            ax.set_xlabel("policy parameters")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)

    rec.figure("scaling_sr_dpo.png", draw, figsize=(11, 4.2))
    rec.notes.append("Sr-DPO part: per size, pairs are sampled from that size's SFT policy and every run trains from "
                     "it (prs_jax.experiments.sr_dpo; the full per-size records, with the per-size config actually "
                     "run, are under sr_dpo/SIZE/; config.sr_dpo.source / out_dir / seed here are not used).")
