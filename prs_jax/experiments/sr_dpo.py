"""Sr-DPO / Sr-IPO vs DPO / IPO (Yu et al., arXiv 2405.21040) under label noise, with positive controls of the
self-refinement term Delta and declared endpoints (prs_jax.experiments.protocol).

Pipeline (every stage is a plain call of the library):
  1. pairs: the starting (SFT) policy samples `pairs.samples` (>= 2) responses per prompt for (x, z); the pair is
     its first two non-empty responses (a random two-sample pair, not best vs worst). The label comes from a
     Bradley-Terry model on the gold reward (`pairs.ranker: proxy`: on the proxy RM), P(a > b) =
     sigmoid((r_a - r_b) / bt_temperature) (temperature 0: the better response; exact ties are skipped), then
     flipped with probability f for every f in `pairs.flip_rates`. Each f is its own training pair set; the
     draws come from a generator seeded by (seed, prompt id), so they never depend on order, and the flips are
     nested (a pair flipped at 0.2 is flipped at 0.35: common random numbers across f). Every pair records its
     gold gap (chosen - rejected, after labelling) and whether its label was flipped. Held-out pairs (held-out
     prompts, clean labels) give the paper's pair metrics.
  2. one `prs_jax.train.run.run_train("dpo", ...)` per (run, flip rate): loss sigmoid | ipo | sr_dpo | sr_ipo, lambda,
     Delta's reference (`delta_reference`: "augmented" = pi_ref(.|p (+) x), the paper's; "plain" = pi_ref(.|x),
     the ablation) and Sr-IPO's Delta units (`ipo_delta_units`: "reward", the paper's; "log_ratio", ablation).
     Each run trains to `mid_step`, exports the mid-training policy, then resumes (exactly: constant schedule,
     same data order) to the end.
  3. mid-training controls on the training pairs (policy at `mid_step`, public log-prob API
     prs_jax.train.reference.compute_reference): beta*h, the paper's Delta = beta*([pi - ref](y+|p+x) - [pi - ref]
     (y-|p+x)) and the ablation Delta_x (reference on x) per pair; the partial correlation of Delta with the
     gold gap given beta*h, and the share of flipped pairs with Delta < 0.
  4. final policies: held-out pair metrics and gold-reward samples (`eval.win_samples` per held-out prompt, one
     engine seed for every policy: common random numbers); training-time overhead of each loss.
`measure_study` writes the raw records (OUT/records.jsonl: one row per training pair and run, per held-out pair
and run, per win-rate prompt and policy) and OUT/measure.json; `report_study` remakes every table, the controls
and the protocol's verdicts from them, per world seed and pooled over `pool_dirs` (one OUT per world seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from prs_jax.config import to_dict
from prs_jax.eval.stats import mean_se, win_rate
from prs_jax.experiments.common import Record, Source, measured_config, param_count, pool_measured
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
from prs_jax.experiments.protocol import Protocol, report_protocol
from prs_jax.train.trainer import OptimConfig, TrainerConfig
from prs_jax.tree.sampling import SamplingParams

LossName = Literal["sigmoid", "ipo", "sr_dpo", "sr_ipo"]
BASE_OF = {"sr_dpo": "sigmoid", "sr_ipo": "ipo", "sigmoid": "sigmoid", "ipo": "ipo"}
LABEL = {"sigmoid": "DPO", "ipo": "IPO", "sr_dpo": "Sr-DPO", "sr_ipo": "Sr-IPO"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: the loss, (Sr-* only) lambda and the Delta variant, and the flip rates it runs at."""

    loss: LossName = "sigmoid"
    lam: float = 0.0
    delta_reference: Literal["augmented", "plain"] = "augmented"  # "plain": the reference-on-x ablation
    ipo_delta_units: Literal["reward", "log_ratio"] = "reward"  # Sr-IPO: "log_ratio" is the ablation
    flips: tuple[float, ...] = ()  # flip rates this run trains at; () = every pairs.flip_rates

    @property
    def tag(self) -> str:
        if self.loss in ("sigmoid", "ipo"):
            return self.loss
        return (f"{self.loss}-lam{self.lam:g}" + ("-refx" if self.delta_reference == "plain" else "")
                + ("-logratio" if self.loss == "sr_ipo" and self.ipo_delta_units == "log_ratio" else ""))

    @property
    def label(self) -> str:
        if self.loss in ("sigmoid", "ipo"):
            return LABEL[self.loss]
        return (LABEL[self.loss] + f" λ={self.lam:g}"
                + (" [ablation: Δ ref on x]" if self.delta_reference == "plain" else "")
                + (" [ablation: Δ/β units]" if self.loss == "sr_ipo" and self.ipo_delta_units == "log_ratio" else ""))


def run_key(tag: str, flip: float) -> str:
    """The name of one trained policy in the records and the protocol's endpoint names: TAG@FLIP."""
    return f"{tag}@{flip:g}"


@dataclasses.dataclass(frozen=True)
class PairsConfig:
    """How the preference pairs are made and labelled."""

    train_prompts: int = 1024  # one pair per prompt
    eval_prompts: int = 64  # held-out prompts that give the held-out (clean-label) pairs
    samples: int = 2  # responses per prompt; the pair is the first two non-empty ones
    ranker: Literal["gold", "proxy"] = "gold"  # the reward the Bradley-Terry labels come from
    flip_rates: tuple[float, ...] = (0.0, 0.2, 0.35)
    bt_temperature: float = 0.0  # 0: the better response is the clean label (the Bradley-Terry limit)
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)  # temperature 1 by default
    max_new_tokens: int = 48
    chunk: int = 32  # prompts per engine call
    train_file: str = ""  # real only: existing pairs (TRL columns) instead of sampling
    eval_file: str = ""  # real only: existing held-out pairs (optional score_chosen / score_rejected columns)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Gold reward of each trained policy's samples on held-out prompts (win rates are paired by prompt)."""

    prompts: int = 200
    win_samples: int = 1  # responses per prompt and policy (paired by index)
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    max_new_tokens: int = 48
    chunk: int = 32
    pair_batch_size: int = 32  # batch of the log-prob passes over pairs


@dataclasses.dataclass(frozen=True)
class Config:
    """The Sr-DPO study (see the module docstring); unknown keys are errors."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/sr_dpo"
    work_dir: str = "runs/experiments/sr_dpo/work"  # pairs, checkpoints, reference caches
    seed: int = 0
    pairs: PairsConfig = dataclasses.field(default_factory=PairsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    runs: tuple[RunSpec, ...] = (RunSpec("sigmoid"), RunSpec("sr_dpo", 0.5))
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
    mid_step: int = 0  # the mid-training checkpoint of the controls; 0 = trainer.steps // 2
    timing_steps: int = 10  # timed optimizer steps per loss (0: no overhead measurement)
    timing_warmup: int = 2
    eval_prompt_set: str = ""  # real only: a separate held-out prompt set (load_prompt_set name) ...
    eval_prompts_path: str = ""  # ... and its file; default: the tail of the training prompt set
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir

    @property
    def mid(self) -> int:
        return self.mid_step or max(self.trainer.steps // 2, 1)

    def plan(self) -> list[tuple[RunSpec, float]]:
        """Every (run, flip rate) to train, in order."""
        return [(r, f) for f in self.pairs.flip_rates for r in self.runs if not r.flips or f in r.flips]


# ------------------------------------------------------------------------------------------------ pairs
def stable_key(prompt_id: Any) -> int:
    """A 64-bit integer of a prompt id, the same in every process (Python's hash() is salted)."""
    return int.from_bytes(hashlib.blake2b(str(prompt_id).encode(), digest_size=8).digest(), "little")


def pair_draws(seed: int, prompt_id: Any) -> tuple[float, float]:
    """(u_bt, u_flip): the pair's two uniform draws, from a generator keyed by (seed, prompt id) alone."""
    u = np.random.default_rng([seed, stable_key(prompt_id)]).random(2)
    return float(u[0]), float(u[1])


def bt_label(r_a: float, r_b: float, prompt_id: Any, flip_rate: float, seed: int, temperature: float = 0.0
             ) -> tuple[bool, bool] | None:
    """(a is chosen, the label was flipped) for a pair with rewards r_a, r_b: the Bradley-Terry label
    P(a > b) = sigmoid((r_a - r_b) / temperature) (temperature 0: the better one; a tie gives None), flipped when
    u_flip < flip_rate. Draws keyed by (seed, prompt id): independent of order and nested across flip rates."""
    if not 0.0 <= flip_rate < 0.5:
        raise ValueError(f"flip rate must lie in [0, 0.5), got {flip_rate}")
    u_bt, u_flip = pair_draws(seed, prompt_id)
    if temperature > 0:
        clean_a = u_bt < 1.0 / (1.0 + np.exp(-(r_a - r_b) / temperature))
    else:
        if r_a == r_b:
            return None
        clean_a = r_a > r_b
    flipped = u_flip < flip_rate
    return bool(clean_a != flipped), bool(flipped)


def _sample_two(env: StudyEnv, cfg: Config, items, model, rm_scorer, seed: int, desc: str) -> list[dict[str, Any]]:
    """Per prompt, the first two non-empty sampled responses (a, b) with their ranker / gold / proxy rewards."""
    from prs_jax.strategies.generate import StrategyConfig

    pc = cfg.pairs
    strategy = StrategyConfig.of("prand", pc.samples, pc.sampling, max_new_tokens=pc.max_new_tokens).build()
    scorer = rm_scorer if pc.ranker == "proxy" else env.gold_scorer()
    results = run_chunked(env, strategy, items, model, scorer, seed, pc.chunk, desc)
    other = rescore(results, rm_scorer if pc.ranker == "gold" else (env.gold_scorer() or rm_scorer))
    rows = []
    for r, alt in zip(results, other):
        ok = [j for j, c in enumerate(r.candidates) if c.text.strip()][:2]  # never an empty response in a pair
        if len(ok) < 2:
            continue
        rank = [float(r.candidates[j].reward) for j in ok]
        alt2 = [float(alt[j]) for j in ok]
        gold = rank if pc.ranker == "gold" else (alt2 if env.gold is not None else None)
        proxy = alt2 if pc.ranker == "gold" else rank
        rows.append({"id": r.item.id, "prompt": user_turn(r.item), "a": assistant(r.candidates[ok[0]].text),
                     "b": assistant(r.candidates[ok[1]].text), "rank": rank, "gold": gold, "proxy": proxy})
    return rows


def label_pairs(base: Sequence[dict[str, Any]], flip_rate: float, seed: int, temperature: float
                ) -> tuple[list[dict[str, Any]], int]:
    """Training rows (TRL columns plus gold_gap, flipped, flip_rate, a_chosen) of the two-sample pairs at one flip
    rate; returns (rows, pairs skipped as exact ties)."""
    rows, ties = [], 0
    for p in base:
        lab = bt_label(p["rank"][0], p["rank"][1], p["id"], flip_rate, seed, temperature)
        if lab is None:
            ties += 1
            continue
        a_chosen, flipped = lab
        c, r = (0, 1) if a_chosen else (1, 0)
        resp = (p["a"], p["b"])
        row = {"id": p["id"], "prompt": p["prompt"], "chosen": resp[c], "rejected": resp[r],
               "proxy_chosen": p["proxy"][c], "proxy_rejected": p["proxy"][r], "flipped": flipped,
               "flip_rate": flip_rate, "a_chosen": a_chosen}
        if p["gold"] is not None:
            row.update(gold_chosen=p["gold"][c], gold_rejected=p["gold"][r])
        row["gold_gap"] = _judge_diff(row)
        rows.append(row)
    return rows, ties


def trl_pair(row: dict[str, Any]) -> dict[str, Any]:
    """A pair row from a file in the columns the trainer reads (plus judge scores when present). A string prompt
    next to full conversations in chosen / rejected (UltraFeedback binarized) becomes an implicit prompt."""
    out = {k: row[k] for k in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected") if k in row}
    if isinstance(out.get("prompt"), str) and isinstance(out.get("chosen"), list):
        del out["prompt"]
    return out


def _file_base(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs read from a file as two-sample pairs (a = the file's chosen): the file's label is the clean one
    (judge scores, when given, are the reward of the gold gap)."""
    out = []
    for i, row in enumerate(rows):
        t = trl_pair(row)
        sc = (float(t["score_chosen"]), float(t["score_rejected"])) if "score_chosen" in t else None
        out.append({"id": row.get("id", row.get("prompt_id", i)), "prompt": t.get("prompt", []), "a": t["chosen"],
                    "b": t["rejected"], "rank": [1.0, 0.0], "gold": None, "proxy": list(sc) if sc else [None, None]})
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


def delta_terms(pol: dict[str, np.ndarray], ref: dict[str, np.ndarray], beta: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pair (beta * h, the paper's Delta, the ablation Delta_x) from the log-probs of compute_reference's keys:
    Delta = beta * ([pi - ref](y+|p+x) - [pi - ref](y-|p+x)) with the reference on p (+) x (the paper);
    Delta_x = beta * ([pi(y+|p+x) - ref(y+|x)] - [pi(y-|p+x) - ref(y-|x)]), the reference on x (ablation: it
    adds the reference's own response to p, so it is not 0 where the policy is the reference)."""
    h, h_aug = log_ratio_margins(pol, ref)
    h_x = ((pol["ref_chosen_aug"] - ref["ref_chosen"]) - (pol["ref_rejected_aug"] - ref["ref_rejected"]))
    return beta * h, beta * h_aug, beta * np.asarray(h_x, np.float64)


def partial_corr_units(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> np.ndarray:
    """Per-unit terms whose mean is the partial correlation of x and y given z: the products of the standardised
    (population sd) residuals of x and of y after least squares on [1, z]. Zeros when a residual is constant."""
    x, y, z = (np.asarray(v, np.float64) for v in (x, y, z))
    design = np.column_stack([np.ones_like(z), z])

    def resid(v: np.ndarray) -> np.ndarray:
        r = v - design @ np.linalg.lstsq(design, v, rcond=None)[0]
        sd = r.std()
        return r / sd if sd > 1e-12 else np.zeros_like(r)

    return resid(x) * resid(y)


def partial_corr(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """The partial correlation of x and y given z (the mean of partial_corr_units)."""
    return float(partial_corr_units(x, y, z).mean())


def flipped_delta_negative(delta: Sequence[float], flipped: Sequence[bool]) -> np.ndarray:
    """1.0 / 0.0 per flipped pair: Delta < 0 (the policy's p (+) x view prefers the label's rejected response)."""
    d, f = np.asarray(delta, np.float64), np.asarray(flipped, bool)
    return (d[f] < 0).astype(np.float64)


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


# ------------------------------------------------------------------------------------------------ measure
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
    if not cfg.pairs.flip_rates or any(not 0.0 <= f < 0.5 for f in cfg.pairs.flip_rates):
        raise ValueError(f"sr_dpo: pairs.flip_rates must list rates in [0, 0.5), got {list(cfg.pairs.flip_rates)}")
    if cfg.pairs.samples < 2:
        raise ValueError(f"sr_dpo: pairs.samples must be >= 2 (a pair is two samples), got {cfg.pairs.samples}")
    if not cfg.plan():
        raise ValueError("sr_dpo: no run trains at any of pairs.flip_rates (check runs[].flips).")
    if cfg.source.kind == "real" and cfg.pairs.ranker == "gold":
        raise ValueError("sr_dpo: pairs.ranker 'gold' needs the synthetic world; real checkpoints have no gold "
                         "reward. Set pairs.ranker=proxy (the reward model labels the pairs).")
    if cfg.source.kind == "world" and cfg.pairs.train_file:
        raise ValueError("sr_dpo: pairs.train_file is for real checkpoints; the world samples its own pairs.")
    # the mid-training policy comes from a run stopped at mid_step and resumed: the same trajectory only when
    # the learning rate at a step does not depend on the total number of steps
    if cfg.optim.schedule != "constant" or cfg.optim.warmup_steps > cfg.mid:
        raise ValueError(f"sr_dpo: the mid-training checkpoint (step {cfg.mid}) needs optim.schedule 'constant' and "
                         f"optim.warmup_steps <= mid_step (got {cfg.optim.schedule!r}, {cfg.optim.warmup_steps}).")
    if not 1 <= cfg.mid <= cfg.trainer.steps:
        raise ValueError(f"sr_dpo: mid_step {cfg.mid} must lie in [1, trainer.steps={cfg.trainer.steps}].")


def _orient(lp: dict[str, np.ndarray], rows: Sequence[dict[str, Any]], index: dict[Any, int]
            ) -> dict[str, np.ndarray]:
    """Log-probs of the canonical (a, b) pairs as (chosen, rejected) of labelled rows."""
    ii = np.array([index[r["id"]] for r in rows], int)
    a = np.array([r["a_chosen"] for r in rows], bool)
    out = {}
    for suf in ("", "_aug"):
        c, r = lp[f"ref_chosen{suf}"][ii], lp[f"ref_rejected{suf}"][ii]
        out[f"ref_chosen{suf}"], out[f"ref_rejected{suf}"] = np.where(a, c, r), np.where(a, r, c)
    return out


RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"
# config keys that do not decide the records; the protocol is applied by the report (it is recorded at measure
# time: the report says when it changed since)
NOT_MEASURED = ("out_dir", "pool_dirs", "protocol")


def _f(x: Any) -> float | None:
    return None if x is None else float(x)


def measure_study(cfg: Config, console: Any = None, reward_model: str | Path | None = None) -> Path:
    """Measure: pairs, training runs (mid-training and final policies), and the raw records (OUT/records.jsonl)
    and facts (OUT/measure.json). No tables. `reward_model` replaces the source's reward model."""
    from rich.console import Console

    from prs_jax.data.io import iter_rows, write_jsonl, write_text_atomic
    from prs_jax.models import load_causal_lm
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train

    console = console or Console()
    validate(cfg)
    out, work = Path(cfg.out_dir), Path(cfg.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = StudyEnv.from_source(cfg.source, console, study="sr_dpo", reward_model=reward_model,
                               require=("policy", "prompts_path") + (("reward_model",) if reward_model is None else ()))
    train_items, heldout_items = env.split(cfg.pairs.train_prompts, max(cfg.pairs.eval_prompts, cfg.eval.prompts),
                                           cfg.eval_prompt_set, cfg.eval_prompts_path)
    prefix = cfg.prompt_prefix or env.quality_instruction
    tok, sft, rm = env.tokenizer, env.model, env.proxy
    judge = env.gold_scorer() or rm
    pc = cfg.pairs
    timings: dict[str, float] = {}
    records: list[dict[str, Any]] = []

    # 1. pairs: canonical two-sample pairs, labelled once per flip rate
    t0 = time.perf_counter()
    base = (_file_base(list(iter_rows(pc.train_file))) if pc.train_file
            else _sample_two(env, cfg, train_items, sft, rm, cfg.seed, "train pairs"))
    if pc.eval_file:
        eval_rows = [dict(trl_pair(r), id=i) for i, r in enumerate(iter_rows(pc.eval_file))]
        for r in eval_rows:
            r["gold_gap"] = _judge_diff(r)
    else:
        eval_base = _sample_two(env, cfg, heldout_items[:pc.eval_prompts], sft, rm, cfg.seed + 1, "eval pairs")
        eval_rows, _ = label_pairs(eval_base, 0.0, cfg.seed + 1, pc.bt_temperature)
    eval_file = write_jsonl(work / "pairs_eval.jsonl", eval_rows)
    sets: dict[float, tuple[list[dict[str, Any]], Path]] = {}
    pair_info: dict[str, Any] = {"ranker": "file" if pc.train_file else pc.ranker, "sampled_pairs": len(base),
                                 "eval_pairs": len(eval_rows), "bt_temperature": pc.bt_temperature, "sets": {}}
    for f in pc.flip_rates:
        rows, ties = label_pairs(base, f, cfg.seed, pc.bt_temperature)
        sets[f] = (rows, write_jsonl(work / f"pairs_train_flip{f:g}.jsonl", rows))
        gaps = np.array([r["gold_gap"] for r in rows if r["gold_gap"] is not None], float)
        pair_info["sets"][f"{f:g}"] = {"pairs": len(rows), "ties_skipped": ties,
                                      "flipped": int(sum(r["flipped"] for r in rows)),
                                      "label_agrees_with_gold": float((gaps > 0).mean()) if gaps.size else None,
                                      "mean_abs_gold_gap": float(np.abs(gaps).mean()) if gaps.size else None}
        records += [{"kind": "pair", "flip": f, "id": r["id"], "gold_gap": _f(r["gold_gap"]), "flipped": r["flipped"]}
                    for r in rows]
    timings["pairs_s"] = time.perf_counter() - t0
    console.print(f"sr_dpo: {len(base)} two-sample training pairs, flip rates {list(pc.flip_rates)}, "
                  f"{len(eval_rows)} held-out pairs, p = {prefix!r}", markup=False)

    # reference log-probs (canonical train pairs, held-out pairs) and the SFT policy's win-rate samples, once
    t0 = time.perf_counter()
    index = {p["id"]: i for i, p in enumerate(base)}
    canon = _pair_arrays([{"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]} for p in base], tok, cfg,
                         prefix)
    ref_canon = _logps(sft, canon, cfg)
    eval_arrays = _pair_arrays(eval_rows, tok, cfg, prefix)
    ref_eval = _logps(sft, eval_arrays, cfg)
    win_items = heldout_items[:cfg.eval.prompts]
    sft_scores = _win_samples(env, cfg, win_items, sft, judge)
    records += [{"kind": "win", "run": "sft", "id": it.id, "scores": sc} for it, sc in zip(win_items, sft_scores)]
    timings["reference_eval_s"] = time.perf_counter() - t0

    # 2-4. training runs: mid-training controls, final held-out pair metrics and win-rate samples
    runs: dict[str, dict[str, Any]] = {}
    for spec, f in cfg.plan():
        key = run_key(spec.tag, f)
        rows, train_file = sets[f]
        t0 = time.perf_counter()
        data = DataConfig(train=str(train_file), eval=str(eval_file), max_length=cfg.max_length,
                          max_prompt_length=cfg.max_prompt_length, pad_multiple=32)
        loss = LossConfig(name=spec.loss, beta=cfg.beta, lam=spec.lam, ipo_normalize=cfg.ipo_normalize,
                          prompt_prefix=prefix, placement=cfg.placement, delta_reference=spec.delta_reference,
                          ipo_delta_units=spec.ipo_delta_units)
        base_cfg = TrainRunConfig(model=str(env.policy), dtype=cfg.dtype, data=data, loss=loss, optim=cfg.optim,
                                  trainer=dataclasses.replace(cfg.trainer, seed=cfg.seed, eval_every=0),
                                  precompute_ref=True, ref_cache_dir=str(work / "ref_cache"),
                                  logprob_method=cfg.logprob_method)
        # the run directory is keyed by the run's config and data, so a rerun resumes only identical runs
        run_dir = work / "runs" / f"{spec.tag}-flip{f:g}-{config_digest(to_dict(base_cfg), train_file, eval_file)}"
        mid_dir, final_dir = run_dir / "policy_mid", run_dir / "policy"
        console.print(f"\n== {spec.label} at flip rate {f:g}: {cfg.trainer.steps} steps (mid-training export at "
                      f"{cfg.mid}) -> {run_dir}", markup=False)
        if not (mid_dir / "config.json").is_file():
            run_train("dpo", dataclasses.replace(
                base_cfg, trainer=dataclasses.replace(base_cfg.trainer, out_dir=str(run_dir), steps=cfg.mid),
                export_dir=str(mid_dir)), console=console)
        trainer_eval = run_train("dpo", dataclasses.replace(
            base_cfg, trainer=dataclasses.replace(base_cfg.trainer, out_dir=str(run_dir)),
            export_dir=str(final_dir)), console=console)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if spec.loss in ("sr_dpo", "sr_ipo"):
            mid_policy = load_causal_lm(mid_dir, dtype=cfg.dtype)
            bh, d, dx = delta_terms(_orient(_logps(mid_policy, canon, cfg), rows, index),
                                    _orient(ref_canon, rows, index), cfg.beta)
            records += [{"kind": "train_pair", "run": key, "step": cfg.mid, "id": r["id"], "gold_gap": _f(r["gold_gap"]),
                         "flipped": r["flipped"], "beta_h": float(bh[i]), "delta": float(d[i]),
                         "delta_refx": float(dx[i])} for i, r in enumerate(rows)]
            del mid_policy
        policy = load_causal_lm(final_dir, dtype=cfg.dtype)
        h, h_aug = log_ratio_margins(_logps(policy, eval_arrays, cfg), ref_eval)
        records += [{"kind": "heldout_pair", "run": key, "id": r["id"], "gold_gap": _f(r.get("gold_gap")),
                     "h": float(h[i]), "h_aug": float(h_aug[i])} for i, r in enumerate(eval_rows)]
        scores = _win_samples(env, cfg, win_items, policy, judge)
        records += [{"kind": "win", "run": key, "id": it.id, "scores": sc} for it, sc in zip(win_items, scores)]
        del policy
        runs[key] = {"tag": spec.tag, "loss": spec.loss, "lam": spec.lam, "flip": f, "label": spec.label,
                     "delta_reference": spec.delta_reference, "ipo_delta_units": spec.ipo_delta_units,
                     "trainer_eval": trainer_eval, "train_wall_s": train_s,
                     "eval_wall_s": time.perf_counter() - t1, "run_dir": str(run_dir)}
        console.print(f"{spec.label} @ {f:g}: trained in {train_s:.0f} s, evaluated in {runs[key]['eval_wall_s']:.0f} s",
                      markup=False)

    overhead: dict[str, Any] = {}
    if cfg.timing_steps > 0:
        t0 = time.perf_counter()
        k = cfg.trainer.batch_size * (cfg.timing_warmup + cfg.timing_steps)
        overhead = time_losses(env.policy, tok, sets[pc.flip_rates[0]][0][:k], cfg, prefix, work)
        timings["timing_s"] = time.perf_counter() - t0

    write_jsonl(out / RECORDS, records)
    world = None if env.world is None else {
        "key": env.world.report.get("key"), "root": str(env.world.root), "seed": env.world.config.seed,
        "rm_heldout_accuracy": env.world.report.get("rm_heldout_accuracy")}
    facts = {"config": measured_config(cfg, NOT_MEASURED),
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol))),
             "world": world, "world_seed": None if world is None else world["seed"],
             "judge": "gold reward" if env.gold is not None else "reward model (no gold reward on real checkpoints)",
             "prompt_prefix": prefix, "policy_parameters": param_count(sft), "reward_model": str(env.reward_model), "pairs": pair_info, "runs": runs,
             "overhead": overhead, "timings": timings,
             "win_rate_setup": {"prompts": len(win_items), "samples_per_prompt": cfg.eval.win_samples,
                                "sampling": to_dict(cfg.eval.sampling)}}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2, default=str))
    return out


# ------------------------------------------------------------------------------------------------ report
ENDPOINT_KINDS = ("win", "partial_corr", "partial_corr_refx", "flipped_delta_neg", "flipped_delta_neg_refx")


def win_shares(records: Sequence[dict[str, Any]], a: str, b: str, name: str) -> dict[Any, float]:
    """Per held-out prompt both policies were sampled on (by prompt id): the share of A's samples that beat B's
    (ties 1/2) minus 1/2 (pure; `name` labels the error)."""
    sa = {r["id"]: r["scores"] for r in records if r["kind"] == "win" and r["run"] == a}
    sb = {r["id"]: r["scores"] for r in records if r["kind"] == "win" and r["run"] == b}
    ids = [i for i in sa if i in sb]
    if not ids:
        runs = sorted({r["run"] for r in records if r["kind"] == "win"})
        raise KeyError(f"sr_dpo protocol: endpoint {name!r}: no paired win-rate samples of {a!r} and {b!r}; "
                       f"measured policies: {runs}")
    return {i: float(np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(sa[i], sb[i])])) - 0.5
            for i in ids}


def endpoint_units(name: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """The per-unit values of a declared endpoint, from one seed's records (pure). Names:
      win:A:B                  per held-out prompt, the share of A's samples that beat B's (ties 1/2) - 0.5
                               (A, B: run keys TAG@FLIP, or sft);
      partial_corr[_refx]:A    per training pair, the products whose mean is the partial correlation of Delta
                               (paper; _refx: the reference-on-x ablation) with the gold gap given beta*h, at the
                               mid-training checkpoint of run A;
      flipped_delta_neg[_refx]:A  per flipped training pair, 1 if Delta < 0 at A's mid-training checkpoint."""
    kind, _, rest = name.partition(":")
    if kind not in ENDPOINT_KINDS or not rest:
        raise ValueError(f"sr_dpo protocol: endpoint {name!r}: the name must be KIND:RUN[:RUN] with KIND one of "
                         f"{', '.join(ENDPOINT_KINDS)} (see sr_dpo.endpoint_units)")
    if kind == "win":
        a, _, b = rest.partition(":")
        return np.array(list(win_shares(records, a, b, name).values()), float)
    rows = [r for r in records if r["kind"] == "train_pair" and r["run"] == rest]
    if not rows:
        runs = sorted({r["run"] for r in records if r["kind"] == "train_pair"})
        raise KeyError(f"sr_dpo protocol: endpoint {name!r}: no mid-training records of run {rest!r} (Sr-* runs "
                       f"only); measured: {runs}")
    dkey = "delta_refx" if kind.endswith("_refx") else "delta"
    if kind.startswith("partial_corr"):
        rows = [r for r in rows if r["gold_gap"] is not None]
        return partial_corr_units([r[dkey] for r in rows], [r["gold_gap"] for r in rows], [r["beta_h"] for r in rows])
    return flipped_delta_negative([r[dkey] for r in rows], [r["flipped"] for r in rows])


def controls_summary(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per Sr-* run, the mid-training controls on its training pairs, for both Delta definitions (pure)."""
    out: dict[str, dict[str, Any]] = {}
    for run in dict.fromkeys(r["run"] for r in records if r["kind"] == "train_pair"):
        rows = [r for r in records if r["kind"] == "train_pair" and r["run"] == run]
        g = [r for r in rows if r["gold_gap"] is not None]
        flipped = [r["flipped"] for r in rows]
        row: dict[str, Any] = {"pairs": len(rows), "flipped": int(sum(flipped)), "step": rows[0]["step"],
                               "corr_beta_h_gold": pearson([r["beta_h"] for r in g], [r["gold_gap"] for r in g])}
        for suf, key in (("", "delta"), ("_refx", "delta_refx")):
            d = np.array([r[key] for r in rows])
            row[f"mean_delta{suf}"] = float(d.mean())
            row[f"partial_corr{suf}"] = partial_corr([r[key] for r in g], [r["gold_gap"] for r in g],
                                                     [r["beta_h"] for r in g]) if len(g) > 2 else float("nan")
            neg = flipped_delta_negative(d, flipped)
            row[f"flipped_delta_neg{suf}"] = float(neg.mean()) if neg.size else float("nan")
            row[f"corr_delta{suf}_gold"] = pearson([r[key] for r in g], [r["gold_gap"] for r in g])
        out[run] = row
    return out


def run_summary(records: Sequence[dict[str, Any]], beta: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per trained policy (and the SFT start): win rate vs SFT, mean judge reward per prompt and the held-out pair
    metrics (pure, from the records)."""
    wins: dict[str, dict[Any, list[float]]] = {}
    for r in records:
        if r["kind"] == "win":
            wins.setdefault(r["run"], {})[r["id"]] = r["scores"]
    sft = wins.get("sft", {})
    sft_pp = [float(np.mean(v)) for v in sft.values()]
    start = {**dict(zip(("judge_mean", "judge_mean_se"), mean_se(sft_pp))), "judge_per_prompt": sft_pp}
    out: dict[str, dict[str, Any]] = {}
    for run, by_id in wins.items():
        if run == "sft":
            continue
        ids = [i for i in by_id if i in sft]
        a = [s for i in ids for s in by_id[i]]
        b = [s for i in ids for s in sft[i]]
        w = win_rate(a, b)
        per_prompt = [float(np.mean(by_id[i])) for i in ids]
        g, g_se = mean_se(per_prompt)
        hp = [r for r in records if r["kind"] == "heldout_pair" and r["run"] == run]
        h, h_aug = np.array([r["h"] for r in hp]), np.array([r["h_aug"] for r in hp])
        gaps = [r["gold_gap"] for r in hp]
        judge = np.array(gaps, float) if hp and all(x is not None for x in gaps) else None
        out[run] = {"win_rate": w.win_rate, "win_rate_se": w.se, "judge_mean": g, "judge_mean_se": g_se,
                    "judge_per_prompt": per_prompt,
                    **(pair_metrics(h, h_aug, beta, judge) if hp else {})}
    return out, start


# keys that may differ between the world seeds pooled in one report (each OUT was measured on its own world)
_POOL_FREE = ("source.world.seed", "work_dir")


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: tables, controls, the protocol's verdicts (per world seed and pooled over out_dir + pool_dirs),
    figures and results.json / results.md from the saved records alone; re-runnable without models."""
    measured = measured_config(cfg, NOT_MEASURED)
    facts_by, seeds = pool_measured(cfg.out_dir, cfg.pool_dirs, measured, "sr_dpo", _POOL_FREE,
                                    MEASURE_FACTS, RECORDS)
    facts, records = next(iter(facts_by.values())), next(iter(seeds.values()))
    rec = Record("sr_dpo", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    judge = facts["judge"]
    jname = judge.split(" (")[0]
    runs_meta = facts["runs"]
    summary, start = run_summary(records, cfg.beta)
    controls = controls_summary(records)

    headers = ["run", "flip rate", f"win rate vs SFT ({jname})", f"mean {jname}", "held-out avg marginal",
               "accuracy", "prompt-aug. accuracy", "Pearson β·h vs gold gap", "train s"]
    rows = [["SFT (start)", "-", "-", f"{start['judge_mean']:.3f} ± {start['judge_mean_se']:.3f}", 0.0, "-", "-",
             "-", "-"]]
    for key, m in runs_meta.items():
        s = summary.get(key, {})
        rows.append([m["label"], f"{m['flip']:g}", f"{s.get('win_rate', float('nan')):.3f} ± "
                     f"{s.get('win_rate_se', float('nan')):.3f}",
                     f"{s.get('judge_mean', float('nan')):.3f} ± {s.get('judge_mean_se', float('nan')):.3f}",
                     s.get("average_marginal", float("nan")), s.get("accuracy", float("nan")),
                     s.get("prompt_augmented_accuracy", float("nan")), s.get("pearson", float("nan")),
                     f"{m['train_wall_s']:.0f}"])
    rec.table(f"Final policies (world seed {facts.get('world_seed')}; {facts['pairs']['eval_pairs']} held-out "
              f"clean-label pairs; win rate judged by the {judge})", headers, rows)

    h2h = []
    for key, m in runs_meta.items():
        base = run_key(BASE_OF[m["loss"]], m["flip"])
        if m["loss"] in ("sr_dpo", "sr_ipo") and base in runs_meta:
            u = endpoint_units(f"win:{key}:{base}", records)
            a = [s for r in records if r["kind"] == "win" and r["run"] == key for s in r["scores"]]
            b = [s for r in records if r["kind"] == "win" and r["run"] == base for s in r["scores"]]
            hh = head_to_head(a, b)
            summary.setdefault(key, {})["vs_base"] = {"base": runs_meta[base]["label"], **hh}
            h2h.append([m["label"], runs_meta[base]["label"], f"{m['flip']:g}", hh["win"], hh["tie"], hh["lose"],
                        f"{hh['win_rate']:.3f} ± {hh['win_rate_se']:.3f}", f"{u.mean() + 0.5:.3f}"])
    if h2h:
        rec.table(f"Head to head: Sr-* vs its base loss at the same flip rate (same prompts and sampling seed, {judge})",
                  ["run", "vs", "flip rate", "win", "tie", "lose", "win rate (ties ½, per sample)",
                   "per-prompt mean"], h2h)

    if controls:
        rec.table("Controls at the mid-training checkpoint, on each run's training pairs (paper Δ: reference on "
                  "p ⊕ x; ablation Δ_x: reference on x)",
                  ["run", "flip rate", "step", "pairs", "flipped", "partial corr(Δ, gold gap | β·h)",
                   "ablation: Δ_x", "Δ < 0 on flipped", "ablation: Δ_x < 0", "mean Δ", "corr(β·h, gold gap)"],
                  [[runs_meta[k]["label"], f"{runs_meta[k]['flip']:g}", c["step"], c["pairs"], c["flipped"],
                    c["partial_corr"], c["partial_corr_refx"], c["flipped_delta_neg"], c["flipped_delta_neg_refx"],
                    c["mean_delta"], c["corr_beta_h_gold"]] for k, c in controls.items()])

    ps = facts["pairs"]["sets"]
    rec.table("Training pair sets (one per flip rate; the same two-sample pairs, labels flipped by a generator "
              "keyed by prompt id)", ["flip rate", "pairs", "ties skipped", "flipped", "label agrees with gold",
                                      "mean |gold gap|"],
              [[f, v["pairs"], v["ties_skipped"], v["flipped"], v["label_agrees_with_gold"], v["mean_abs_gold_gap"]]
               for f, v in ps.items()])

    verdicts: list[dict[str, Any]] = []
    proto = cfg.protocol
    if proto.endpoints:
        verdicts = report_protocol(rec, proto, seeds, endpoint_units, facts_by, MEASURE_FACTS)

    overhead = facts.get("overhead") or {}
    if overhead:
        rec.table("Training-time overhead (median seconds per optimizer step, interleaved, same batches)",
                  ["loss", "s / step", "ratio to its base loss", "min", "max"],
                  [[LABEL[k], v["seconds_per_step"], v["ratio_to_base"], v["min"], v["max"]]
                   for k, v in overhead.items()])

    def draw(fig):
        ax = fig.subplots(1, 1)
        tags: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        for key, m in runs_meta.items():
            if key in summary:
                tags.setdefault(m["label"], []).append((m["flip"], summary[key]))
        for label, pts in tags.items():
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [p[1]["win_rate"] for p in pts], yerr=[p[1]["win_rate_se"] for p in pts],
                        marker="o", capsize=3, label=label)
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xlabel("label flip rate")
        ax.set_ylabel(f"win rate vs SFT policy ({jname})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    rec.figure("win_rate_vs_flip_rate.png", draw, figsize=(6, 4))

    rec.results.update(
        judge=judge, prompt_prefix=facts["prompt_prefix"], reward_model=facts.get("reward_model"), world=facts["world"], world_seeds=sorted(seeds),
        policy_parameters=facts["policy_parameters"], pairs=facts["pairs"], starting_policy=start,
        runs={k: {**m, **summary.get(k, {})} for k, m in runs_meta.items()}, controls=controls,
        protocol=verdicts, overhead=overhead, timings=facts["timings"], win_rate_setup=facts["win_rate_setup"])
    rec.notes += [
        (f"Pairs: the first two non-empty of {cfg.pairs.samples} samples of the starting policy per training prompt "
         f"(a random two-sample pair), labelled by a Bradley-Terry model on the {facts['pairs']['ranker']} reward "
         f"(temperature {cfg.pairs.bt_temperature:g}; 0 = the better response), then flipped at each rate in "
         f"{list(cfg.pairs.flip_rates)} by a generator keyed by (seed, prompt id)."),
        (f"Every run starts from the same SFT policy with the same data order, seed, optimizer ({cfg.optim.name}, lr "
         f"{cfg.optim.lr:g}), beta {cfg.beta:g}, {cfg.trainer.steps} steps of batch {cfg.trainer.batch_size}; the "
         f"controls use the policy exported at step {cfg.mid} (the run resumed exactly from there)."),
        ("Partial correlation per unit: products of standardised residuals (their mean is the partial "
         "correlation); its bootstrap interval resamples pairs with the residualisation fixed."),
        (f"Win rate: {cfg.eval.win_samples} sampled response(s) per held-out prompt (temperature "
         f"{cfg.eval.sampling.temperature:g}) from each policy with the same engine seed, compared by the {judge}; "
         "ties count one half."),
    ]
    return rec.finish(console)


def run(cfg: Config, console: Any = None, reward_model: str | Path | None = None) -> dict[str, Any]:
    """measure_study, then report_study; returns the result record (also written to out_dir). `reward_model`
    replaces the source's reward model (the scaling study keeps one RM fixed across policy sizes)."""
    started = time.perf_counter()
    measure_study(cfg, console, reward_model=reward_model)
    return report_study(cfg, console, started=started)
