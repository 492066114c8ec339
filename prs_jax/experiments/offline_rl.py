"""Iterative offline RL with PRS-generated data (PRS paper, Ye & Ng 2024, arXiv 2408.12163; ReST-style):
sample -> select by the proxy reward model -> retrain -> repeat, for several data generators and data kinds.

Arms (`arms`, each a sampler and a data kind):
  sampler  rand: N samples from p(. | x) (no preference in the input), prand: N samples from p(. | x, z),
           prs: PRS with budget N (N/2 drafts, one self-feedback on the best, N/2 refinements).
  data     sft_best: SFT on (x, z) -> the response with the highest proxy reward;
           dpo_best_worst: DPO on (x, z) with best vs worst by the proxy reward (reference = the previous policy);
           sft_best_refine (prs only): sft_best plus PRS's improving pairs (R(refinement) > R(draft)) written as
           conversations in the policy's own PRS turns (draft, feedback request, feedback, refinement request,
           refinement), so the policy keeps and sharpens the refinement skill PRS relies on.
Every iteration samples on the same training prompts with the current policy (new random draws), trains from
the previous iteration's policy (`run_train` sft|dpo with an export directory per iteration) and evaluates on
held-out prompts: the greedy response's gold reward, optionally the mean gold reward of `eval.samples` samples,
and PRS best-of-`eval.prs_n` (selection by the proxy RM, the selected response judged by the gold reward).
With `source.kind: real` there is no gold reward: evaluation reports the reward model's scores, and says so.

`measure_study` writes OUT/records.jsonl (per arm and iteration: every held-out prompt's score per metric, and
every training prompt's selected response's proxy and gold reward) and OUT/measure.json (config, data summaries,
timings, the declared protocol); `report_study` makes the tables (95% CIs, pooled over the world seeds of
`pool_dirs`), the curves and the protocol's verdicts from those alone. Checkpoints go to
work_dir/<world key> (real: work_dir/real), so runs on different world seeds never share a directory.
Endpoint names: METRIC:ARM@I:ARM@J, the per-prompt difference of METRIC (greedy, sampled, prs_boN on the held-out
prompts; data: the gold reward of the response selected for training, on the training prompts) between arm ARM at
iteration I and at iteration J (iteration 0 is the starting policy, shared by every arm).
Outputs: results.json, results.md (tables per metric and iteration), offline_rl.png (curves).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from prs_jax.config import to_dict
from prs_jax.experiments.common import Record, Source, measured_config, pool_measured
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.protocol import Protocol, pooled_ci, report_protocol
from prs_jax.experiments.policy_tools import (
    assistant,
    config_digest,
    rescore,
    run_chunked,
    user_turn,
)
from prs_jax.train.trainer import OptimConfig, TrainerConfig
from prs_jax.tree.sampling import SamplingParams

Sampler = Literal["rand", "prand", "prs"]
DataKind = Literal["sft_best", "dpo_best_worst", "sft_best_refine"]
SAMPLER_LABEL = {"rand": "Rand", "prand": "PRand", "prs": "PRS"}
DATA_LABEL = {"sft_best": "SFT best", "dpo_best_worst": "DPO best-vs-worst", "sft_best_refine": "SFT best + refine"}


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    """One arm: who generates the data and what is trained on it."""

    sampler: Sampler = "prs"
    data: DataKind = "sft_best"

    @property
    def tag(self) -> str:
        return f"{self.sampler}-{self.data}"

    @property
    def label(self) -> str:
        return f"{SAMPLER_LABEL[self.sampler]}, {DATA_LABEL[self.data]}"


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Data generation on the training prompts, each iteration."""

    prompts: int = 64
    n: int = 8  # sample budget per prompt
    prs_split: float = 0.5
    prs_depth: int = 2
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)  # temperature 1 by default
    max_new_tokens: int = 48
    feedback_max_new_tokens: int = 48
    chunk: int = 32  # prompts per engine call
    min_reward: float | None = None  # ReST-style filter: keep a prompt's data only if its best proxy reward >= this
    improving_per_prompt: int = 1  # sft_best_refine: the best this many improving pairs per prompt


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation after every iteration."""

    prompts: int = 100
    greedy: bool = True
    samples: int = 0  # > 0: also the mean judge score of this many samples per prompt
    prs_n: int = 4  # > 0: PRS best-of-N (proxy selection), the selected response judged
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    max_new_tokens: int = 48
    feedback_max_new_tokens: int = 48
    chunk: int = 50


@dataclasses.dataclass(frozen=True)
class Config:
    """The offline-RL study (see the module docstring); unknown keys are errors."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/offline_rl"
    work_dir: str = "runs/experiments/offline_rl/work"
    seed: int = 0
    iterations: int = 3
    arms: tuple[ArmSpec, ...] = (ArmSpec("rand", "sft_best"), ArmSpec("prs", "sft_best"),
                                 ArmSpec("rand", "dpo_best_worst"), ArmSpec("prs", "dpo_best_worst"),
                                 ArmSpec("prs", "sft_best_refine"))
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sft_steps: int = 40
    dpo_steps: int = 40
    sft_optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(name="adamw", lr=1e-4, warmup_steps=4))
    dpo_optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(name="rmsprop", lr=1e-4, warmup_steps=4))
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = 0.1
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(batch_size=16, log_every=10, async_checkpoint=False,
                                              tensorboard=False))
    max_length: int = 192
    dpo_max_length: int | None = None  # DPO pairs with precomputed references are padded to this (None: max_length)
    max_prompt_length: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    eval_prompt_set: str = ""  # real only: a separate held-out prompt set ...
    eval_prompts_path: str = ""  # ... and its file
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
    n_boot: int = 2000  # bootstrap resamples of the tables' 95% intervals


# ------------------------------------------------------------------------------------------------ sampling
def _strategy(sampler: Sampler | Literal["greedy"], n: int, cfg_like: Any, env: StudyEnv, split: float = 0.5,
              depth: int = 2):
    from prs_jax.strategies.generate import StrategyConfig

    if sampler == "prs":
        spec = StrategyConfig.of("prs", n, cfg_like.sampling, split=split, depth=min(depth, n),
                                 max_new_tokens=cfg_like.max_new_tokens,
                                 feedback_max_new_tokens=cfg_like.feedback_max_new_tokens)
    else:
        spec = StrategyConfig.of(sampler, n, cfg_like.sampling, max_new_tokens=cfg_like.max_new_tokens)
    return spec.build(templates=env.templates)


def best_worst(result) -> tuple[int, int] | None:
    """Indices of the proxy-best and proxy-worst non-empty candidates (first extreme); None when every response
    is empty (EOS at once): empty responses are never training targets."""
    ok = [j for j, c in enumerate(result.candidates) if c.text.strip()]
    if not ok:
        return None
    rewards = [result.candidates[j].reward for j in ok]
    return ok[int(np.argmax(rewards))], ok[int(np.argmin(rewards))]


def build_rows(results, data: DataKind, env: StudyEnv, min_reward: float | None, improving_per_prompt: int,
               gold: list[list[float]] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training rows of one data kind from scored strategy results (proxy rewards on the nodes), and a summary
    of what was selected (mean proxy reward and, in the world, mean gold reward of the kept responses)."""
    from prs_jax.strategies.prs import improving_pairs

    rows: list[dict[str, Any]] = []
    kept_proxy, kept_gold, n_improving = [], [], 0
    tpl = env.templates.resolved()
    for i, r in enumerate(results):
        picked = best_worst(r)
        if picked is None:
            continue
        b, w = picked
        best_r = r.candidates[b].reward
        if min_reward is not None and best_r < min_reward:
            continue
        if data == "dpo_best_worst":
            if best_r == r.candidates[w].reward:
                continue
            rows.append({"id": r.item.id, "prompt": user_turn(r.item), "chosen": assistant(r.candidates[b].text),
                         "rejected": assistant(r.candidates[w].text)})
        else:
            rows.append({"id": r.item.id, "kind": "best",
                         "messages": user_turn(r.item) + assistant(r.candidates[b].text)})
        kept_proxy.append(best_r)
        if gold is not None:
            kept_gold.append(gold[i][b])
        if data == "sft_best_refine":
            pairs = [p for p in improving_pairs(r) if p["draft"].strip() and p["refinement"].strip()
                     and (p["feedback"] is None or p["feedback"].strip())]
            pairs = sorted(pairs, key=lambda p: -p["refinement_reward"])[:improving_per_prompt]
            for p in pairs:
                z = p["preference"] or ""
                if p["feedback"] is not None:
                    turns = [{"role": "user", "content": tpl.feedback_turn.format(preference=z)},
                             *assistant(p["feedback"]), {"role": "user", "content": tpl.refine_turn}]
                else:
                    turns = [{"role": "user", "content": tpl.refine_turn_no_feedback.format(preference=z)}]
                rows.append({"id": r.item.id, "kind": "refine",
                             "messages": user_turn(r.item) + assistant(p["draft"]) + turns
                             + assistant(p["refinement"])})
                n_improving += 1
    summary = {"rows": len(rows), "prompts_kept": len(kept_proxy), "improving_pairs": n_improving,
               "selected_proxy_mean": float(np.mean(kept_proxy)) if kept_proxy else float("nan")}
    if gold is not None:
        summary["selected_gold_mean"] = float(np.mean(kept_gold)) if kept_gold else float("nan")
    return rows, summary


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_policy(env: StudyEnv, cfg: Config, model, rm, judge, items) -> dict[str, list[float]]:
    """Per held-out prompt (items order), the judge's score of the policy: greedy, mean of sampled responses,
    PRS best-of-N (proxy selection, the selected response judged)."""
    ec = cfg.eval
    out: dict[str, list[float]] = {}
    seed = cfg.seed + 17  # the same engine seed for every policy: common random numbers across arms
    if ec.greedy:
        res = run_chunked(env, _strategy("greedy", 1, ec, env), items, model, judge, seed, ec.chunk,
                          "eval greedy")
        out["greedy"] = [float(r.candidates[0].reward) for r in res]
    if ec.samples > 0:
        res = run_chunked(env, _strategy("prand", ec.samples, ec, env), items, model, judge, seed, ec.chunk,
                          "eval samples")
        out["sampled"] = [float(np.mean([c.reward for c in r.candidates])) for r in res]
    if ec.prs_n > 0:
        res = run_chunked(env, _strategy("prs", ec.prs_n, ec, env), items, model, rm, seed, ec.chunk, "eval PRS")
        sel = [(r.item, r.selected.text) for r in res]
        scores = judge([it.prompt for it, _ in sel], [t for _, t in sel], [it.preference for it, _ in sel])
        out[f"prs_bo{ec.prs_n}"] = [float(x) for x in scores]
    return out


def _metric_names(cfg: Config) -> list[str]:
    return ((["greedy"] if cfg.eval.greedy else []) + (["sampled"] if cfg.eval.samples > 0 else [])
            + ([f"prs_bo{cfg.eval.prs_n}"] if cfg.eval.prs_n > 0 else []))


def selected_data(results, gold: list[list[float]] | None) -> dict[str, list]:
    """Per training prompt with a non-empty candidate: its id and the proxy (and gold) reward of the candidate
    the proxy selects for training (the first maximum among non-empty responses, as build_rows picks)."""
    ids, proxy, gold_sel = [], [], []
    for i, r in enumerate(results):
        picked = best_worst(r)
        if picked is None:
            continue
        b = picked[0]
        ids.append(r.item.id)
        proxy.append(float(r.candidates[b].reward))
        if gold is not None:
            gold_sel.append(float(gold[i][b]))
    return {"ids": ids, "proxy": proxy, **({"gold": gold_sel} if gold is not None else {})}


# ------------------------------------------------------------------------------------------------ study
RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"
START = "start"  # the arm name of iteration 0's records (the starting policy, shared by every arm)


def _check(cfg: Config) -> None:
    if not cfg.arms:
        raise ValueError("offline_rl: `arms` is empty; list at least one {sampler, data}.")
    bad = [a.tag for a in cfg.arms if a.data == "sft_best_refine" and a.sampler != "prs"]
    if bad:
        raise ValueError(f"offline_rl: arms {bad}: data 'sft_best_refine' needs PRS improving pairs; use sampler "
                         "prs for it.")
    if cfg.iterations < 1:
        raise ValueError(f"offline_rl: iterations must be >= 1 (got {cfg.iterations}).")
    tags = [a.tag for a in cfg.arms]
    if len(set(tags)) != len(tags):
        raise ValueError(f"offline_rl: arms {tags} repeat a (sampler, data); list each arm once.")
    for e in cfg.protocol.endpoints:
        metric, (a1, i1), (a2, i2) = parse_endpoint(e.name)
        if metric != "data" and metric not in _metric_names(cfg):
            raise ValueError(f"protocol endpoint {e.name!r}: metric {metric!r} is not measured (the eval config "
                             f"measures {_metric_names(cfg)}; 'data' is the selected training data).")
        for arm, it in ((a1, i1), (a2, i2)):
            if arm not in tags or not 0 <= it <= cfg.iterations or (metric == "data" and it == 0):
                raise ValueError(f"protocol endpoint {e.name!r}: {arm}@{it} is not a measured arm and iteration "
                                 f"(arms {tags}, iterations 0..{cfg.iterations}; data from iteration 1).")


def parse_endpoint(name: str) -> tuple[str, tuple[str, int], tuple[str, int]]:
    """(metric, (arm A, iteration I), (arm B, iteration J)) of an endpoint name METRIC:A@I:B@J."""
    parts = name.split(":")
    if len(parts) == 3:
        sides = [p.rpartition("@") for p in parts[1:]]
        if all(at and arm and it.isdigit() for arm, at, it in sides):
            return parts[0], (sides[0][0], int(sides[0][2])), (sides[1][0], int(sides[1][2]))
    raise ValueError(f"protocol endpoint {name!r}: expected METRIC:ARM@I:ARM@J (e.g. "
                     "'greedy:prs-sft_best@3:rand-sft_best@3'; iteration 0 is the starting policy).")


# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "work_dir", "pool_dirs", "protocol", "n_boot")


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure: every arm's iterations (sample, select, train, evaluate); writes OUT/records.jsonl and
    OUT/measure.json. No tables."""
    import json

    from rich.console import Console

    from prs_jax.data.io import write_jsonl, write_text_atomic
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train

    console = console or Console()
    _check(cfg)
    env = StudyEnv.from_source(cfg.source, console, study="offline_rl",
                               require=("policy", "prompts_path", "reward_model"))
    work = Path(cfg.work_dir) / (str(env.world.report.get("key")) if env.world is not None else "real")
    work.mkdir(parents=True, exist_ok=True)
    train_items, heldout = env.split(cfg.sample.prompts, cfg.eval.prompts, cfg.eval_prompt_set,
                                     cfg.eval_prompts_path)
    rm = env.proxy
    gold = env.gold_scorer()
    judge = gold or rm
    sc = cfg.sample
    ids = [it.id for it in heldout]
    records: list[dict[str, Any]] = []

    def eval_rows(arm: str, it: int, ev: dict[str, list[float]]) -> None:
        records.extend({"kind": "eval", "arm": arm, "iteration": it, "metric": m, "ids": ids, "values": v}
                       for m, v in ev.items())

    t0 = time.perf_counter()
    start_eval = evaluate_policy(env, cfg, env.load_policy(), rm, judge, heldout)
    eval_rows(START, 0, start_eval)
    start_seconds = time.perf_counter() - t0
    console.print(f"offline_rl: starting policy: {_fmt(start_eval)} ({start_seconds:.0f} s)", markup=False)
    arms_out: dict[str, dict[str, Any]] = {}
    sample_cache: dict[tuple[str, str, int], tuple[list, list[list[float]] | None]] = {}
    for arm in cfg.arms:
        policy_dir = Path(env.policy)
        iters: list[dict[str, Any]] = []
        for it in range(1, cfg.iterations + 1):
            t_it = time.perf_counter()
            model = env.load_policy(policy_dir)
            key = (arm.sampler, str(policy_dir), it)
            if key not in sample_cache:  # arms with the same sampler share iteration 1 (same starting policy)
                strategy = _strategy(arm.sampler, sc.n, sc, env, sc.prs_split, sc.prs_depth)
                results = run_chunked(env, strategy, train_items, model, rm, cfg.seed * 1000 + it, sc.chunk,
                                      f"{arm.tag} iter {it} sampling")
                sample_cache[key] = (results, rescore(results, gold) if gold is not None else None)
            results, gold_scores = sample_cache[key]
            t_sample = time.perf_counter() - t_it
            records.append({"kind": "data", "arm": arm.tag, "iteration": it, **selected_data(results, gold_scores)})
            rows, summary = build_rows(results, arm.data, env, sc.min_reward, sc.improving_per_prompt, gold_scores)
            if not rows:
                raise ValueError(f"offline_rl: arm {arm.tag} iteration {it} selected no data (min_reward "
                                 f"{sc.min_reward}); lower sample.min_reward.")
            data_file = write_jsonl(work / arm.tag / f"iter{it}" / "data.jsonl", rows)
            task = "dpo" if arm.data == "dpo_best_worst" else "sft"
            base = TrainRunConfig(
                model=str(policy_dir), dtype=cfg.dtype,
                data=DataConfig(train=str(data_file),
                                max_length=(cfg.dpo_max_length or cfg.max_length) if task == "dpo" else cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, pad_multiple=32),
                loss=LossConfig(name=cfg.dpo_loss, beta=cfg.beta),
                optim=cfg.dpo_optim if task == "dpo" else cfg.sft_optim,
                trainer=dataclasses.replace(cfg.trainer, steps=cfg.dpo_steps if task == "dpo" else cfg.sft_steps,
                                            seed=cfg.seed + it, eval_every=0),
                precompute_ref=task == "dpo", ref_cache_dir=str(work / "ref_cache"))
            run_dir = work / arm.tag / f"iter{it}" / f"run-{config_digest(to_dict(base), data_file)}"
            tcfg = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, out_dir=str(run_dir)),
                                       export_dir=str(run_dir / "policy"))
            console.print(f"\n== {arm.label}: iteration {it}, {task} on {len(rows)} rows -> {run_dir}", markup=False)
            t1 = time.perf_counter()
            run_train(task, tcfg, console=console)
            t_train = time.perf_counter() - t1
            policy_dir = run_dir / "policy"
            t1 = time.perf_counter()
            ev = evaluate_policy(env, cfg, env.load_policy(policy_dir), rm, judge, heldout)
            eval_rows(arm.tag, it, ev)
            iters.append({"iteration": it, "data": summary, "policy": str(policy_dir),
                          "seconds": {"sample": t_sample, "train": t_train, "eval": time.perf_counter() - t1}})
            console.print(f"{arm.label} iteration {it}: {_fmt(ev)}; data {summary}", markup=False)
        arms_out[arm.tag] = {"label": arm.label, "sampler": arm.sampler, "data": arm.data, "iterations": iters}
    out = Path(cfg.out_dir)
    write_jsonl(out / RECORDS, records)
    world = None if env.world is None else {
        "key": env.world.report.get("key"), "root": str(env.world.root), "seed": env.world.config.seed,
        "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy")}
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind, "world": world,
             "world_seed": None if world is None else world["seed"],
             "judge": "gold reward" if gold is not None else "reward model (no gold reward on real checkpoints)",
             "env": env.info, "arms": arms_out, "start_seconds": start_seconds,
             "measure_seconds": time.perf_counter() - t0,
             "setup": {"train_prompts": len(train_items), "heldout_prompts": len(heldout), "n": sc.n,
                       "eval_prs_n": cfg.eval.prs_n},
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


def find_record(records: Sequence[dict[str, Any]], metric: str, arm: str, it: int) -> dict[str, Any] | None:
    """One seed's record of `metric` ("data": the selected training data) for arm at iteration it (iteration 0:
    the starting policy's), or None."""
    arm = START if it == 0 else arm
    kind = "data" if metric == "data" else "eval"
    return next((r for r in records if r["kind"] == kind and r["arm"] == arm and r["iteration"] == it
                 and (kind == "data" or r["metric"] == metric)), None)


def endpoint_units(name: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per-prompt differences of one endpoint on one seed's records (prompts paired by id; iteration 0 of any
    arm is the starting policy)."""
    metric, (a1, i1), (a2, i2) = parse_endpoint(name)

    def values(arm: str, it: int) -> dict[str, float]:
        r = find_record(records, metric, arm, it)
        if r is None:
            raise ValueError(f"protocol endpoint {name!r}: no {metric} records of {START if it == 0 else arm}@{it}; "
                             "measure again.")
        if metric != "data":
            return dict(zip(r["ids"], r["values"]))
        if "gold" not in r:
            raise ValueError(f"protocol endpoint {name!r}: the data records have no gold reward (real source).")
        return dict(zip(r["ids"], r["gold"]))

    va, vb = values(a1, i1), values(a2, i2)
    return np.array([va[k] - vb[k] for k in va if k in vb], float)


def _curves(by_seed: dict[int, list[dict[str, Any]]], cfg: Config) -> dict[str, dict[str, list]]:
    """metric -> arm tag -> per iteration (mean, low, high), pooled over seeds (seed-stratified bootstrap)."""
    out: dict[str, dict[str, list]] = {}
    for m in _metric_names(cfg):
        for arm in cfg.arms:
            row = []
            for it in range(cfg.iterations + 1):
                per = [find_record(by_seed[s], m, arm.tag, it)["values"] for s in sorted(by_seed)]
                row.append(pooled_ci(per, cfg.n_boot, f"{m}:{arm.tag}@{it}"))
            out.setdefault(m, {})[arm.tag] = row
    return out


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: per-metric tables by iteration (95% CIs pooled over the world seeds of out_dir + pool_dirs),
    the data table, the curves and the protocol's verdicts, from the saved records alone."""
    _check(cfg)
    facts_by, by_seed = pool_measured(cfg.out_dir, cfg.pool_dirs, measured_config(cfg, NOT_MEASURED), "offline_rl",
                                      ("source.world.seed",), MEASURE_FACTS, RECORDS)
    seeds = sorted(by_seed)
    facts = next(iter(facts_by.values()))
    rec = Record("offline_rl", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    judge = facts["judge"]
    curves = _curves(by_seed, cfg)
    data_ci: dict[str, list] = {}
    for arm in cfg.arms:
        row = []
        for it in range(1, cfg.iterations + 1):
            recs = [find_record(by_seed[s], "data", arm.tag, it) for s in seeds]
            per = [r.get("gold", r["proxy"]) for r in recs]
            row.append(pooled_ci(per, cfg.n_boot, f"data:{arm.tag}@{it}"))
        data_ci[arm.tag] = row
    _report(rec, cfg, curves, data_ci, facts_by, judge)
    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints and facts["world"] is not None:
        verdicts = report_protocol(rec, proto, by_seed, endpoint_units, facts_by, MEASURE_FACTS)
    elif proto.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the world's gold reward "
                         "(source.kind: world).")
    rec.results.update(judge=judge, env=facts["env"], world_seeds=seeds, metrics=_metric_names(cfg),
                       curves=curves, data_selected=data_ci, protocol=verdicts,
                       arms={str(s): f["arms"] for s, f in facts_by.items()},
                       setup=facts["setup"], start_seconds={str(s): f["start_seconds"] for s, f in facts_by.items()})
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study; returns the result record (also written to out_dir)."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)


def _fmt(ev: dict[str, list[float]]) -> str:
    return ", ".join(f"{k} {np.mean(v):.3f}" for k, v in ev.items())


def _ci(c: Sequence[float]) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def _report(rec: Record, cfg: Config, curves: dict[str, dict[str, list]], data_ci: dict[str, list],
            facts_by: dict[int, dict[str, Any]], judge: str) -> None:
    """One table per metric (arms x iterations), a data table, the curves and the notes."""
    names = _metric_names(cfg)
    short = judge.split(" (")[0]
    seeds = sorted(facts_by)
    where = f"world seeds {seeds}, " if len(seeds) > 1 else ""
    titles = {"greedy": f"greedy response, mean {short}", "sampled": f"mean {short} of {cfg.eval.samples} samples",
              f"prs_bo{cfg.eval.prs_n}": f"PRS best-of-{cfg.eval.prs_n} (proxy selection), {short} of the selected"}
    its = list(range(cfg.iterations + 1))
    labels = {a.tag: a.label for a in cfg.arms}
    prompts = sum(f["setup"]["heldout_prompts"] for f in facts_by.values())
    for m in names:
        rec.table(f"Held-out {titles[m]} ({where}{prompts} prompts; 95% CI) by iteration",
                  ["arm"] + [f"iter {i}" for i in its],
                  [[labels[tag]] + [_ci(c) for c in row] for tag, row in curves[m].items()])
    data_rows = []
    for a in cfg.arms:
        for k, it in enumerate(range(1, cfg.iterations + 1)):
            per = [next(x for x in f["arms"][a.tag]["iterations"] if x["iteration"] == it) for f in facts_by.values()]
            data_rows.append([a.label, it, sum(d["data"]["rows"] for d in per),
                              sum(d["data"]["improving_pairs"] for d in per),
                              float(np.mean([d["data"]["selected_proxy_mean"] for d in per])), _ci(data_ci[a.tag][k]),
                              f"{sum(sum(d['seconds'].values()) for d in per):.0f}"])
    rec.table(f"Training data per iteration (selected by the proxy RM; {where}rows summed over seeds)",
              ["arm", "iter", "rows", "improving pairs", "selected proxy reward", f"selected {short} (95% CI)",
               "seconds"], data_rows)

    def draw(fig):
        axes = fig.subplots(1, len(names), squeeze=False)[0]
        for ax, m in zip(axes, names):
            for tag, row in curves[m].items():
                mean = np.array([c[0] for c in row])
                err = [mean - [c[1] for c in row], [c[2] for c in row] - mean]
                style = "-" if tag.startswith("prs") else "--"
                ax.errorbar(its, mean, yerr=err, marker="o", capsize=3, linestyle=style, label=labels[tag])
            ax.set_title(titles[m], fontsize=9)
            ax.set_xlabel("iteration")
            ax.set_xticks(its)
            ax.set_ylabel(f"held-out {short} (95% CI)")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    rec.figure("offline_rl.png", draw, figsize=(5.5 * len(names), 4.2))
    sc = cfg.sample
    rec.notes += [
        (f"Each iteration: {sc.prompts} training prompts, budget N={sc.n} per prompt from the current policy "
         f"(temperature {sc.sampling.temperature:g}), selection by the proxy reward model; training from the previous "
         f"iteration's policy: SFT {cfg.sft_steps} steps ({cfg.sft_optim.name} lr {cfg.sft_optim.lr:g}) or DPO "
         f"{cfg.dpo_steps} steps ({cfg.dpo_loss}, beta {cfg.beta:g}, {cfg.dpo_optim.name} lr {cfg.dpo_optim.lr:g}, "
         f"reference = the previous policy), batch {cfg.trainer.batch_size}."),
        ("Rand samples see x only; every arm's training rows use the evaluation input (x and z), so Rand's data "
         "are responses written without the preference, chosen by an RM that sees it."),
        (f"Evaluation on {cfg.eval.prompts} held-out prompts per world seed judged by the {judge}; iteration 0 is "
         "the starting policy; arms with the same sampler share iteration 1's samples (same starting policy and "
         "seed); every policy is evaluated with the same engine seed (common random numbers)."),
    ]
