"""Scaling: reward vs N and Sr-DPO vs DPO across policy sizes, under the studies' protocol.

Each size is its own synthetic-world build (the same corpus, tokenizer and learning rate; the Llama dimensions and,
in the cpu config, the SFT steps change via WorldSpec overrides: steps scale with the parameter count, so no size
is trained past the point where a larger one would still improve), or on accelerators a real checkpoint (the
Pythia suite). `parts` chooses what runs per size:

- reward_vs_n: `prs_jax.experiments.reward_vs_n.measure_records` on the same held-out prompts for every size
  (paired arms: PRS's first layer reuses PRand's drafts); the teacher ceiling once per world (it does not depend
  on the policy's size); log-log fits of (1 - gold reward of the selected response) against parameters, the paired
  gains over the baselines per size with 95% CIs beside the teacher's.
- sr_dpo: `prs_jax.experiments.sr_dpo.measure_study` from each size's SFT policy (its records under
  OUT/sr_dpo/SIZE): pairs sampled from that policy, the listed runs trained from it; log-log fits of (1 - mean gold
  of the policy's samples), win rates and the Sr-* vs base head-to-head per size, the Delta controls per size.

The proxy reward model is FIXED across sizes by default (`rm: fixed`: the reward model of `source`, i.e. the
reference world of the same seed or `source.real.reward_model`), so that only the policy scales, as when one RM
(UltraRM) judges every policy; `rm: per_size` uses each size's own world RM instead.

`measure_study` writes OUT/records.jsonl (the reward-vs-N records tagged with their size, and the teacher rows) and
OUT/measure.json (config, per-size facts: parameters, SFT steps, eval loss, the world's skill gates); `report_study`
makes every table, fit, figure and verdict from those files (and the per-size sr_dpo records) alone, pooled over the
world seeds of out_dir + pool_dirs. Endpoint names (scaling.endpoint_units):

  teacher:A:B@N          the teacher ceiling's A - B (reward_vs_n), per prompt
  at:SIZE:INNER          INNER on one size: gold:A:B@N (reward_vs_n) or any sr_dpo endpoint (win:A:B,
                         partial_corr:RUN, flipped_delta_neg:RUN, ...)
  slope:INNER            per prompt, the least-squares slope of INNER's value across sizes against log10(parameters)
                         (the mean over prompts is the slope of the mean: "per decade of parameters"); INNER one of
                         gold:A@N, gold:A:B@N (selected-response gold), win:A:B (sr_dpo per-prompt win share - 1/2),
                         mean:A (sr_dpo per-prompt mean gold of A's samples; A a run key or sft)
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prs_jax.eval.stats import loglog_fit
from prs_jax.experiments import sr_dpo
from prs_jax.experiments.common import (Record, Source, build_world_from, load_measured, measured_config,
                                        pool_measured)
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.protocol import Protocol, pooled_ci, report_protocol
from prs_jax.experiments.reward_vs_n import (
    DEFAULT_METHODS,
    Generation,
    Method,
    default_comparisons,
    load_items,
    measure_records,
    paired_gold,
    public_rows,
    selected_gold,
    study_env,
    summarise_records,
    teacher_records,
)
from prs_jax.experiments.reward_vs_n import endpoint_units as rvn_endpoint_units


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
    fit_boot: int = 2000  # bootstrap resamples of the log-log fits' and gains' 95% intervals
    teacher: bool = True  # world: the teacher ceiling on the same prompts (once per world; size-independent)
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
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
                   "sft_steps": built.config.sft_steps, "world_seed": built.config.seed,
                   "gates": [{k: g.get(k) for k in ("gate", "value", "teacher", "passed")}
                             for g in (built.report.get("gates") or {}).get("rows", [])],
                   "own_rm_heldout_accuracy": built.report.get("rm_heldout_accuracy"),
                   "overrides": src.world.overrides}


def _sr_dpo_config(cfg: Config, size: Size, src: Source) -> sr_dpo.Config:
    """The sr_dpo study's config for one size: its source, its own output and work directories, the study seed."""
    work = Path(cfg.sr_dpo.work_dir or Path(cfg.out_dir) / "work")
    return dataclasses.replace(cfg.sr_dpo, source=src, seed=cfg.seed,
                               out_dir=str(Path(cfg.out_dir) / "sr_dpo" / size.name), work_dir=str(work / size.name))


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


RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"
# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "pool_dirs", "protocol", "fit_boot")
# may differ between the world seeds pooled in one report (each OUT was measured on its own worlds)
POOL_FREE = ("source.world.seed", "source.world.path", "seed", "sr_dpo.work_dir")
INNER_KINDS = ("gold", "win", "mean")


def _check(cfg: Config) -> None:
    """Config errors before anything is built or measured."""
    if len(cfg.sizes) < 2:
        raise ValueError("sizes: a scaling study needs at least two policy sizes.")
    names = [s.name for s in cfg.sizes]
    if len(set(names)) != len(names):
        raise ValueError(f"sizes: names must be distinct, got {names}.")
    if not cfg.parts or len(set(cfg.parts)) != len(cfg.parts):
        raise ValueError(f"parts: give one or both of reward_vs_n, sr_dpo (each once), got {list(cfg.parts)}.")
    if "sr_dpo" in cfg.parts:  # fail now, not after the reward-vs-N part has run
        sr_dpo.validate(_sr_dpo_config(cfg, cfg.sizes[0], _size_source(cfg, cfg.sizes[0])))
    for e in cfg.protocol.endpoints:
        parse_endpoint(e.name, cfg)


def parse_endpoint(name: str, cfg: Config) -> tuple[str, str | None, str]:
    """(kind, size, inner) of an endpoint name (module docstring), checked against the config: its sizes, methods,
    budgets and parts."""
    kind, _, rest = name.partition(":")
    sizes = [s.name for s in cfg.sizes]
    size = None
    if kind == "at":
        size, _, rest = rest.partition(":")
        if size not in sizes:
            raise ValueError(f"scaling protocol: endpoint {name!r}: size {size!r} is not among {sizes}.")
    elif kind == "teacher":
        rest = name
    elif kind != "slope":
        raise ValueError(f"scaling protocol: endpoint {name!r}: expected teacher:A:B@N, at:SIZE:INNER or slope:INNER "
                         "(prs_jax/experiments/scaling.py).")
    inner = rest.partition(":")[0]
    part = "reward_vs_n" if inner in ("gold", "teacher") else "sr_dpo"
    if part not in cfg.parts:
        raise ValueError(f"scaling protocol: endpoint {name!r} needs the {part} part, which `parts` does not run.")
    if part == "reward_vs_n":
        head, at, n = rest.rpartition("@")
        arms = head.split(":")[1:]
        methods = [m.name for m in cfg.methods]
        if not at or not n.isdigit() or int(n) not in cfg.budgets or not 1 <= len(arms) <= 2 \
                or any(a not in methods for a in arms) or (inner == "teacher" and len(arms) != 2):
            raise ValueError(f"scaling protocol: endpoint {name!r}: expected {inner}:A[:B]@N with A, B among {methods} "
                             f"and N among {list(cfg.budgets)}.")
        if kind == "at" and len(arms) != 2:
            raise ValueError(f"scaling protocol: endpoint {name!r}: at:SIZE:gold needs two arms (A:B).")
    elif kind == "slope" and inner not in INNER_KINDS:
        raise ValueError(f"scaling protocol: endpoint {name!r}: a slope needs per-prompt values aligned across sizes: "
                         f"INNER one of {', '.join(k + ':...' for k in INNER_KINDS)}.")
    return kind, size, rest


def _sr_per_prompt(inner: str, records: Sequence[dict[str, Any]]) -> dict[Any, float]:
    """win:A:B (sr_dpo.win_shares: A's per-prompt win share against B, ties 1/2, minus 1/2) or mean:A (per-prompt
    mean judge reward of A's samples), keyed by prompt id, from one size's sr_dpo records."""
    kind, _, rest = inner.partition(":")
    if kind == "win":
        a, _, b = rest.partition(":")
        return sr_dpo.win_shares(records, a, b, inner)
    scores = {r["id"]: r["scores"] for r in records if r["kind"] == "win" and r["run"] == rest}
    if not scores:
        raise KeyError(f"scaling protocol: {inner!r}: no win-rate samples of {rest!r}; measured: "
                       f"{sorted({r['run'] for r in records if r['kind'] == 'win'})}")
    return {i: float(np.mean(v)) for i, v in scores.items()}


def _gold_per_prompt(inner: str, sel: dict[tuple[str, int], dict[Any, float]]) -> dict[Any, float]:
    """gold:A@N or gold:A:B@N per prompt id, from one size's selections (reward_vs_n.selected_gold)."""
    head, _, n = inner.rpartition("@")
    arms = head.split(":")[1:]
    missing = [x for x in arms if (x, int(n)) not in sel]
    if missing:
        raise KeyError(f"scaling protocol: {inner!r}: the records have no selection of {missing} at N={n}; "
                       f"measured: {sorted(sel)}")
    a = sel[(arms[0], int(n))]
    if len(arms) == 1:
        return dict(a)
    b = sel[(arms[1], int(n))]
    return {i: a[i] - b[i] for i in a if i in b}


def _inner_per_prompt(inner: str, data: dict[str, Any], size: str) -> dict[Any, float]:
    if inner.startswith("gold:"):
        return _gold_per_prompt(inner, data["selected"][size])
    return _sr_per_prompt(inner, data["sr"][size])


def slope_units(values: dict[str, dict[Any, float]], params: dict[str, float]) -> np.ndarray:
    """Per unit (prompt id present at every size), the least-squares slope of its values against log10(parameters)
    across the sizes (pure). The mean of these slopes is the slope of the mean values, so the protocol's interval of
    the mean is the interval of the slope "per decade of parameters"."""
    sizes = [s for s in values if s in params]
    if len(sizes) < 2:
        raise ValueError(f"slope: needs at least two sizes, got {sizes}")
    x = np.log10(np.array([params[s] for s in sizes], float))
    xc = x - x.mean()
    if not np.any(xc):
        raise ValueError("slope: the sizes have equal parameter counts")
    w = xc / float(xc @ xc)
    ids = [i for i in values[sizes[0]] if all(i in values[s] for s in sizes)]
    return np.array([sum(wk * values[s][i] for wk, s in zip(w, sizes)) for i in ids], float)


def endpoint_units(name: str, data: dict[str, Any], cfg: Config) -> np.ndarray:
    """The per-unit values of a declared endpoint from one world seed's data (pure): `data` has "records" (size ->
    reward-vs-N records), "teacher" (the teacher rows), "sr" (size -> sr_dpo records) and "params" (size ->
    parameter count). Names: module docstring."""
    kind, size, inner = parse_endpoint(name, cfg)
    if kind == "teacher":
        return rvn_endpoint_units(name, data["teacher"], cfg.methods, cfg.budgets, cfg.reuse_samples)
    if kind == "at":
        if inner.partition(":")[0] in INNER_KINDS:
            return np.array(list(_inner_per_prompt(inner, data, size).values()), float)
        return sr_dpo.endpoint_units(inner, data["sr"][size])
    return slope_units({s.name: _inner_per_prompt(inner, data, s.name) for s in cfg.sizes}, data["params"])


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure every size (building or reusing its world): the reward-vs-N records and, for the sr_dpo part, the
    sr_dpo study's records under OUT/sr_dpo/SIZE; the teacher ceiling once. Writes OUT/records.jsonl and
    OUT/measure.json. No tables."""
    from prs_jax.config import to_dict
    from prs_jax.data.io import write_jsonl, write_text_atomic

    _check(cfg)
    out = Path(cfg.out_dir)
    world = cfg.source.kind == "world"
    ref_env = StudyEnv.from_source(cfg.source, console, study="scaling") if world else None
    ref = ref_env.world if ref_env is not None else None
    items = ref_env.heldout(cfg.prompts) if ref_env is not None and "reward_vs_n" in cfg.parts else None
    records: list[dict[str, Any]] = []
    sizes: dict[str, dict[str, Any]] = {}
    for size in cfg.sizes:
        if console is not None:
            console.print(f"scaling: size {size.name}", markup=False)
        src = _size_source(cfg, size)
        facts: dict[str, Any] = {}
        if "reward_vs_n" in cfg.parts:
            env, facts = _size_env(cfg, size, ref, console)
            items = items if items is not None else load_items(env, cfg.prompts)  # real: the first size's prompts
            recs, seconds = measure_records(env, cfg.generation, items, cfg.methods, cfg.budgets, cfg.seed,
                                            cfg.reuse_samples)
            # the report needs the rewards only: the texts stay out (4 sizes x every candidate would be tens of MB
            # per seed; the reward_vs_n study keeps them)
            records += [{**{k: v for k, v in r.items() if k != "texts"}, "size": size.name} for r in recs]
            facts.update(parameters=env.param_count(), measure_seconds=sum(seconds.values()),
                         compilations=env.compilations)
            del env
            gc.collect()
        if "sr_dpo" in cfg.parts:
            if world and not facts:
                _, facts = _build_size_world(src, console)
            sub = _sr_dpo_config(cfg, size, src)
            fixed_rm = ref.reward_model if (world and cfg.rm == "fixed") else None
            t0 = time.perf_counter()
            sr_dpo.measure_study(sub, console, reward_model=fixed_rm)
            sub_facts = json.loads((Path(sub.out_dir) / sr_dpo.MEASURE_FACTS).read_text())
            facts.setdefault("parameters", sub_facts["policy_parameters"])
            facts.setdefault("rm_dir", sub_facts.get("reward_model"))
            facts.update(sr_dpo_dir=str(Path("sr_dpo") / size.name), sr_dpo_seconds=time.perf_counter() - t0)
            gc.collect()
        sizes[size.name] = facts
    teacher_s = 0.0
    if ref is not None and cfg.teacher and items is not None:
        t0 = time.perf_counter()
        records += teacher_records(ref.world(), items, cfg.methods, cfg.budgets, cfg.seed)
        teacher_s = time.perf_counter() - t0
    write_jsonl(out / RECORDS, records)
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind,
             "prompts": len(items) if items is not None else 0, "sizes": sizes, "teacher_seconds": teacher_s,
             "world_seed": cfg.source.world.seed if world else None,
             "reference_world": None if ref is None else {"key": ref.report.get("key"), "root": str(ref.root),
                                                          "rm_heldout_accuracy": ref.report.get("rm_heldout_accuracy")},
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


def _seed_data(cfg: Config, facts: dict[str, Any], records: list[dict[str, Any]], out_dir: str | Path
               ) -> dict[str, Any]:
    """One world seed's data for the report and the endpoints (see endpoint_units), each size's selections
    (reward_vs_n.selected_gold) computed once."""
    names = [s.name for s in cfg.sizes]
    data: dict[str, Any] = {"records": {s: [r for r in records if r.get("size") == s] for s in names},
                            "teacher": [r for r in records if r.get("kind") == "teacher"], "sr": {},
                            "params": {s: facts["sizes"][s]["parameters"] for s in names}, "sr_facts": {}}
    data["selected"] = {s: selected_gold(data["records"][s], cfg.methods, cfg.budgets, cfg.reuse_samples)
                        for s in names} if "reward_vs_n" in cfg.parts else {}
    if "sr_dpo" in cfg.parts:
        for s in names:
            f, recs = load_measured(Path(out_dir) / facts["sizes"][s]["sr_dpo_dir"], "sr_dpo")
            data["sr"][s], data["sr_facts"][s] = recs, f
    return data


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: tables, log-log fits, figures and the protocol's verdicts from the saved records alone, pooled over
    the world seeds of out_dir + pool_dirs (an out_dir that was never measured only receives the report: the first
    pool_dir must then match the config exactly); re-runnable without models."""
    _check(cfg)
    measured = [cfg.out_dir, *cfg.pool_dirs]
    if not (Path(cfg.out_dir) / MEASURE_FACTS).is_file() and cfg.pool_dirs:
        measured = list(cfg.pool_dirs)  # a report-only directory: pool the seeds' OUTs without copying them
    facts_by, by_seed = pool_measured(measured[0], measured[1:], measured_config(cfg, NOT_MEASURED), "scaling",
                                      POOL_FREE, MEASURE_FACTS, RECORDS, ignore=("sr_dpo.work_dir",))
    dirs = dict(zip(facts_by, measured))
    seeds = list(by_seed)
    data = {s: _seed_data(cfg, facts_by[s], by_seed[s], dirs[s]) for s in seeds}
    facts = facts_by[seeds[0]]
    with_gold = facts["source"] == "world"
    rec = Record("scaling", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    params = data[seeds[0]]["params"]
    order = sorted(params, key=lambda s: params[s])
    rec.results.update({"source": facts["source"], "rm": cfg.rm, "parts": list(cfg.parts), "world_seeds": seeds,
                        "sizes": {s: dict(facts["sizes"][s]) for s in order},
                        "sizes_per_seed": {str(k): f["sizes"] for k, f in facts_by.items()}})
    _sizes_table(rec, cfg, facts_by, order, with_gold)
    if "reward_vs_n" in cfg.parts:
        _reward_vs_n_report(rec, cfg, data, order, with_gold)
    if "sr_dpo" in cfg.parts:
        _sr_dpo_report(rec, cfg, data, order, with_gold)
    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints and with_gold:
        verdicts = report_protocol(rec, proto, data, lambda name, d: endpoint_units(name, d, cfg), facts_by,
                                   MEASURE_FACTS, _ceilings(cfg, data, proto))
    elif proto.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the world's gold reward.")
    rec.results["protocol"] = verdicts
    rm_note = "fixed across sizes (the reference RM of `source`)" if cfg.rm == "fixed" else "each size uses its own RM"
    rec.notes.append(f"Proxy RM: {rm_note}; the same held-out prompts for every size.")
    rec.notes.append("slope:X endpoints: per prompt, the least-squares slope of X across the sizes against "
                     "log10(parameters); their mean is the slope of the mean, i.e. the change of X per decade of "
                     "parameters, with the protocol's bootstrap interval over prompts (stratified by world seed).")
    if not with_gold:
        rec.notes.append("Real source: no gold reward; the RM score is also the selection criterion and the judge "
                         "(optimistic).")
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study: results.json / results.md / PNGs; returns the record."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)


def _ceilings(cfg: Config, data: dict[int, dict[str, Any]], proto: Protocol) -> dict[str, float]:
    """The teacher ceiling of each at:SIZE:gold:A:B@N endpoint (the teacher's A - B, pooled over seeds)."""
    out = {}
    for e in proto.endpoints:
        kind, _, inner = parse_endpoint(e.name, cfg)
        if kind == "at" and inner.startswith("gold:"):
            head, _, n = inner.rpartition("@")
            a, b = head.split(":")[1:]
            t = np.concatenate([rvn_endpoint_units(f"teacher:{a}:{b}@{n}", d["teacher"], cfg.methods, cfg.budgets)
                                for d in data.values()])
            if t.size:
                out[e.name] = float(t.mean())
    return out


GATE_COLUMNS = (("lift (mean over kinds)", "lift:"), ("critique, teacher drafts", "critique_teacher"),
                ("critique, own drafts", "critique_own"), ("refine after true critique", "refine_true"),
                ("refine after self-critique", "refine_self"), ("critique - no critique", "critique_vs_none"))


def _sizes_table(rec: Record, cfg: Config, facts_by: dict[int, dict[str, Any]], order: list[str], with_gold: bool
                 ) -> None:
    """Parameters, SFT steps and eval loss per size, and (world) the skill gates each size's policy reached."""
    if not with_gold:
        rec.table("Policy sizes", ["size", "parameters", "policy"],
                  [[s, f"{facts_by[next(iter(facts_by))]['sizes'][s]['parameters']:,}",
                    facts_by[next(iter(facts_by))]["sizes"][s].get("policy", "")] for s in order])
        return
    rows, skills = [], {}
    for s in order:
        per = [f["sizes"][s] for f in facts_by.values()]
        p = per[0]["parameters"]
        loss = [x["sft_eval_loss"] for x in per if x.get("sft_eval_loss") is not None]
        cells = []
        for label, key in GATE_COLUMNS:
            vals = [g["value"] for x in per for g in x.get("gates", [])
                    if (g["gate"].startswith(key) if key.endswith(":") else g["gate"] == key) and g["value"] is not None]
            # lift: the mean over kinds per seed, then over seeds (every seed has the same kinds)
            v = float(np.mean(vals)) if vals else math.nan
            skills.setdefault(s, {})[label] = v
            cells.append(f"{v:.2f}")
        steps = per[0].get("sft_steps")
        rows.append([s, f"{p:,}", steps if steps is not None else "-",
                     f"{1000 * steps / p:.2f}" if steps else "-", f"{np.mean(loss):.3f}" if loss else "-", *cells])
    rec.results["skills"] = skills
    rec.table("Policy sizes and the skills each reached (the world's gates on held-out prompts, mean over world "
              "seeds; lift and refinement as fractions of the teacher's, critique as exact-set match)",
              ["size", "parameters", "SFT steps", "steps per 1k parameters", "SFT eval loss",
               *[label for label, _ in GATE_COLUMNS]], rows)


def _reward_vs_n_report(rec: Record, cfg: Config, data: dict[int, dict[str, Any]], order: list[str],
                        with_gold: bool) -> None:
    """Reward vs N per size, pooled over world seeds: gold of the selection, paired gains with 95% CIs beside the
    teacher's, log-log fits of (1 - gold) and scaling.png."""
    budgets = sorted({int(b) for b in cfg.budgets})
    key = "gold" if with_gold else "proxy"
    seeds = list(data)
    per_size = {}
    for s in order:
        recs = [r for d in data.values() for r in d["records"][s]]
        per_size[s] = public_rows(summarise_records(recs, cfg.methods, budgets, cfg.reuse_samples))
    teacher = [r for d in data.values() for r in d["teacher"]]
    rec.results["reward_vs_n"] = {"prompts_per_seed": {str(k): len({r["id"] for r in d["records"][order[0]]})
                                                       for k, d in data.items()},
                                  "budgets": budgets, "methods": per_size}
    heads = ["size", "parameters", *[f"{m.name} N={n}" for n in budgets for m in cfg.methods]]
    rows = []
    for s in order:
        cells = []
        for n in budgets:
            for m in cfg.methods:
                x = per_size[s][m.name].get(str(n))
                cells.append(f"{x[key]:.3f} ± {x[key + '_se']:.3f}" if x else "—")
        rows.append([s, f"{data[seeds[0]]['params'][s]:,}", *cells])
    if teacher:
        tcells = []
        for n in budgets:
            for m in cfg.methods:
                v = [t["gold"][m.name][str(n)] for t in teacher if str(n) in t["gold"].get(m.name, {})]
                tcells.append(f"{np.mean(v):.3f}" if v else "—")
        rows.append(["teacher (gold selects)", "-", *tcells])
    rec.table(("Gold reward of the response the proxy RM selects" if with_gold else
               "Reward-model score of the selected response (no gold reward on real data)")
              + f" (mean ± s.e. over prompts, world seeds {seeds})", heads, rows)

    # paired gains per size with seed-stratified bootstrap 95% CIs, the teacher's beside them
    comps = default_comparisons(cfg.methods)
    gains: dict[str, dict[str, Any]] = {}
    grows = []
    for a, b in comps:
        for n in budgets:
            name = f"{a} - {b} N={n}"
            g: dict[str, Any] = {}
            for s in order if with_gold else ():
                per = [list(paired_gold(d["selected"][s], a, b, n, name)) for d in data.values()]
                g[s] = dict(zip(("mean", "low", "high"), pooled_ci(per, cfg.fit_boot, f"at:{s}:gold:{a}:{b}@{n}")))
            t = [x for d in data.values()
                 for x in rvn_endpoint_units(f"teacher:{a}:{b}@{n}", d["teacher"], cfg.methods, budgets)]
            teach = float(np.mean(t)) if t else None
            gains[name] = {"sizes": g, "teacher": teach}
            if g:
                grows.append([name, *[f"{g[s]['mean']:+.3f} [{g[s]['low']:+.3f}, {g[s]['high']:+.3f}]" for s in order],
                              "—" if teach is None else f"{teach:+.3f}"])
    rec.results["reward_vs_n"]["gains"] = gains
    if grows:
        rec.table("Paired gold gain (95% bootstrap CI over prompts, stratified by world seed) and the teacher "
                  "ceiling's", ["comparison", *order, "teacher"], grows)

    fits: dict[str, dict[str, Any]] = {}
    if with_gold:
        xs = [data[seeds[0]]["params"][s] for s in order]
        for m in cfg.methods:
            for n in budgets:
                if not all(str(n) in per_size[s][m.name] for s in order):
                    continue
                # per prompt (every seed's prompts in seed order, the same order for every size): paired across sizes
                units = [[1.0 - v for d in data.values()
                          for v in d["selected"][s][(m.name, n)].values()]
                         for s in order]
                fit = _loglog(xs, [float(np.mean(u)) for u in units], units,
                              paired=len({len(u) for u in units}) == 1, n_boot=cfg.fit_boot, seed=cfg.seed)
                if fit is not None:
                    fits[f"{m.name} N={n}"] = fit
        if fits:
            rec.table("log10(1 - gold) = slope * log10(parameters) + intercept (95% bootstrap intervals over prompts, "
                      "resampled jointly across sizes)", ["method, N", "slope", "slope 95% CI", "intercept",
                                                          "intercept 95% CI"], _fit_rows(fits))
    rec.results["reward_vs_n"]["loglog_fits"] = fits

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        xs = [data[seeds[0]]["params"][s] for s in order]
        colors = {m.name: f"C{i}" for i, m in enumerate(cfg.methods)}  # colour = method, line style = N
        styles = dict(zip(budgets, ["--", "-", ":", "-."] * 4))
        for m in cfg.methods:
            for n in budgets:
                pts = [(x, per_size[s][m.name][str(n)]) for x, s in zip(xs, order) if str(n) in per_size[s][m.name]]
                if not pts:
                    continue
                ys = [1.0 - r[key] if with_gold else r[key] for _, r in pts]
                axes[0].errorbar([p for p, _ in pts], ys, yerr=[1.96 * r[f"{key}_se"] for _, r in pts], marker="o",
                                 ms=3, capsize=2, linestyle=styles[n], color=colors[m.name], label=f"{m.name} N={n}")
        axes[0].set_xscale("log")
        if with_gold:
            axes[0].set_yscale("log")
        axes[0].set_ylabel("1 - gold reward of the selected response" if with_gold else "RM score of the selected")
        axes[0].set_title("selected response (95% CI)", fontsize=9)
        for i, (name, g) in enumerate(gains.items()):
            if not g["sizes"]:
                continue
            c = f"C{i % 10}"
            ms = [g["sizes"][s] for s in order]
            axes[1].errorbar(xs, [x["mean"] for x in ms], yerr=[[x["mean"] - x["low"] for x in ms],
                                                                [x["high"] - x["mean"] for x in ms]],
                             marker="o", ms=3, capsize=2, color=c, label=name)
            if g["teacher"] is not None:
                axes[1].axhline(g["teacher"], color=c, lw=0.8, linestyle=":")
        axes[1].axhline(0.0, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_ylabel("paired gold gain (dotted: teacher ceiling)")
        axes[1].set_title("gains over the baselines (95% CI)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("policy parameters")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)

    rec.figure("scaling.png", draw, figsize=(11, 4.2))


def _sr_dpo_report(rec: Record, cfg: Config, data: dict[int, dict[str, Any]], order: list[str], with_gold: bool
                   ) -> None:
    """Sr-DPO part per size, pooled over world seeds: mean judge reward, win rates, the Sr-* vs base head to head
    with 95% CIs, the Delta controls, log-log fits of (1 - mean gold) and scaling_sr_dpo.png."""
    seeds = list(data)
    first = data[seeds[0]]["sr_facts"][order[0]]
    runs_meta = first["runs"]
    what = "gold reward" if with_gold else "reward-model score"
    params = [data[seeds[0]]["params"][s] for s in order]
    per_size: dict[str, dict[str, Any]] = {}
    for s in order:
        summ = {k: sr_dpo.run_summary(d["sr"][s], cfg.sr_dpo.beta) for k, d in data.items()}
        means = {}
        for tag in ("sft", *runs_meta):
            pp = [summ[k][1]["judge_per_prompt"] if tag == "sft" else summ[k][0].get(tag, {}).get("judge_per_prompt",
                                                                                                  [])
                  for k in data]
            means[tag] = dict(zip(("mean", "low", "high"), pooled_ci(pp, cfg.fit_boot, f"at:{s}:mean:{tag}")))
            means[tag]["per_prompt"] = [x for p in pp for x in p]
        h2h = {}
        for key, m in runs_meta.items():
            base = sr_dpo.run_key(sr_dpo.BASE_OF[m["loss"]], m["flip"])
            vs = [("sft", "SFT")] + ([(base, runs_meta[base]["label"])] if base != key and base in runs_meta else [])
            for other, label in vs:
                per = [list(sr_dpo.win_shares(d["sr"][s], key, other, f"win:{key}:{other}").values())
                       for d in data.values()]
                mean, lo, hi = pooled_ci(per, cfg.fit_boot, f"at:{s}:win:{key}:{other}")
                h2h[f"{key} vs {other}"] = {"run": m["label"], "vs": label, "win_rate": mean + 0.5,
                                            "low": lo + 0.5, "high": hi + 0.5}
        controls = sr_dpo.controls_summary([r for d in data.values() for r in d["sr"][s]])
        per_size[s] = {"means": means, "head_to_head": h2h, "controls": controls}
    rec.results["sr_dpo"] = {"sizes": {s: {**v, "means": {t: {k: x for k, x in m.items() if k != "per_prompt"}
                                                          for t, m in v["means"].items()}}
                                       for s, v in per_size.items()},
                             "runs": runs_meta}
    labels = {"sft": "SFT (start)", **{k: f"{m['label']} @{m['flip']:g}" for k, m in runs_meta.items()}}
    rec.table(f"Sr-DPO part: mean {what} of each policy's samples on held-out prompts (95% CI, world seeds {seeds})",
              ["size", "parameters", *labels.values()],
              [[s, f"{p:,}", *[f"{per_size[s]['means'][t]['mean']:.3f} [{per_size[s]['means'][t]['low']:.3f}, "
                                f"{per_size[s]['means'][t]['high']:.3f}]" for t in labels]]
               for s, p in zip(order, params)])
    pairs = list(per_size[order[0]]["head_to_head"])
    rec.table(f"Sr-DPO part: per-prompt win rate ({what}, ties ½; 95% CI)",
              ["comparison", *order],
              [[f"{per_size[order[0]]['head_to_head'][k]['run']} vs {per_size[order[0]]['head_to_head'][k]['vs']}",
                *[f"{h['win_rate']:.3f} [{h['low']:.3f}, {h['high']:.3f}]"
                  for h in (per_size[s]["head_to_head"][k] for s in order)]] for k in pairs])
    ctl = [(s, k, c) for s in order for k, c in per_size[s]["controls"].items()]
    if ctl:
        rec.table("Sr-DPO part: the Delta controls at the mid-training checkpoint per size (paper Δ: reference on "
                  "p ⊕ x; Δ_x: reference on x; pooled over world seeds)",
                  ["size", "run", "partial corr(Δ, gold gap | β·h)", "partial corr(Δ_x, ...)", "Δ < 0 on flipped",
                   "Δ_x < 0 on flipped"],
                  [[s, runs_meta[k]["label"], c["partial_corr"], c["partial_corr_refx"], c["flipped_delta_neg"], c["flipped_delta_neg_refx"]]
                   for s, k, c in ctl])
    fits: dict[str, dict[str, Any]] = {}
    if with_gold:
        for tag, label in labels.items():
            units = [[1.0 - x for x in per_size[s]["means"][tag]["per_prompt"]] for s in order]
            if not all(units):
                continue
            fit = _loglog(params, [float(np.mean(u)) for u in units], units, n_boot=cfg.fit_boot, seed=cfg.seed)
            if fit is not None:
                fits[label] = fit
        if fits:
            rec.table("Sr-DPO part: log10(1 - mean gold) = slope * log10(parameters) + intercept (95% bootstrap "
                      "intervals over prompts, resampled within each size)",
                      ["policy", "slope", "slope 95% CI", "intercept", "intercept 95% CI"], _fit_rows(fits))
    rec.results["sr_dpo"]["loglog_fits"] = fits

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for i, (tag, label) in enumerate(labels.items()):
            ms = [per_size[s]["means"][tag] for s in order]
            ys = [1.0 - m["mean"] if with_gold else m["mean"] for m in ms]
            err = [[m["high"] - m["mean"] for m in ms], [m["mean"] - m["low"] for m in ms]] if with_gold else \
                [[m["mean"] - m["low"] for m in ms], [m["high"] - m["mean"] for m in ms]]
            axes[0].errorbar(params, ys, yerr=err, marker="o", ms=3, capsize=2, color=f"C{i}", label=label)
        axes[0].set_xscale("log")
        if with_gold:
            axes[0].set_yscale("log")
        axes[0].set_ylabel("1 - mean gold reward of samples" if with_gold else "mean RM score of samples")
        for i, k in enumerate(pairs):
            hs = [per_size[s]["head_to_head"][k] for s in order]
            axes[1].errorbar(params, [h["win_rate"] for h in hs], yerr=[[h["win_rate"] - h["low"] for h in hs],
                                                                        [h["high"] - h["win_rate"] for h in hs]],
                             marker="o" if hs[0]["vs"] == "SFT" else "s", ms=3, capsize=2, color=f"C{i}",
                             linestyle="-" if hs[0]["vs"] == "SFT" else "--", label=f"{hs[0]['run']} vs {hs[0]['vs']}")
        axes[1].axhline(0.5, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_ylabel(f"per-prompt win rate ({what}, ties ½)")
        for ax in axes:
            ax.set_xlabel("policy parameters")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6)

    rec.figure("scaling_sr_dpo.png", draw, figsize=(11, 4.2))
    rec.notes.append("Sr-DPO part: per size, pairs are sampled from that size's SFT policy and every run trains from "
                     "it (prs_jax.experiments.sr_dpo; the per-size records are under sr_dpo/SIZE/ of each world "
                     "seed's OUT).")
