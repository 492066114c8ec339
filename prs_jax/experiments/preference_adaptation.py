"""Preference adaptation (PRS paper: per-preference win rates of PRS over the baselines, e.g. humorous 59%,
thoroughness 55%): in the synthetic world, one held-out group of single-preference prompts per preference KIND
(include / exclude / first / last / numbered / capitalised / no_intro / thanks), fresh prompts that never occur in
the world's training data. Rand, PRand and PRS each select the best of N by the proxy reward model; win rates of
PRS vs Rand, PRS vs PRand and PRand vs Rand are judged per prompt by the GOLD reward (ties count half), and the
satisfaction rate of the prompt's preference (prs_jax.world.task.satisfied) and the accuracy of PRS's
self-critique (does the feedback name the unmet preference?) are reported per kind.

Design: paired arms. PRS's first layer IS PRand's first drafts (reused, reward_vs_n.run_paired), so PRS - PRand
measures what refinement adds to the same drafts; every arm runs on the same prompts. The teacher programs run as
the policy on the same prompts with GOLD selection (prs_jax.world.ceiling.teacher_selected) give each effect's
ceiling; at N = 16 the gold-selected teacher nearly always finds an answer that meets a single preference, so
win-rate ceilings between arms are small and a proxy-selected policy can exceed them (a fraction above 100%).

`measure_study` writes OUT/records.jsonl (per method and prompt: every candidate's text, proxy and gold reward,
whether it satisfies the preference, the feedback; per prompt the teacher's choices) and OUT/measure.json;
`report_study` makes the tables, the figure and the protocol's verdicts from the records alone, per world seed
and pooled over `pool_dirs` (one OUT per world seed, measured with the same config).
Endpoint names (see `endpoint_units`): win:A:B, sat:A:B, critique:M, proxy_gap:M, each optionally @KIND.

Real source: prompts with a `preference` column grouped by a metadata column (`group_column`, e.g. a preference
category); win rates are judged by the reward model, which also selected the responses (optimistic; an AI
judge is the paper's referee). The protocol needs the world (gold reward, preference checks).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prs_jax.eval.stats import mean_se, win_rate
from prs_jax.experiments.common import Record, Source, measured_config, pool_measured
from prs_jax.experiments.protocol import Protocol, evaluated_seeds, pooled_ci, report_protocol
from prs_jax.experiments.reward_vs_n import Generation, Method, _seed_for, run_paired, study_env
from prs_jax.strategies.base import PromptItem

WORLD_KINDS = ("include", "exclude", "first", "last", "numbered", "capitalised", "no_intro", "thanks")  # world.task.KINDS
DEFAULT_METHODS: tuple[Method, ...] = (Method("Rand", "rand"), Method("PRand", "prand"),
                                       Method("PRS", "prs", split=0.5, depth=2))
ENDPOINT_KINDS = ("win", "sat", "critique", "proxy_gap")
RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"


@dataclasses.dataclass(frozen=True)
class Config:
    """The preference-adaptation study."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/preference_adaptation"
    seed: int = 0
    n: int = 16
    prompts_per_kind: int = 24  # world: fresh single-preference prompts per kind
    kinds: tuple[str, ...] = WORLD_KINDS
    methods: tuple[Method, ...] = DEFAULT_METHODS
    # (a, b): win rate of a over b, per kind
    comparisons: tuple[tuple[str, str], ...] = (("PRS", "Rand"), ("PRS", "PRand"), ("PRand", "Rand"))
    generation: Generation = dataclasses.field(default_factory=Generation)
    group_column: str = "category"  # real source: the metadata column that groups prompts
    max_prompts: int | None = None  # real source: cap on prompts read
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
    n_boot: int = 2000  # bootstrap resamples of the tables' 95% intervals


# ------------------------------------------------------------------------------------------------ metrics
def win_rate_row(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """results.json row of per-prompt wins of a over b (prs_jax.eval.stats.win_rate; ties count half): the win
    rate, its s.e. over prompts, and the win / tie / loss shares."""
    w = win_rate(a, b)
    wins, ties, losses = w.shares()
    return {"win_rate": w.win_rate, "se": w.se, "wins": wins, "ties": ties, "losses": losses, "prompts": w.n}


def training_ids(built: Any) -> set[str]:
    """Ids of every prompt the world's policy and proxy RM were trained on: the training split itself
    (prs_jax.world.corpus.split_prompts, same seed) plus the id column of sft.jsonl and rm_train.jsonl."""
    from prs_jax.world.corpus import split_prompts

    cfg = built.config
    train, _ = split_prompts(built.world(), cfg.train_prompts, cfg.heldout_prompts, cfg.seed)
    ids = {p.id for p in train}
    for name in ("sft.jsonl", "rm_train.jsonl"):
        path = built.data / name
        if path.is_file():
            with path.open() as fh:
                for line in fh:
                    if line.strip():
                        row = json.loads(line)
                        if "id" in row:
                            ids.add(str(row["id"]))
    return ids


def fresh_prompts(built: Any, kinds: Sequence[str], per_kind: int, seed: int, max_draws: int = 200_000
                  ) -> dict[str, list[Any]]:
    """`per_kind` distinct single-preference prompts per kind from the world's sampler, none in training."""
    unknown = [k for k in kinds if k not in WORLD_KINDS]
    if unknown:
        raise ValueError(f"kinds: {unknown} are not preference kinds of the world; use some of {WORLD_KINDS}.")
    world = built.world()
    exclude = training_ids(built)
    rng = np.random.default_rng([seed, 7, 11])
    by_kind: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    for _ in range(max_draws):
        if all(len(v) >= per_kind for v in by_kind.values()):
            break
        p = world.sample_prompt(rng, n_prefs=1)
        kind = p.prefs[0].kind
        if kind in by_kind and len(by_kind[kind]) < per_kind and p.id not in exclude:
            by_kind[kind].setdefault(p.id, p)
    short = {k: len(v) for k, v in by_kind.items() if len(v) < per_kind}
    if short:
        raise ValueError(f"prompts_per_kind={per_kind}: only {short} fresh prompts found after {max_draws} draws; "
                         "lower prompts_per_kind.")
    return {k: list(v.values()) for k, v in by_kind.items()}


def proxy_gap(by_prompt: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float:
    """Mean over prompts that have both of: mean proxy score of the candidates satisfying the preference minus
    that of the candidates not satisfying it (> 0: the proxy RM rewards the preference; NaN: no such prompt)."""
    gaps = [float(np.mean(a) - np.mean(b)) for a, b in by_prompt if len(a) and len(b)]
    return float(np.mean(gaps)) if gaps else float("nan")


def feedback_names_unmet(prompt: Any, result: Any) -> bool | None:
    """For a PRS tree on a single-preference world prompt: None when the best first-layer draft (by the proxy)
    already satisfies the preference; else whether the first self-feedback names it with the bullet the world's
    teacher uses for that issue (prs_jax.world.corpus.issue_text, e.g. "- add plum")."""
    from prs_jax.world.corpus import issue_text
    from prs_jax.world.task import satisfied

    pref = prompt.prefs[0]
    best = max(result.layers[0], key=lambda c: c.reward)  # first maximum, as the strategy picks
    if satisfied(pref, best.text):
        return None
    fbs = result.info.get("feedback_texts") or [""]
    return issue_text(prompt, pref.kind + (f":{pref.item}" if pref.item else "")) in fbs[0]


def teacher_method(m: Method, n: int) -> str | None:
    """The teacher-ceiling method (prs_jax.world.ceiling.METHODS) that `m` at budget n is the learned counterpart
    of, or None (PRS only when its layer widths are the ceiling's: n // 2 drafts, then the rest)."""
    from prs_jax.world.ceiling import prs_widths

    if m.kind in ("rand", "prand"):
        return m.kind
    if m.kind == "prs" and m.widths(n) == prs_widths(n):
        return "prs" if m.feedback else "prs_nofb"
    return None


# ------------------------------------------------------------------------------------------------ measure
def _check(cfg: Config) -> None:
    names = [m.name for m in cfg.methods]
    if not names:
        raise ValueError("methods: empty; list at least one method (see DEFAULT_METHODS).")
    if len(set(names)) != len(names):
        raise ValueError(f"methods: names must be unique, got {names}")
    if cfg.n < 1:
        raise ValueError(f"n: need a positive sample budget, got {cfg.n}")
    for a, b in cfg.comparisons:
        if a not in names or b not in names:
            raise ValueError(f"comparisons: ({a!r}, {b!r}) names a method not in methods {names}.")
    for e in cfg.protocol.endpoints:
        _, _, group = parse_endpoint(e.name, names)
        if group is not None and cfg.source.kind == "world" and group not in cfg.kinds:
            raise ValueError(f"preference_adaptation protocol: endpoint {e.name!r}: @{group} is not one of the "
                             f"study's kinds {list(cfg.kinds)}")


def parse_endpoint(name: str, methods: Sequence[str]) -> tuple[str, tuple[str, ...], str | None]:
    """(kind, method names, group or None) of an endpoint name KIND:A[:B][@GROUP] (see endpoint_units)."""
    body, _, group = name.partition("@")
    kind, *args = body.split(":")
    arity = {"win": 2, "sat": 2, "critique": 1, "proxy_gap": 1}
    if kind not in arity or len(args) != arity.get(kind):
        raise ValueError(f"preference_adaptation protocol: endpoint {name!r}: the name must be win:A:B, sat:A:B, "
                         "critique:M or proxy_gap:M, optionally followed by @KIND (see "
                         "preference_adaptation.endpoint_units)")
    unknown = [a for a in args if a not in methods]
    if unknown:
        raise ValueError(f"preference_adaptation protocol: endpoint {name!r} names {unknown}, not in methods "
                         f"{list(methods)}")
    return kind, tuple(args), group or None


def method_records(results: Sequence[Any], m: Method, n: int, prompt_of: dict[str, Any] | None, gold: Any
                   ) -> list[dict[str, Any]]:
    """One JSON row per prompt of one method's run: every candidate (text, proxy, layer and, in the world, gold
    reward and whether it satisfies the preference), the selected index and, for PRS in the world, whether the
    first self-feedback names the unmet preference (None when the best draft already satisfies it)."""
    rows = []
    for r in results:
        it = r.item
        cands = r.candidates[:n] if m.kind != "prs" else r.candidates
        row: dict[str, Any] = {
            "kind": "method", "method": m.name, "method_kind": m.kind, "id": it.id, "group": it.metadata["group"],
            "prompt": it.prompt, "preference": it.preference, "texts": [c.text for c in cands],
            "proxy": [float(c.reward) for c in cands], "layer": [int(c.metadata.get("layer", 0)) for c in cands],
            "selected": next(i for i, c in enumerate(cands) if c is r.selected)}
        if prompt_of is not None:
            from prs_jax.world.task import satisfied

            pref = prompt_of[it.id].prefs[0]
            row["gold"] = [float(gold(it.prompt, c.text, it.preference)) for c in cands]
            row["satisfied"] = [bool(satisfied(pref, c.text)) for c in cands]
            if m.kind == "prs" and m.feedback:
                row["feedback_texts"] = list(r.info.get("feedback_texts") or [])
                row["feedback_named"] = feedback_names_unmet(prompt_of[it.id], r)
        rows.append(row)
    return rows


def teacher_records(world: Any, prompts: Sequence[Any], groups: Sequence[str], n: int, seed: int,
                    methods: Sequence[Method]) -> list[dict[str, Any]]:
    """Per prompt, the teacher-as-policy ceiling of each method kind the study runs: the gold reward of the
    gold-selected answer and whether it satisfies the preference (prs_jax.world.ceiling.teacher_selected)."""
    from prs_jax.world.ceiling import teacher_selected
    from prs_jax.world.task import gold_reward, satisfied

    wanted = {teacher_method(m, n) for m in methods} - {None}
    rows = []
    for p, group in zip(prompts, groups):
        picks: dict[str, Any] = {}
        if wanted & {"rand", "prand", "prs"}:
            picks.update({k: v[n] for k, v in teacher_selected(world, p, (n,), seed).items()})
        if "prs_nofb" in wanted:
            picks["prs_nofb"] = teacher_selected(world, p, (n,), seed, feedback=False)["prs"][n]
        rows.append({"kind": "teacher", "id": p.id, "group": group,
                     "gold": {k: float(gold_reward(p.x, a.text(), p.z)) for k, a in picks.items() if k in wanted},
                     "satisfied": {k: bool(satisfied(p.prefs[0], a.text())) for k, a in picks.items()
                                   if k in wanted}})
    return rows


# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "pool_dirs", "protocol", "n_boot")


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure: every method on every prompt, paired (run_paired: PRS reuses PRand's drafts), and the teacher
    ceiling on the same prompts; writes OUT/records.jsonl and OUT/measure.json. No tables."""
    from tqdm import tqdm

    from prs_jax.config import to_dict
    from prs_jax.data.io import write_jsonl, write_text_atomic

    _check(cfg)
    env = study_env(cfg.source, cfg.generation, console, study="preference_adaptation")
    prompt_of: dict[str, Any] | None = None
    if env.gold is not None:
        groups = fresh_prompts(env.world, cfg.kinds, cfg.prompts_per_kind, cfg.seed)
        items = [PromptItem(p.id, p.x, p.z, metadata={"group": kind}) for kind, ps in groups.items() for p in ps]
        prompt_of = {p.id: p for ps in groups.values() for p in ps}
    else:
        items = env.real_prompts(cfg.max_prompts, preference_column="preference")
        missing = [it.id for it in items if cfg.group_column not in it.metadata]
        if missing:
            raise ValueError(f"{cfg.source.real.prompts_path}: rows {missing[:5]} have no {cfg.group_column!r} "
                             "column; set group_column to the column that names each prompt's preference category.")
        items = [dataclasses.replace(it, metadata={**it.metadata, "group": str(it.metadata[cfg.group_column])})
                 for it in items]
    if console is not None:
        console.print(f"preference_adaptation: {len(items)} prompts in "
                      f"{len(dict.fromkeys(it.metadata['group'] for it in items))} groups, N={cfg.n}, methods "
                      f"{[m.name for m in cfg.methods]} (PRS reuses PRand's drafts)", markup=False)
    t0 = time.perf_counter()
    with tqdm(total=len(items) * len(cfg.methods), desc="preference_adaptation", unit="run", mininterval=5) as bar:
        results = run_paired(env, cfg.generation, items, cfg.methods, cfg.n, _seed_for(cfg.seed, "pa", cfg.n), bar)
    seconds = time.perf_counter() - t0
    records = [row for m in cfg.methods for row in method_records(results[m.name], m, cfg.n, prompt_of, env.gold)]
    teacher_s = 0.0
    if prompt_of is not None:
        t1 = time.perf_counter()
        records += teacher_records(env.world.world(), [prompt_of[it.id] for it in items],
                                   [it.metadata["group"] for it in items], cfg.n, cfg.seed, cfg.methods)
        teacher_s = time.perf_counter() - t1
    out = Path(cfg.out_dir)
    write_jsonl(out / RECORDS, records)
    world = None if env.world is None else {
        "key": env.world.report.get("key"), "root": str(env.world.root), "seed": env.world.config.seed,
        "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy")}
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind, "prompts": len(items),
             "judge": "gold reward" if prompt_of is not None else "reward model (also the selector)",
             "world": world, "world_seed": None if world is None else world["seed"],
             "policy_parameters": env.param_count(), "run_seconds": seconds, "teacher_seconds": teacher_s,
             "compilations": env.compilations,
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


# ------------------------------------------------------------------------------------------------ report
def _by_method(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> prompt id -> its record (method rows only)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == "method":
            out.setdefault(r["method"], {})[r["id"]] = r
    return out


def _judge(row: dict[str, Any]) -> float:
    """The judged score of the selected response: gold in the world, else the proxy."""
    key = "gold" if "gold" in row else "proxy"
    return float(row[key][row["selected"]])


def _win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def endpoint_units(name: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """The per-unit values of a declared endpoint from one seed's records (pure). Names, each optionally @KIND
    (only prompts of that preference kind):
      win:A:B      per prompt, win of A's selected response over B's by the judge (1, 1/2 on ties, 0) - 1/2;
      sat:A:B      per prompt, [A's selection satisfies the preference] - [B's selection does];
      critique:M   per prompt where the best of M's first-layer drafts misses the preference, 1 if M's first
                   self-feedback names it (the teacher's critique always does);
      proxy_gap:M  per prompt with both, mean proxy reward of M's candidates that satisfy the preference minus
                   that of those that do not (> 0: the proxy RM rewards the preference)."""
    by = _by_method(records)
    kind, args, group = parse_endpoint(name, list(by))

    def rows(m: str) -> dict[str, dict[str, Any]]:
        return {i: r for i, r in by[m].items() if group is None or r["group"] == group}

    if kind in ("win", "sat"):
        ra, rb = rows(args[0]), rows(args[1])
        ids = [i for i in ra if i in rb]
        if kind == "win":
            return np.array([_win(_judge(ra[i]), _judge(rb[i])) - 0.5 for i in ids])
        need_world(name, ra)
        return np.array([float(ra[i]["satisfied"][ra[i]["selected"]]) - float(rb[i]["satisfied"][rb[i]["selected"]])
                         for i in ids])
    rm = rows(args[0])
    need_world(name, rm)
    if kind == "critique":
        if any("feedback_named" not in r for r in rm.values()):
            raise ValueError(f"preference_adaptation protocol: endpoint {name!r}: {args[0]} is not a PRS method "
                             "with feedback")
        return np.array([float(r["feedback_named"]) for r in rm.values() if r["feedback_named"] is not None])
    return np.array([np.mean([p for p, s in zip(r["proxy"], r["satisfied"]) if s])
                     - np.mean([p for p, s in zip(r["proxy"], r["satisfied"]) if not s])
                     for r in rm.values() if any(r["satisfied"]) and not all(r["satisfied"])])


def need_world(name: str, rows: dict[str, dict[str, Any]]) -> None:
    if any("satisfied" not in r for r in rows.values()):
        raise ValueError(f"preference_adaptation protocol: endpoint {name!r} needs the world's preference checks "
                         "(source.kind: world)")


def teacher_ceilings(names: Sequence[str], records: Sequence[dict[str, Any]], methods: Sequence[Method], n: int
                     ) -> dict[str, float]:
    """The teacher-as-policy value of each win / sat / critique endpoint over the records' prompts (pooled)."""
    teacher = [r for r in records if r["kind"] == "teacher"]
    tm = {m.name: teacher_method(m, n) for m in methods}
    out: dict[str, float] = {}
    for name in names:
        kind, args, group = parse_endpoint(name, list(tm))
        rows = [r for r in teacher if group is None or r["group"] == group]
        if not rows:
            continue
        if kind == "critique":
            out[name] = 1.0  # the teacher's critique names every violation (prs_jax.world.behaviour.feedback)
        elif kind in ("win", "sat") and tm[args[0]] and tm[args[1]]:
            a, b = tm[args[0]], tm[args[1]]
            if kind == "win":
                out[name] = float(np.mean([_win(r["gold"][a], r["gold"][b]) - 0.5 for r in rows]))
            else:
                out[name] = float(np.mean([float(r["satisfied"][a]) - float(r["satisfied"][b]) for r in rows]))
    return out


def _fmt_ci(ci: tuple[float, float, float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if np.isnan(ci[0]):
        return "-"
    return f"{f.format(ci[0])} [{f.format(ci[1])}, {f.format(ci[2])}]"


def summarise(by_seed: dict[int, list[dict[str, Any]]], cfg: Config, groups: Sequence[str]
              ) -> dict[str, Any]:
    """Per group (and "all"): win rates per comparison and per-method means with seed-stratified bootstrap 95%
    intervals over the pooled prompts, the teacher's values beside them (pure, from the records)."""
    names = [m.name for m in cfg.methods]
    seeds = sorted(by_seed)
    bys = {s: _by_method(by_seed[s]) for s in seeds}
    with_gold = all("gold" in r for s in seeds for r in by_seed[s] if r["kind"] == "method")
    tm = {m.name: teacher_method(m, cfg.n) for m in cfg.methods}
    out: dict[str, Any] = {}
    for group in [*groups, None]:
        gname = group if group is not None else "all"

        def rows(s: int, m: str) -> list[dict[str, Any]]:
            return [r for r in bys[s][m].values() if group is None or r["group"] == group]

        teacher = [r for s in seeds for r in by_seed[s] if r["kind"] == "teacher" and (group is None
                                                                                       or r["group"] == group)]
        entry: dict[str, Any] = {"prompts": sum(len(rows(s, names[0])) for s in seeds), "win_rates": {},
                                 "methods": {}}
        for a, b in cfg.comparisons:
            per = []
            for s in seeds:
                ra, rb = {r["id"]: r for r in rows(s, a)}, {r["id"]: r for r in rows(s, b)}
                per.append([(_judge(ra[i]), _judge(rb[i])) for i in ra if i in rb])
            flat = [x for p in per for x in p]
            w = win_rate([x for x, _ in flat], [y for _, y in flat])
            wins, ties, losses = w.shares()
            ci = pooled_ci([[_win(x, y) for x, y in p] for p in per], cfg.n_boot, f"win:{a}:{b}:{gname}")
            row = {"win_rate": w.win_rate, "se": w.se, "low": ci[1], "high": ci[2], "wins": wins, "ties": ties,
                   "losses": losses, "prompts": w.n}
            if teacher and with_gold and tm[a] and tm[b]:
                row["teacher"] = float(np.mean([_win(r["gold"][tm[a]], r["gold"][tm[b]]) for r in teacher]))
            entry["win_rates"][f"{a} vs {b}"] = row
        for m in cfg.methods:
            e: dict[str, Any] = {}
            per = [rows(s, m.name) for s in seeds]
            e["proxy"], e["proxy_se"] = mean_se([float(r["proxy"][r["selected"]]) for p in per for r in p])
            if with_gold:
                g = pooled_ci([[_judge(r) for r in p] for p in per], cfg.n_boot, f"gold:{m.name}:{gname}")
                sat = pooled_ci([[float(r["satisfied"][r["selected"]]) for r in p] for p in per], cfg.n_boot,
                                f"satisfied:{m.name}:{gname}")
                e.update(gold=g[0], gold_low=g[1], gold_high=g[2], satisfaction=sat[0], satisfaction_low=sat[1],
                         satisfaction_high=sat[2],
                         satisfaction_se=mean_se([float(r["satisfied"][r["selected"]]) for p in per for r in p])[1],
                         candidate_satisfaction=float(np.mean([np.mean(r["satisfied"]) for p in per for r in p])),
                         any_candidate_satisfied=float(np.mean([any(r["satisfied"]) for p in per for r in p])))
                gaps = [(([x for x, ok in zip(r["proxy"], r["satisfied"]) if ok]),
                         [x for x, ok in zip(r["proxy"], r["satisfied"]) if not ok]) for p in per for r in p]
                e["proxy_gap_satisfied_minus_not"] = proxy_gap(gaps)
                if teacher and tm[m.name]:
                    e["teacher_gold"] = float(np.mean([r["gold"][tm[m.name]] for r in teacher]))
                    e["teacher_satisfaction"] = float(np.mean([r["satisfied"][tm[m.name]] for r in teacher]))
                if any("feedback_named" in r for p in per for r in p):
                    fb = [[float(r["feedback_named"]) for r in p if r.get("feedback_named") is not None]
                          for p in per]
                    c = pooled_ci(fb, cfg.n_boot, f"feedback_named:{m.name}:{gname}")
                    e["best_draft_misses_preference"] = sum(len(f) for f in fb)
                    e["feedback_names_unmet_preference"] = c[0]
                    e["feedback_names_low"], e["feedback_names_high"] = c[1], c[2]
            entry["methods"][m.name] = e
        out[gname] = entry
    return out


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: tables (pooled over the world seeds of out_dir + pool_dirs, seed-stratified bootstrap 95%
    intervals, the teacher ceiling beside each), the figure, the protocol's verdicts and results.json /
    results.md from the saved records alone; re-runnable without models."""
    _check(cfg)
    measured = measured_config(cfg, NOT_MEASURED)
    facts_by, by_seed = pool_measured(cfg.out_dir, cfg.pool_dirs, measured, "preference_adaptation",
                                      ("source.world.seed",), MEASURE_FACTS, RECORDS)
    facts = next(iter(facts_by.values()))
    rec = Record("preference_adaptation", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    names = [m.name for m in cfg.methods]
    with_gold = facts["world"] is not None
    records0 = next(iter(by_seed.values()))
    order = list(dict.fromkeys(r["group"] for r in records0 if r["kind"] == "method"))
    groups = summarise(by_seed, cfg, order)
    seeds = sorted(by_seed)
    judge = "gold reward" if with_gold else "reward model"
    comp = [f"{a} vs {b}" for a, b in cfg.comparisons]
    gall = [*order, "all"]
    where = f"world seed{'s' if len(seeds) > 1 else ''} {seeds}" if with_gold else "real prompts"

    def wr(g: str, c: str) -> str:
        w = groups[g]["win_rates"][c]
        t = f" (teacher {w['teacher']:.2f})" if "teacher" in w else ""
        return f"{w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]{t}"

    rec.table(f"Win rate at N={cfg.n}, judged by the {judge} (ties count half; {where}, bootstrap 95% CI; the "
              "teacher-as-policy ceiling in brackets)",
              ["group", "prompts", *comp, *[f"ties {c}" for c in comp]],
              [[g, groups[g]["prompts"], *[wr(g, c) for c in comp],
                *[f"{groups[g]['win_rates'][c]['ties']:.2f}" for c in comp]] for g in gall])
    if with_gold:
        def sat(g: str, m: str) -> str:
            e = groups[g]["methods"][m]
            t = f" ({e['teacher_satisfaction']:.2f})" if "teacher_satisfaction" in e else ""
            return _fmt_ci((e["satisfaction"], e["satisfaction_low"], e["satisfaction_high"])) + t

        rec.table("Satisfaction of the prompt's preference by the selected response (95% CI; teacher in brackets)",
                  ["kind", *names], [[g, *[sat(g, m) for m in names]] for g in gall])
        rec.table("What the policy offered and how the proxy RM ranked it (each method's candidates)",
                  ["kind", *[f"{m}: candidates satisfying" for m in names], *[f"{m}: any satisfies" for m in names],
                   *[f"{m}: proxy gap sat - unsat" for m in names]],
                  [[g, *[f"{groups[g]['methods'][m]['candidate_satisfaction']:.2f}" for m in names],
                    *[f"{groups[g]['methods'][m]['any_candidate_satisfied']:.2f}" for m in names],
                    *[f"{groups[g]['methods'][m]['proxy_gap_satisfied_minus_not']:+.2f}" for m in names]]
                   for g in gall])
        fb_methods = [m for m in names if "feedback_names_unmet_preference" in groups["all"]["methods"][m]]
        if fb_methods:
            rec.table("Self-critique accuracy: when the best draft misses the preference, does the first feedback "
                      "name it? (95% CI; the teacher's critique always does)",
                      ["kind", *[f"{m}: best draft misses (prompts)" for m in fb_methods],
                       *[f"{m}: feedback names it" for m in fb_methods]],
                      [[g, *[groups[g]["methods"][m]["best_draft_misses_preference"] for m in fb_methods],
                        *[_fmt_ci((groups[g]["methods"][m]["feedback_names_unmet_preference"],
                                   groups[g]["methods"][m]["feedback_names_low"],
                                   groups[g]["methods"][m]["feedback_names_high"])) for m in fb_methods]]
                       for g in gall])

        def gold(g: str, m: str) -> str:
            e = groups[g]["methods"][m]
            t = f" ({e['teacher_gold']:.2f})" if "teacher_gold" in e else ""
            return _fmt_ci((e["gold"], e["gold_low"], e["gold_high"])) + t

        rec.table("Gold reward of the selected response (95% CI; teacher in brackets)", ["kind", *names],
                  [[g, *[gold(g, m) for m in names]] for g in gall])
    else:
        rec.table("Reward-model score of the selected response (mean ± s.e.)", ["group", *names],
                  [[g, *[f"{groups[g]['methods'][m]['proxy']:.3f} ± {groups[g]['methods'][m]['proxy_se']:.3f}"
                         for m in names]] for g in gall])

    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints and with_gold:
        ceilings = teacher_ceilings([e.name for e in proto.endpoints],
                                    [r for s in evaluated_seeds(proto, by_seed) for r in by_seed[s]], cfg.methods,
                                    cfg.n)
        verdicts = report_protocol(rec, proto, by_seed, endpoint_units, facts_by, MEASURE_FACTS, ceilings)
    elif proto.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the world's gold reward and "
                         "preference checks (source.kind: world).")

    def draw(fig: Any) -> None:
        panels = 2 if with_gold else 1
        axes = fig.subplots(1, panels, squeeze=False)[0]
        x = np.arange(len(gall))
        w = 0.8 / max(len(comp), 1)
        for i, c in enumerate(comp):
            rows = [groups[g]["win_rates"][c] for g in gall]
            ys = np.array([r["win_rate"] for r in rows])
            err = np.array([ys - [r["low"] for r in rows], [r["high"] for r in rows] - ys])
            xs = x + (i - (len(comp) - 1) / 2) * w
            axes[0].bar(xs, ys, w, yerr=err, capsize=2, label=c)
            if all("teacher" in r for r in rows):
                axes[0].scatter(xs, [r["teacher"] for r in rows], marker="_", s=60, color="k", zorder=3,
                                label="teacher ceiling" if i == 0 else None)
        axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
        axes[0].set_ylabel(f"win rate by the {judge} (ties = 1/2), 95% CI")
        axes[0].set_title(f"win rates at N={cfg.n}")
        if with_gold:
            w2 = 0.8 / len(names)
            for i, m in enumerate(names):
                es = [groups[g]["methods"][m] for g in gall]
                ys = np.array([e["satisfaction"] for e in es])
                err = np.array([ys - [e["satisfaction_low"] for e in es], [e["satisfaction_high"] for e in es] - ys])
                axes[1].bar(x + (i - (len(names) - 1) / 2) * w2, ys, w2, yerr=err, capsize=2, label=m)
            axes[1].set_ylabel("preference satisfied by the selected response")
            axes[1].set_title("satisfaction rate per kind")
            axes[1].set_ylim(0, 1.05)
        for ax in axes:
            ax.set_xticks(x)
            ax.set_xticklabels(gall, rotation=20, fontsize=8)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)

    rec.figure("preference_adaptation.png", draw, figsize=(6 * (2 if with_gold else 1), 4.2))
    rec.results.update({"groups": groups, "n": cfg.n, "source": facts["source"], "prompts": facts["prompts"],
                        "judge": facts["judge"], "world": facts["world"], "world_seeds": seeds,
                        "run_seconds": facts["run_seconds"], "teacher_seconds": facts["teacher_seconds"],
                        "compilations": facts["compilations"], "policy_parameters": facts["policy_parameters"],
                        "protocol": verdicts})
    if with_gold:
        rec.notes.append(f"{cfg.prompts_per_kind} fresh single-preference prompts per kind and world seed from the "
                         "world's sampler (seeded), none of them in the world's training split, sft.jsonl or "
                         "rm_train.jsonl; selection by the proxy RM, judged by the gold reward.")
        rec.notes.append("Paired arms: PRS's first layer is PRand's first drafts (reused). The teacher ceiling runs "
                         "the world's teacher programs as the policy on the same prompts with GOLD selection "
                         "(prs_jax.world.ceiling); at this N the gold-selected teacher nearly always meets a single "
                         "preference, so its win rates between arms are small and the proxy-selected policy can "
                         "exceed them (fractions of the ceiling above 100%).")
    else:
        rec.notes.append("Real source: the reward model both selects and judges, so these win rates are optimistic; "
                         "the paper judges with GPT-4.")
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study: results.json / results.md / PNG; returns the record."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)
