"""Sr-DPO / Sr-IPO vs DPO / IPO (Yu et al., arXiv 2405.21040): the lambda sweep, the paper's pair metrics,
gold-reward win rates, margin-vs-quality correlation and the training-time overhead.

Pipeline (every stage is a plain call of the library):
  1. preference pairs: the starting (SFT) policy samples `pairs.samples` responses per prompt for (x, z); the
     pair is the best vs the worst response by the ranker (`pairs.ranker`: the world's gold reward, or the
     proxy reward model; ties are skipped). Training pairs come from training prompts, evaluation pairs from
     held-out prompts. With `source.kind: real` the ranker is the reward model, or existing pairs are read from
     `pairs.train_file` (e.g. UltraFeedback binarized, the paper's setting).
  2. one `prs_jax.train.run.run_train("dpo", ...)` per entry of `runs` (loss sigmoid | ipo | sr_dpo | sr_ipo,
     lambda), all from the same SFT policy, same data order and seed, reference log-probs precomputed, the
     Sr-* prompt augmentation p = the world's QUALITY_INSTRUCTION (the text its policy was trained on).
  3. per run, on the held-out pairs: average marginal (mean h), accuracy (h > 0), prompt-augmented accuracy
     (h on p (+) x > 0) and the Pearson / Spearman correlation of the implicit reward margin beta * h with the
     gold reward difference; gold-reward win rate of the trained policy vs the SFT policy (`eval.win_samples`
     sampled responses per held-out prompt from each, paired by sample index and engine seed; ties count
     one half).
  4. training-time overhead: optimizer steps of DPO, IPO, Sr-DPO and Sr-IPO timed in interleaved rounds on the
     same batches in the same process (seconds per step, medians).
Outputs: results.json, results.md (tables), win_rate_vs_lambda.png, margin_vs_gold.png.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from prs_jax.config import to_dict
from prs_jax.eval.stats import mean_se, win_rate
from prs_jax.experiments.common import Record, Source, param_count
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.policy_tools import (
    assistant,
    config_digest,
    pearson,
    rescore,
    run_chunked,
    spearman,
    user_turn,
)
from prs_jax.train.trainer import OptimConfig, TrainerConfig
from prs_jax.tree.sampling import SamplingParams

LossName = Literal["sigmoid", "ipo", "sr_dpo", "sr_ipo"]
BASE_OF = {"sr_dpo": "sigmoid", "sr_ipo": "ipo", "sigmoid": "sigmoid", "ipo": "ipo"}
LABEL = {"sigmoid": "DPO", "ipo": "IPO", "sr_dpo": "Sr-DPO", "sr_ipo": "Sr-IPO"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: the loss and (Sr-* only) lambda."""

    loss: LossName = "sigmoid"
    lam: float = 0.0

    @property
    def tag(self) -> str:
        return self.loss if self.loss in ("sigmoid", "ipo") else f"{self.loss}-lam{self.lam:g}"

    @property
    def label(self) -> str:
        return LABEL[self.loss] + ("" if self.loss in ("sigmoid", "ipo") else f" λ={self.lam:g}")


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """How the preference pairs are made."""

    train_prompts: int = 256
    eval_prompts: int = 64  # held-out prompts that give the evaluation pairs
    samples: int = 8  # responses per prompt; the pair is best vs worst by the ranker
    ranker: Literal["gold", "proxy"] = "gold"
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)  # temperature 1 by default
    max_new_tokens: int = 48
    chunk: int = 32  # prompts per engine call
    train_file: str = ""  # real only: existing pairs (TRL columns) instead of sampling
    eval_file: str = ""  # real only: existing held-out pairs (optional score_chosen / score_rejected columns)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Win rate of the trained policy vs the starting policy on held-out prompts."""

    prompts: int = 200
    win_samples: int = 1  # responses per prompt and policy (paired by index)
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    max_new_tokens: int = 48
    chunk: int = 32
    pair_batch_size: int = 32  # batch of the log-prob passes over the held-out pairs


@dataclasses.dataclass(frozen=True)
class Config:
    """The Sr-DPO study (see the module docstring); unknown keys are errors."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/sr_dpo"
    work_dir: str = "runs/experiments/sr_dpo/work"  # pairs, checkpoints, reference caches
    seed: int = 0
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    runs: tuple[RunSpec, ...] = (RunSpec("sigmoid"), RunSpec("ipo"), RunSpec("sr_dpo", 0.1), RunSpec("sr_dpo", 0.3),
                                 RunSpec("sr_dpo", 0.5), RunSpec("sr_dpo", 1.0), RunSpec("sr_ipo", 0.5))
    beta: float = 0.1
    ipo_normalize: Literal["sum", "mean"] = "sum"
    prompt_prefix: str = ""  # "" = the source's quality instruction (the world's QUALITY_INSTRUCTION)
    placement: Literal["user_turn_start", "system", "raw_prefix"] = "user_turn_start"
    max_length: int = 192
    max_prompt_length: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    logprob_method: Literal["plain", "chunked", "pallas"] = "chunked"
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(name="rmsprop", lr=1e-4, warmup_steps=5))
    trainer: TrainerConfig = dataclasses.field(
        default_factory=lambda: TrainerConfig(steps=100, batch_size=16, log_every=10, async_checkpoint=False,
                                              tensorboard=False))
    timing_steps: int = 10  # timed optimizer steps per loss (0: no overhead measurement)
    timing_warmup: int = 2
    eval_prompt_set: str = ""  # real only: a separate held-out prompt set (load_prompt_set name) ...
    eval_prompts_path: str = ""  # ... and its file; default: the tail of the training prompt set


# ------------------------------------------------------------------------------------------------ pairs
def _sample_pairs(env: StudyEnv, cfg: Config, items, model, rm_scorer, seed: int, desc: str
                  ) -> list[dict[str, Any]]:
    """Best-vs-worst pairs from `samples` policy responses per prompt (conversational rows + gold/proxy)."""
    from prs_jax.strategies.generate import StrategyConfig

    pc = cfg.pairs
    strategy = StrategyConfig.of("prand", pc.samples, pc.sampling, max_new_tokens=pc.max_new_tokens).build()
    scorer = rm_scorer if pc.ranker == "proxy" else env.gold_scorer()
    results = run_chunked(env, strategy, items, model, scorer, seed, pc.chunk, desc)
    other = rescore(results, rm_scorer if pc.ranker == "gold" else (env.gold_scorer() or rm_scorer))
    rows = []
    for r, alt in zip(results, other):
        rank = [c.reward for c in r.candidates]
        gold = rank if pc.ranker == "gold" else (alt if env.gold is not None else None)
        proxy = alt if pc.ranker == "gold" else rank
        ok = [j for j, c in enumerate(r.candidates) if c.text.strip()]  # never an empty response in a pair
        if len(ok) < 2:
            continue
        b = ok[int(np.argmax([rank[j] for j in ok]))]
        w = ok[int(np.argmin([rank[j] for j in ok]))]
        if rank[b] == rank[w]:
            continue
        row = {"id": r.item.id, "prompt": user_turn(r.item), "chosen": assistant(r.candidates[b].text),
               "rejected": assistant(r.candidates[w].text), "proxy_chosen": proxy[b], "proxy_rejected": proxy[w]}
        if gold is not None:
            row.update(gold_chosen=gold[b], gold_rejected=gold[w])
        rows.append(row)
    return rows


def trl_pair(row: dict[str, Any]) -> dict[str, Any]:
    """A pair row from a file in the columns the trainer reads (plus judge scores when present). A string prompt
    next to full conversations in chosen / rejected (UltraFeedback binarized) becomes an implicit prompt."""
    out = {k: row[k] for k in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected") if k in row}
    if isinstance(out.get("prompt"), str) and isinstance(out.get("chosen"), list):
        del out["prompt"]
    return out


def _judge_diff(row: dict[str, Any]) -> float | None:
    """The external quality difference of a pair: gold (world), else the file's judge scores, else the RM."""
    for a, b in (("gold_chosen", "gold_rejected"), ("score_chosen", "score_rejected"),
                 ("proxy_chosen", "proxy_rejected")):
        if a in row and b in row and row[a] is not None and row[b] is not None:
            return float(row[a]) - float(row[b])
    return None


# ------------------------------------------------------------------------------------------------ log-probs
def _pair_arrays(rows, tok, cfg: Config, prefix: str):
    """The pairs (x and p (+) x views) as one host PairBatch, packed: [prompt | chosen | rejected] per row."""
    from prs_jax.data.batching import pad_id_of
    from prs_jax.data.pairs import collate_pairs, tokenize_pairs

    examples, _ = tokenize_pairs(rows, tok, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                 prompt_prefix=prefix, placement=cfg.placement)
    return collate_pairs(examples, cfg.max_length, pad_id_of(tok))


def _logps(model, data, cfg: Config) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen / rejected on x and on p (+) x (keys ref_chosen, ..., ref_rejected_aug), in
    fixed-size batches (the last one padded with repeats), through the reference cache's shared program."""
    from prs_jax.train.logprobs import LogProbConfig
    from prs_jax.train.reference import compute_reference

    return compute_reference(model, data, batch_size=cfg.eval.pair_batch_size, augmented=True,
                             config=LogProbConfig(method=cfg.logprob_method), progress=False)


def log_ratio_margins(pol: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair log-ratio margins h on x and h_aug on p (+) x (summed log-probs, the paper's convention)."""
    h = (pol["ref_chosen"] - ref["ref_chosen"]) - (pol["ref_rejected"] - ref["ref_rejected"])
    h_aug = (pol["ref_chosen_aug"] - ref["ref_chosen_aug"]) - (pol["ref_rejected_aug"] - ref["ref_rejected_aug"])
    return np.asarray(h, np.float64), np.asarray(h_aug, np.float64)


def pair_metrics(h: np.ndarray, h_aug: np.ndarray, beta: float, judge_diff: np.ndarray | None) -> dict[str, Any]:
    """The paper's metrics on pairs: average marginal, accuracy, prompt-augmented accuracy and the correlation
    of the implicit reward margin beta * h with an external quality difference (pure function)."""
    out: dict[str, Any] = {"average_marginal": float(h.mean()), "accuracy": float((h > 0).mean()),
                           "prompt_augmented_marginal": float(h_aug.mean()),
                           "prompt_augmented_accuracy": float((h_aug > 0).mean()), "pairs": int(h.size)}
    if judge_diff is not None:
        out["pearson"] = pearson(beta * h, judge_diff)
        out["spearman"] = spearman(beta * h, judge_diff)
    return out


def head_to_head(a: list[float], b: list[float]) -> dict[str, float]:
    """Win / tie / lose shares of a over b (paired) and the win rate with ties counted one half (pure)."""
    w = win_rate(a, b)
    win, tie, lose = w.shares()
    return {"win": win, "tie": tie, "lose": lose, "win_rate": w.win_rate, "win_rate_se": w.se}


# ------------------------------------------------------------------------------------------------ timing
def time_losses(policy: Path, tok, rows, cfg: Config, prefix: str, work: Path) -> dict[str, dict[str, float]]:
    """Seconds per optimizer step of each base loss and its Sr-* form, interleaved round by round on the same
    batches (reference log-probs are zeros: their values do not change the cost of a step)."""
    from prs_jax.models import load_causal_lm
    from prs_jax.train.logprobs import LogProbConfig
    from prs_jax.train.objectives import PreferenceLoss
    from prs_jax.train.trainer import ArraySource, Trainer, data_order

    data = _pair_arrays(rows, tok, cfg, prefix)
    n = data.x.tokens.shape[0]  # packed layout (_pair_arrays)
    zeros = np.zeros(n, np.float32)

    names = sorted({r.loss for r in cfg.runs} | {BASE_OF[r.loss] for r in cfg.runs},
                   key=["sigmoid", "ipo", "sr_dpo", "sr_ipo"].index)
    trainers, sources = {}, {}
    for name in names:
        loss = PreferenceLoss(name, cfg.beta, 0.5, 0.1, cfg.ipo_normalize, LogProbConfig(method=cfg.logprob_method))
        aug = dict(aug=data.aug, ref_chosen_aug=zeros, ref_rejected_aug=zeros) if loss.augmented else dict(aug=None)
        sources[name] = ArraySource(dataclasses.replace(data, ref_chosen=zeros, ref_rejected=zeros, **aug))
        out = work / "timing" / name
        shutil.rmtree(out, ignore_errors=True)
        tcfg = dataclasses.replace(cfg.trainer, out_dir=str(out), steps=10 ** 6, save_every=0, eval_every=0,
                                   log_every=10 ** 6, tensorboard=False, progress=False, group_by_length=0)
        trainers[name] = Trainer(load_causal_lm(policy, dtype=cfg.dtype), loss, tcfg, cfg.optim)
        trainers[name].start()
    times: dict[str, list[float]] = {k: [] for k in names}
    try:
        for step in range(cfg.timing_warmup + cfg.timing_steps):
            idx = data_order(n, cfg.seed, step, cfg.trainer.batch_size)
            order = names[step % len(names):] + names[:step % len(names)]  # rotate who goes first
            for name in order:
                batch, static = sources[name].collate(idx)
                t0 = time.perf_counter()
                trainers[name].train_on(batch, static)
                if step >= cfg.timing_warmup:
                    times[name].append(time.perf_counter() - t0)
    finally:
        for t in trainers.values():
            t.close()
    out_t = {}
    for name in names:
        med = float(np.median(times[name]))
        base = float(np.median(times[BASE_OF[name]]))
        out_t[name] = {"seconds_per_step": med, "ratio_to_base": med / base, "steps": len(times[name]),
                       "min": float(np.min(times[name])), "max": float(np.max(times[name]))}
    return out_t


# ------------------------------------------------------------------------------------------------ study
def _win_samples(env: StudyEnv, cfg: Config, items, model, judge) -> list[list[float]]:
    """`win_samples` responses per held-out prompt, judged; the engine seed is shared by every policy, so the
    comparison uses common random numbers."""
    from prs_jax.strategies.generate import StrategyConfig

    ec = cfg.eval
    strategy = StrategyConfig.of("prand", ec.win_samples, ec.sampling, max_new_tokens=ec.max_new_tokens).build()
    results = run_chunked(env, strategy, items, model, judge, cfg.seed + 7, ec.chunk, "win-rate samples")
    return [[float(c.reward) for c in r.candidates] for r in results]


def validate(cfg: Config) -> None:
    """Config errors that would otherwise surface only after sampling or training has started."""
    if not cfg.runs:
        raise ValueError("sr_dpo: `runs` is empty; list at least one {loss, lam}.")
    if cfg.source.kind == "real" and cfg.pairs.ranker == "gold":
        raise ValueError("sr_dpo: pairs.ranker 'gold' needs the synthetic world; real checkpoints have no gold "
                         "reward. Set pairs.ranker=proxy (the reward model ranks the samples).")
    if cfg.source.kind == "world" and cfg.pairs.train_file:
        raise ValueError("sr_dpo: pairs.train_file is for real checkpoints; the world samples its own pairs.")


def run(cfg: Config, console: Any = None, reward_model: str | Path | None = None) -> dict[str, Any]:
    """Run the study; returns the result record (also written to out_dir). `reward_model` replaces the source's
    reward model (the scaling study keeps one RM fixed across policy sizes)."""
    from rich.console import Console

    from prs_jax.data.io import iter_rows, write_jsonl
    from prs_jax.models import load_causal_lm
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train

    console = console or Console()
    validate(cfg)
    rec = Record("sr_dpo", cfg, cfg.out_dir, cfg.seed)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env = StudyEnv.from_source(cfg.source, console, study="sr_dpo", reward_model=reward_model,
                               require=("policy", "prompts_path") + (("reward_model",) if reward_model is None else ()))
    train_items, heldout_items = env.split(cfg.pairs.train_prompts, max(cfg.pairs.eval_prompts, cfg.eval.prompts),
                                           cfg.eval_prompt_set, cfg.eval_prompts_path)
    prefix = cfg.prompt_prefix or env.quality_instruction
    tok = env.tokenizer
    sft = env.model
    rm = env.proxy
    judge = env.gold_scorer() or rm
    judge_name = "gold reward" if env.gold is not None else "reward model (no gold reward on real checkpoints)"
    timings: dict[str, float] = {}

    # 1. pairs
    t0 = time.perf_counter()
    if cfg.pairs.train_file:
        train_rows = [trl_pair(r) for r in iter_rows(cfg.pairs.train_file)]
        train_file = write_jsonl(work / "pairs_train.jsonl", train_rows)
    else:
        train_rows = _sample_pairs(env, cfg, train_items, sft, rm, cfg.seed, "train pairs")
        train_file = write_jsonl(work / "pairs_train.jsonl", train_rows)
    if cfg.pairs.eval_file:
        eval_rows = [trl_pair(r) for r in iter_rows(cfg.pairs.eval_file)]
    else:
        eval_rows = _sample_pairs(env, cfg, heldout_items[:cfg.pairs.eval_prompts], sft, rm,
                                  cfg.seed + 1, "eval pairs")
    eval_file = write_jsonl(work / "pairs_eval.jsonl", eval_rows)
    timings["pairs_s"] = time.perf_counter() - t0
    diffs = [_judge_diff(r) for r in eval_rows]
    judge_diff = np.array(diffs, float) if all(d is not None for d in diffs) else None
    pair_info: dict[str, Any] = {"ranker": cfg.pairs.ranker if not cfg.pairs.train_file else "file",
                                 "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
                                 "train_file": str(train_file), "eval_file": str(eval_file)}
    if env.gold is not None:
        for name, rows in (("train", train_rows), ("eval", eval_rows)):
            g = np.array([r["gold_chosen"] - r["gold_rejected"] for r in rows])
            pair_info[f"{name}_gold_diff_mean"] = float(g.mean())
            pair_info[f"{name}_label_agrees_with_gold"] = float((g > 0).mean())
    console.print(f"sr_dpo: {len(train_rows)} training / {len(eval_rows)} held-out pairs (ranker "
                  f"{pair_info['ranker']}), p = {prefix!r}", markup=False)

    # reference log-probs on the held-out pairs and the starting policy's win-rate samples (once)
    t0 = time.perf_counter()
    eval_arrays = _pair_arrays(eval_rows, tok, cfg, prefix)
    ref_logps = _logps(sft, eval_arrays, cfg)
    win_items = heldout_items[:cfg.eval.prompts]
    sft_scores = _win_samples(env, cfg, win_items, sft, judge)
    timings["reference_eval_s"] = time.perf_counter() - t0
    sft_flat = [s for ss in sft_scores for s in ss]
    start_metrics = pair_metrics(*log_ratio_margins(ref_logps, ref_logps), cfg.beta, None)
    results_runs: dict[str, dict[str, Any]] = {}
    run_scores: dict[str, list[float]] = {}

    # 2-3. training runs and their evaluation
    for spec in cfg.runs:
        t0 = time.perf_counter()
        data = DataConfig(train=str(train_file), eval=str(eval_file), max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length, pad_multiple=32)
        loss = LossConfig(name=spec.loss, beta=cfg.beta, lam=spec.lam, ipo_normalize=cfg.ipo_normalize,
                          prompt_prefix=prefix, placement=cfg.placement)
        base = TrainRunConfig(model=str(env.policy), dtype=cfg.dtype, data=data, loss=loss, optim=cfg.optim,
                              trainer=dataclasses.replace(cfg.trainer, seed=cfg.seed, eval_every=0),
                              precompute_ref=True, ref_cache_dir=str(work / "ref_cache"),
                              logprob_method=cfg.logprob_method)
        # the run directory is keyed by the run's config and data, so a rerun resumes only identical runs
        run_dir = work / "runs" / f"{spec.tag}-{config_digest(to_dict(base), train_file, eval_file)}"
        tcfg = dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, out_dir=str(run_dir)),
                                   export_dir=str(run_dir / "policy"))
        console.print(f"\n== {spec.label}: {cfg.trainer.steps} steps -> {run_dir}", markup=False)
        trainer_eval = run_train("dpo", tcfg, console=console)
        train_s = time.perf_counter() - t0
        policy = load_causal_lm(run_dir / "policy", dtype=cfg.dtype)
        h, h_aug = log_ratio_margins(_logps(policy, eval_arrays, cfg), ref_logps)
        metrics = pair_metrics(h, h_aug, cfg.beta, judge_diff)
        scores = _win_samples(env, cfg, win_items, policy, judge)
        flat = [s for ss in scores for s in ss]
        w = win_rate(flat, sft_flat)
        wr, wr_se = w.win_rate, w.se
        run_scores[spec.tag] = flat
        per_prompt = [float(np.mean(s)) for s in scores]
        g, g_se = mean_se(per_prompt)
        results_runs[spec.tag] = {"loss": spec.loss, "lam": spec.lam, "label": spec.label, "win_rate": wr,
                                  "win_rate_se": wr_se, "judge_mean": g, "judge_mean_se": g_se,
                                  "judge_per_prompt": per_prompt, **metrics,
                                  "trainer_eval": trainer_eval, "train_wall_s": train_s,
                                  "eval_wall_s": time.perf_counter() - t0 - train_s, "run_dir": str(run_dir),
                                  "margins_beta_h": (cfg.beta * h).tolist()}
        console.print(f"{spec.label}: win rate vs SFT {wr:.3f} ± {wr_se:.3f}, {judge_name} {g:.3f}, held-out "
                      f"accuracy {metrics['accuracy']:.3f}, prompt-augmented {metrics['prompt_augmented_accuracy']:.3f}"
                      f", pearson {metrics.get('pearson', float('nan')):.3f}", markup=False)
        del policy

    # Sr-* vs its base loss head to head (the paper's Sr-DPO vs DPO comparison), same prompts and engine seed
    for tag, r in results_runs.items():
        base = next((t for t, b in results_runs.items() if b["loss"] == BASE_OF[r["loss"]]), None)
        if r["loss"] in ("sr_dpo", "sr_ipo") and base is not None:
            r["vs_base"] = {"base": results_runs[base]["label"], **head_to_head(run_scores[tag], run_scores[base])}

    # 4. overhead
    overhead: dict[str, Any] = {}
    if cfg.timing_steps > 0:
        t0 = time.perf_counter()
        k = cfg.trainer.batch_size * (cfg.timing_warmup + cfg.timing_steps)
        overhead = time_losses(env.policy, tok, train_rows[:k], cfg, prefix, work)
        timings["timing_s"] = time.perf_counter() - t0

    sft_per_prompt = [float(np.mean(s)) for s in sft_scores]
    sft_mean, sft_se = mean_se(sft_per_prompt)
    rec.results.update(
        judge=judge_name, prompt_prefix=prefix, env=env.info, reward_model=str(env.reward_model),
        policy_parameters=param_count(sft), pairs=pair_info,
        starting_policy={"judge_mean": sft_mean, "judge_mean_se": sft_se, "judge_per_prompt": sft_per_prompt,
                         **start_metrics},
        runs=results_runs, overhead=overhead, timings=timings,
        win_rate_setup={"prompts": len(win_items), "samples_per_prompt": cfg.eval.win_samples,
                        "sampling": to_dict(cfg.eval.sampling)})
    _report(rec, cfg, results_runs, overhead, judge_name, pair_info, sft_mean, sft_se, judge_diff is not None)
    return rec.finish(console)


def _report(rec: Record, cfg: Config, runs: dict[str, dict[str, Any]], overhead: dict[str, Any], judge: str,
            pair_info: dict[str, Any], sft_mean: float, sft_se: float, has_corr: bool) -> None:
    """Tables, plots and notes."""
    headers = ["run", "win rate vs SFT", f"mean {judge.split(' (')[0]}", "avg marginal", "accuracy",
               "prompt-aug. accuracy"] + (["Pearson", "Spearman"] if has_corr else []) + ["train s"]
    rows = [["SFT (start)", "-", f"{sft_mean:.3f} ± {sft_se:.3f}", 0.0, "-", "-"]
            + (["-", "-"] if has_corr else []) + ["-"]]
    for r in runs.values():
        rows.append([r["label"], f"{r['win_rate']:.3f} ± {r['win_rate_se']:.3f}",
                     f"{r['judge_mean']:.3f} ± {r['judge_mean_se']:.3f}", r["average_marginal"], r["accuracy"],
                     r["prompt_augmented_accuracy"]]
                    + ([r.get("pearson", float("nan")), r.get("spearman", float("nan"))] if has_corr else [])
                    + [f"{r['train_wall_s']:.0f}"])
    rec.table(f"Held-out metrics ({pair_info['eval_pairs']} held-out pairs; win rate judged by the {judge})",
              headers, rows)
    h2h = [r for r in runs.values() if "vs_base" in r]
    if h2h:
        rec.table(f"Head to head: Sr-* vs its base loss (same held-out prompts and sampling seed, {judge})",
                  ["run", "vs", "win", "tie", "lose", "win rate (ties ½)"],
                  [[r["label"], r["vs_base"]["base"], r["vs_base"]["win"], r["vs_base"]["tie"], r["vs_base"]["lose"],
                    f"{r['vs_base']['win_rate']:.3f} ± {r['vs_base']['win_rate_se']:.3f}"] for r in h2h])
    if overhead:
        rec.table("Training-time overhead (median seconds per optimizer step, interleaved, same batches)",
                  ["loss", "s / step", "ratio to its base loss", "min", "max"],
                  [[LABEL[k], v["seconds_per_step"], v["ratio_to_base"], v["min"], v["max"]]
                   for k, v in overhead.items()])

    def draw_sweep(fig):
        axes = fig.subplots(1, 2)
        for loss, base in (("sr_dpo", "sigmoid"), ("sr_ipo", "ipo")):
            pts = [(0.0, r) for r in runs.values() if r["loss"] == base]
            pts += sorted(((r["lam"], r) for r in runs.values() if r["loss"] == loss), key=lambda p: p[0])
            if not pts:
                continue
            lam = [p[0] for p in pts]
            axes[0].errorbar(lam, [p[1]["win_rate"] for p in pts], yerr=[p[1]["win_rate_se"] for p in pts],
                             marker="o", capsize=3, label=f"{LABEL[loss]} (λ=0: {LABEL[base]})")
            axes[1].plot(lam, [p[1]["accuracy"] for p in pts], marker="o", label=f"{LABEL[loss]} accuracy")
            axes[1].plot(lam, [p[1]["prompt_augmented_accuracy"] for p in pts], marker="s", linestyle="--",
                         label=f"{LABEL[loss]} prompt-aug. accuracy")
        axes[0].axhline(0.5, color="grey", lw=0.8)
        axes[0].set_ylabel(f"win rate vs SFT policy ({judge.split(' (')[0]})")
        axes[1].set_ylabel("held-out pair accuracy")
        for ax in axes:
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    rec.figure("win_rate_vs_lambda.png", draw_sweep, figsize=(11, 4))

    if has_corr:
        def wr(loss: str) -> dict[str, Any] | None:
            return max((r for r in runs.values() if r["loss"] == loss), key=lambda r: r["win_rate"], default=None)

        panels = [(b, s) for b, s in (("sigmoid", "sr_dpo"), ("ipo", "sr_ipo")) if wr(b) or wr(s)]
        eval_rows = [json.loads(line) for line in Path(pair_info["eval_file"]).read_text().splitlines() if line]
        diff = np.array([_judge_diff(r) for r in eval_rows], float)
        rec.results["scatter_runs"] = [r["label"] for b, s in panels for r in (wr(b), wr(s)) if r]

        def draw_scatter(fig):
            axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
            for ax, (b, s) in zip(axes, panels):
                for r, color in ((wr(b), "tab:blue"), (wr(s), "tab:red")):
                    if r is None:
                        continue
                    ax.scatter(diff, np.array(r["margins_beta_h"]), s=10, alpha=0.6, color=color,
                               label=f"{r['label']} (r={r.get('pearson', float('nan')):.2f})")
                ax.set_xlabel(f"{judge.split(' (')[0]} difference (chosen - rejected)")
                ax.set_ylabel("implicit reward margin β·h")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        rec.figure("margin_vs_gold.png", draw_scatter, figsize=(5 * max(len(panels), 1), 4))

    rec.notes += [
        (f"Pairs: best vs worst of {cfg.pairs.samples} samples of the starting policy per prompt, ranked by "
         f"{pair_info['ranker']}; {pair_info['train_pairs']} training pairs, {pair_info['eval_pairs']} held-out "
         "pairs."),
        (f"Every run starts from the same SFT policy with the same data order, seed, optimizer ({cfg.optim.name}, "
         f"lr {cfg.optim.lr:g}), beta {cfg.beta:g}, {cfg.trainer.steps} steps of batch {cfg.trainer.batch_size}; "
         "λ = 0 of Sr-DPO / Sr-IPO is the DPO / IPO run (the losses are identical there)."),
        (f"Win rate: {cfg.eval.win_samples} sampled response(s) per held-out prompt (temperature "
         f"{cfg.eval.sampling.temperature:g}) from the trained and the SFT policy with the same engine seed, compared by the "
         f"{judge}; ties count one half."),
    ]
