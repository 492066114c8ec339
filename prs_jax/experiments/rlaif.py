"""RLAIF study (Lee et al. 2023, arXiv 2309.00267): AI preference labels vs gold labels, soft-label reward models,
and A2C against an AI-label RM vs a gold-label RM.

World source (the default). Pairs are two responses of the world's SFT policy to one held-out prompt (x with its
preference z); the response with the higher GOLD reward is the "human" label, ties are skipped. Prompts are split
into an RM-train part and an RM-eval part (`rm_eval_fraction`, by prompt, so no eval prompt is seen in training).

1. Labeler alignment. The labeler is the world's policy with `prs_jax.world.corpus.JUDGE_PROMPT` (the judge
   prompt it was trained on). Every variant labels the same `align_pairs` pairs in both candidate orders:
   preamble (the world's own vs the helpful/base and helpful/detailed defaults of prs_jax.feedback.prompts: the
   world trained only its own), few-shot exemplars (solved pairs written from the world's RM-training prompts),
   chain of thought, self-consistency k, and a labeler-size sweep (`sizes`: other world builds that differ only in
   the policy's dimensions). Reported per variant: alignment with the gold labels after position debiasing, the
   alignment WITHOUT debiasing (the mean over the two single-order labelers, which are exactly what a
   `both_orders=False` run computes), and the position-bias rate (the same position wins in both orders).
2. Reward models. The labeler variant `rm.label_variant` soft-labels every RM-train pair; one RM is trained on
   these soft labels (`loss.soft_labels=True`), one on the gold labels of the same pairs (hard, Bradley-Terry).
   Both start from the SFT policy, train with the same settings, and are scored on the held-out gold pairs.
3. RL. `run_a2c` trains the SFT policy against each RM on the RM-train prompts. Every policy then samples
   `a2c.eval_samples` responses per held-out prompt; the win rate against the SFT policy is judged by the gold
   reward (sample j against SFT sample j; ties count half), and also by the AI labeler (both orders).

Real source (`source.kind: real`, the `full` config): the pairs are human preference pairs (`real.pairs`,
chosen = the human's choice, shown in a random order), the labeler is `real.labeler`, the prompts of the RL part
come from `source.real.prompt_set`. There is no gold reward: alignment and RM accuracy are against the human
labels, and the RL win rates are judged by the AI labeler only (said in the notes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from tqdm import tqdm

from prs_jax.eval.stats import PairedWinRate, mean_se, win_rate
from prs_jax.experiments.common import Record, Source, build_world_from, param_count
from prs_jax.experiments.env import StudyEnv
from prs_jax.feedback.labeler import AILabeler, LabelerConfig
from prs_jax.feedback.metrics import (
    judge_win_rate,
    labeler_alignment,
    position_bias_rate,
)
from prs_jax.feedback.prompts import PromptConfig
from prs_jax.models.sharding import MeshConfig
from prs_jax.strategies.base import PromptItem, join_preference

Preamble = Literal["world", "base", "detailed"]


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class LabelerVariant:
    """One AI-labeler set-up: preamble, number of few-shot exemplars, chain of thought, self-consistency k."""

    name: str
    preamble: Preamble = "world"  # world: the labeler's trained prompt; base / detailed: prs_jax defaults
    shots: int = 0
    cot: bool = False
    self_consistency: int = 1

    def __post_init__(self) -> None:
        if self.self_consistency > 1 and not self.cot:
            raise ValueError(f"variant {self.name!r}: self_consistency > 1 samples rationales; set cot: true.")
        if self.shots < 0:
            raise ValueError(f"variant {self.name!r}: shots must be >= 0 (got {self.shots}).")


@dataclasses.dataclass(frozen=True)
class LabelerSize:
    """A labeler of another size: WorldSpec.overrides applied on top of the study's world (a separate world build
    that differs only there), or a checkpoint directory (`model`, which wins when set; required for a real source).
    Labelled with the variant `size_variant`."""

    name: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str = ""


@dataclasses.dataclass(frozen=True)
class RMSettings:
    """The two reward models (AI soft labels vs gold hard labels): same init, data size and optimisation."""

    label_variant: str = "world"
    steps: int = 80
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 4
    max_length: int = 192


@dataclasses.dataclass(frozen=True)
class A2CSettings:
    """A2C (prs_jax.train.a2c.run_a2c) against each RM; evaluation samples per held-out prompt."""

    enabled: bool = True
    iterations: int = 20
    prompts_per_iteration: int = 8
    n: int = 4
    lr: float = 1e-4
    beta: float = 0.05
    kl_mode: Literal["reward", "loss"] = "reward"
    temperature: float = 0.9
    max_new_tokens: int = 48
    eval_samples: int = 4
    eval_temperature: float = 0.9
    control: bool = True  # also run A2C against a constant reward: what the procedure does without a signal


@dataclasses.dataclass(frozen=True)
class RealPairs:
    """Human preference pairs and the labeler checkpoint for `source.kind: real` (see feedback.run.read_pairs for
    the accepted layouts; chosen/rejected columns mean the human preferred `chosen`)."""

    pairs: str = ""
    split: str | None = None
    max_pairs: int | None = None
    labeler: str = ""  # default: source.real.policy
    task: Literal["summarize", "helpful", "harmless"] = "helpful"
    exemplars: str | None = None  # JSONL of solved pairs for the few-shot variants (see feedback.prompts)


def _default_variants() -> tuple[LabelerVariant, ...]:
    return (LabelerVariant("world"), LabelerVariant("base", preamble="base"),
            LabelerVariant("detailed", preamble="detailed"), LabelerVariant("world_2shot", shots=2),
            LabelerVariant("world_cot", cot=True), LabelerVariant("world_cot_sc4", cot=True, self_consistency=4),
            LabelerVariant("world_cot_sc16", cot=True, self_consistency=16))


@dataclasses.dataclass(frozen=True)
class Config:
    """The RLAIF study (see the module docstring)."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/rlaif"
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig | None = None  # trainer mesh for the RM and A2C runs (real checkpoints on accelerators)
    progress: bool = True
    # pairs (world source)
    prompts: int = 200  # held-out prompts used
    samples_per_prompt: int = 4  # responses per prompt -> samples_per_prompt // 2 disjoint pairs
    temperature: float = 1.0
    max_new_tokens: int = 48
    rm_eval_fraction: float = 0.25
    # labeler
    align_pairs: int = 160  # pairs every variant labels
    variants: tuple[LabelerVariant, ...] = dataclasses.field(default_factory=_default_variants)
    sizes: tuple[LabelerSize, ...] = ()
    size_variant: str = "world"
    label_batch: int = 32  # pairs per labeler call
    cot_max_new_tokens: int = 64
    sc_temperature: float = 0.7
    sc_top_k: int = 40
    rm: RMSettings = RMSettings()
    a2c: A2CSettings = A2CSettings()
    real: RealPairs = RealPairs()

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique (got {names}).")
        for key, name in (("rm.label_variant", self.rm.label_variant), ("size_variant", self.size_variant)):
            if name not in names:
                raise ValueError(f"{key}: {name!r} is not one of the variants {names}.")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (got {self.samples_per_prompt}).")
        if not 0 < self.rm_eval_fraction < 1:
            raise ValueError(f"rm_eval_fraction must be in (0, 1) (got {self.rm_eval_fraction}).")


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class Pair:
    """A labelled pair: the prompt (text or messages), responses A and B (text or messages), which one the
    human / gold label prefers (0 = A, 1 = B), the RM split, and the gold rewards when known."""

    id: str
    prompt: Any
    a: Any
    b: Any
    human: int
    split: Literal["train", "eval"]
    gold_a: float | None = None
    gold_b: float | None = None


@dataclasses.dataclass
class Setting:
    """What the study runs on: labeler and policy checkpoints, pairs, RL prompts, the gold reward if any."""

    labeler: str
    policy: str
    pairs: list[Pair]
    train_items: list[PromptItem]
    eval_items: list[PromptItem]
    base_prompt: PromptConfig
    exemplar_rows: list[dict[str, Any]]
    gold: Callable[[str, str, str | None], float] | None
    proxy_rm: str | None = None


def sample_responses(env: StudyEnv, model: Any, tok: Any, queries: Sequence[str], m: int, temperature: float,
                     max_new_tokens: int, seed: int, batch: int = 32, desc: str = "sample",
                     progress: bool = True) -> list[list[str]]:
    """m responses per query (a user chat turn) of `model`, sampled on the env's engine in batches of prompts."""
    from prs_jax.tree.sampling import SamplingParams

    out: list[list[str]] = []
    for s in tqdm(range(0, len(queries), batch), desc=desc, unit="batch", disable=not progress):
        # keys from (seed, query index, path): `batch` changes nothing
        engine = env.engine(seed, model=model, tokenizer=tok)
        roots = engine.add_prompts([[{"role": "user", "content": q}] for q in queries[s:s + batch]],
                                   ids=[str(s + i) for i in range(len(queries[s:s + batch]))])
        kids = engine.expand(roots, m, SamplingParams(temperature=temperature), max_new_tokens=max_new_tokens)
        out += [[k.text for k in ks] for ks in kids]
    return out


def make_pairs(items: Sequence[PromptItem], responses: Sequence[Sequence[str]],
               gold: Callable[[str, str, str | None], float], eval_ids: set[str]) -> list[Pair]:
    """Disjoint pairs (r0, r1), (r2, r3), ... of each prompt's responses, labelled by the gold reward; ties,
    identical texts and empty responses (a sample that stopped at once; pair readers refuse them) are skipped."""
    pairs = []
    for it, rs in zip(items, responses):
        for j in range(0, len(rs) - 1, 2):
            a, b = rs[j], rs[j + 1]
            ga, gb = gold(it.prompt, a, it.preference), gold(it.prompt, b, it.preference)
            if a == b or ga == gb or not a.strip() or not b.strip():
                continue
            pairs.append(Pair(f"{it.id}/{j // 2}", [{"role": "user", "content": join_preference(it.prompt,
                                                                                            it.preference)}],
                              a, b, 0 if ga > gb else 1, "eval" if it.id in eval_ids else "train", ga, gb))
    return pairs


def _setting(cfg: Config, env: StudyEnv, console: Console, notes: list[str]) -> Setting:
    """World: gold-labelled pairs of the policy's own samples on held-out prompts. Real: the human pairs."""
    if env.kind != "world":
        return _human_pairs_setting(cfg, env, notes)
    from prs_jax.world.corpus import JUDGE_PROMPT

    items = env.heldout(cfg.prompts, strict=False)
    n_eval = max(1, round(cfg.rm_eval_fraction * len(items)))
    eval_ids = {it.id for it in items[len(items) - n_eval:]}
    console.print(f"rlaif: sampling {cfg.samples_per_prompt} responses for each of {len(items)} held-out prompts",
                  markup=False)
    responses = sample_responses(env, env.model, env.tokenizer,
                                 [join_preference(it.prompt, it.preference) for it in items],
                                 cfg.samples_per_prompt, cfg.temperature, cfg.max_new_tokens, cfg.seed,
                                 desc="pairs", progress=cfg.progress)
    pairs = make_pairs(items, responses, env.gold, eval_ids)
    n_cand = len(items) * (cfg.samples_per_prompt // 2)
    notes.append(f"pairs: {len(pairs)} of {n_cand} candidate pairs had different gold rewards (ties skipped); "
                 f"{sum(p.split == 'train' for p in pairs)} on the {len(items) - n_eval} RM-train prompts, "
                 f"{sum(p.split == 'eval' for p in pairs)} on the {n_eval} RM-eval prompts.")
    return Setting(labeler=str(env.policy), policy=str(env.policy), pairs=pairs,
                   train_items=[it for it in items if it.id not in eval_ids],
                   eval_items=[it for it in items if it.id in eval_ids], base_prompt=JUDGE_PROMPT,
                   exemplar_rows=_world_exemplars(env.world.data / "rm_train.jsonl"), gold=env.gold,
                   proxy_rm=str(env.reward_model))


def _world_exemplars(path: Path, n: int = 4) -> list[dict[str, Any]]:
    """Solved pairs from the world's RM-training pairs (training prompts, never held-out ones): the clearest
    gold margins first, the preferred answer alternating between position 1 and 2."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: -float(r.get("gold_margin", 0.0)))
    out = []
    for i, r in enumerate(rows[:n]):
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        first, second, preferred = (chosen, rejected, 1) if i % 2 == 0 else (rejected, chosen, 2)
        out.append({"context": r["prompt"][0]["content"], "response_1": first, "response_2": second,
                    "preferred": preferred})
    return out


def _human_pairs_setting(cfg: Config, env: StudyEnv, notes: list[str]) -> Setting:
    from prs_jax.errors import ConfigError
    from prs_jax.feedback.run import LabelRunConfig, read_pairs

    spec = env.source.real
    labeler = cfg.real.labeler or spec.policy
    if not cfg.real.pairs or not labeler or not spec.policy:
        raise ConfigError("rlaif with source.kind=real needs real.pairs (human preference pairs), "
                          "source.real.policy (the SFT policy) and real.labeler (default: the policy).")
    rows = read_pairs(LabelRunConfig(model=labeler, pairs=cfg.real.pairs, split=cfg.real.split,
                                     max_pairs=cfg.real.max_pairs))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(rows))
    n_eval = max(1, round(cfg.rm_eval_fraction * len(rows)))
    eval_idx = set(order[len(rows) - n_eval:].tolist())
    pairs = []
    for i, r in enumerate(rows):
        if r.human not in ("a", "b"):
            continue
        human = 0 if r.human == "a" else 1
        a, b = r.a, r.b
        if zlib.crc32(f"{cfg.seed}:{r.id}".encode()) % 2:  # show the human's choice in a random position
            a, b, human = b, a, 1 - human
        pairs.append(Pair(r.id, r.prompt, a, b, human, "eval" if i in eval_idx else "train"))
    items = env.real_prompts() if spec.prompts_path else []
    n_items_eval = max(1, round(cfg.rm_eval_fraction * len(items))) if items else 0
    ex_rows = []
    if cfg.real.exemplars:
        ex_rows = [json.loads(line) for line in Path(cfg.real.exemplars).read_text().splitlines() if line.strip()]
    notes.append("source: real checkpoints; labels are the human preferences of the pair file (no gold reward): "
                 "RL win rates are judged by the AI labeler only.")
    return Setting(labeler=labeler, policy=spec.policy, pairs=pairs, train_items=items[:len(items) - n_items_eval],
                   eval_items=items[len(items) - n_items_eval:], base_prompt=PromptConfig(task=cfg.real.task),
                   exemplar_rows=ex_rows, gold=None, proxy_rm=spec.reward_model or None)


# ------------------------------------------------------------------------------------------------ labeling
def prompt_config(base: PromptConfig, variant: LabelerVariant, exemplars: str | None) -> PromptConfig:
    """The labeler prompt of a variant: the base (the labeler's trained prompt) with the preamble swapped for a
    prs_jax default and/or few-shot exemplars added."""
    p = base
    if variant.preamble != "world":
        p = dataclasses.replace(p, preamble=None, variant=variant.preamble)
    if variant.shots:
        p = dataclasses.replace(p, exemplars=exemplars, max_exemplars=variant.shots)
    return p


@dataclasses.dataclass
class Labels:
    """Soft labels of a set of pairs under one variant: P(A) after debiasing and both orders' P(position 1)."""

    p_a: np.ndarray
    q_ab: np.ndarray  # P(position 1 wins) with A first
    q_ba: np.ndarray  # P(position 1 wins) with B first
    seconds: float
    example_rationale: str | None = None


def labeler_context(prompt: Any) -> Any:
    """What the labeler sees as the context: a single user turn as its plain text (the world's judge was trained
    on the request text itself, not on a "User: ..." transcript); longer conversations as they are (rendered as
    turns by feedback.prompts.context_text)."""
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return prompt


def label_pairs(labeler: AILabeler, pairs: Sequence[Pair], batch: int, seed: int, desc: str,
                progress: bool = True) -> Labels:
    """Both-order soft labels of `pairs` in batches (the labeler's engine is rebuilt per batch)."""
    t0 = time.perf_counter()
    p_a, q_ab, q_ba = [], [], []
    rationale = None
    for s in tqdm(range(0, len(pairs), batch), desc=desc, unit="batch", disable=not progress):
        chunk = pairs[s:s + batch]
        labs = labeler.label([labeler_context(p.prompt) for p in chunk], [p.a for p in chunk], [p.b for p in chunk],
                             seed=seed)  # rationales are keyed by each pair's tokens
        for lab in labs:
            p_a.append(lab.p_a)
            q_ab.append(float(lab.ab.dist[0]))
            q_ba.append(float(lab.ba.dist[0]) if lab.ba is not None else math.nan)
            if rationale is None and lab.ab.rationales:
                rationale = lab.ab.rationales[0]
    return Labels(np.asarray(p_a), np.asarray(q_ab), np.asarray(q_ba), time.perf_counter() - t0, rationale)


def _binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else math.nan


def alignment_row(labels: Labels, human: np.ndarray) -> dict[str, float]:
    """Alignment with debiasing, without (the mean of the two single-order labelers), and the position bias."""
    n = len(human)
    debiased = labeler_alignment(labels.p_a, human)
    a_first = labeler_alignment(labels.q_ab, human)
    b_first = labeler_alignment(1.0 - labels.q_ba, human)  # with B first, P(A) = P(position 2)
    return {"n": n, "alignment": debiased, "alignment_se": _binomial_se(debiased, n),
            "alignment_no_debias": (a_first + b_first) / 2, "alignment_a_first": a_first,
            "alignment_b_first": b_first, "position_bias": position_bias_rate(labels.q_ab, labels.q_ba),
            "mean_p_a": float(np.mean(labels.p_a)), "seconds": labels.seconds}


def labeler_config(cfg: Config, prompt: PromptConfig, variant: LabelerVariant) -> LabelerConfig:
    """The AILabeler config of a variant (both orders always: debiasing off is read from one order)."""
    return LabelerConfig(prompt=prompt, both_orders=True, cot=variant.cot, cot_max_new_tokens=cfg.cot_max_new_tokens,
                         self_consistency=variant.self_consistency, temperature=cfg.sc_temperature,
                         top_k=cfg.sc_top_k)


# ------------------------------------------------------------------------------------------------ reward models
def _rm_rows(pairs: Sequence[Pair], p_a: np.ndarray | None) -> list[dict[str, Any]]:
    """RM training rows: soft labels (chosen = A, p_chosen = P(A)) or gold/human hard labels (chosen = better)."""
    rows = []
    for i, p in enumerate(pairs):
        a, b = _as_messages(p.a), _as_messages(p.b)
        if p_a is not None:
            rows.append({"id": p.id, "prompt": p.prompt, "chosen": a, "rejected": b, "p_chosen": float(p_a[i])})
        else:
            chosen, rejected = (a, b) if p.human == 0 else (b, a)
            rows.append({"id": p.id, "prompt": p.prompt, "chosen": chosen, "rejected": rejected, "p_chosen": 1.0})
    return rows


def _as_messages(response: Any) -> Any:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_rm(cfg: Config, init: str, train_file: Path, eval_file: Path, soft: bool, out: Path,
             console: Console) -> dict[str, float]:
    """One RM run (run_train "rm") from `init`; returns its metrics on the held-out pairs."""
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    r = cfg.rm
    run_cfg = TrainRunConfig(
        model=init, dtype=cfg.dtype,
        data=DataConfig(train=str(train_file), eval=str(eval_file), max_length=r.max_length, max_prompt_length=None,
                        use_chat_template=True, pad_multiple=32, on_too_long="drop"),
        loss=LossConfig(soft_labels=soft),
        optim=OptimConfig(lr=r.lr, warmup_steps=r.warmup_steps, schedule="cosine", min_lr_ratio=0.05),
        trainer=TrainerConfig(out_dir=str(out / "run"), steps=r.steps, batch_size=r.batch_size, seed=cfg.seed,
                              log_every=10, progress=cfg.progress, async_checkpoint=False, tensorboard=False,
                              group_by_length=4, mesh=cfg.mesh),
        export_dir=str(out / "export"))
    return run_train("rm", run_cfg, console=console)


def rm_accuracy(rm_dir: str, pairs: Sequence[Pair], dtype: str, init_head: bool = False) -> float:
    """Pairwise accuracy of a reward model on labelled pairs (scored with the chat formatter, ties count half).
    `init_head`: the checkpoint is a causal LM given a fresh head, as run_train("rm") starts (same seed)."""
    from prs_jax.models import load_reward_model, load_tokenizer
    from prs_jax.tree.scoring import RewardScorer

    scorer = RewardScorer(load_reward_model(rm_dir, dtype=dtype, init_head=init_head), load_tokenizer(rm_dir))
    ctx = [_prompt_text(p.prompt) for p in pairs]
    sa = scorer.score_pairs([(c, _resp_text(p.a)) for c, p in zip(ctx, pairs)])
    sb = scorer.score_pairs([(c, _resp_text(p.b)) for c, p in zip(ctx, pairs)])
    credit = [0.5 if x == y else float((x > y) == (p.human == 0)) for x, y, p in zip(sa, sb, pairs)]
    return float(np.mean(credit)) if credit else math.nan


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(str(m["content"]) for m in prompt if m.get("role") == "user")


def _resp_text(response: Any) -> str:
    if isinstance(response, str):
        return response
    return "\n\n".join(str(m["content"]) for m in response)


# ------------------------------------------------------------------------------------------------ RL
def zero_reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """A constant reward: the A2C control run (what the procedure alone does to the policy)."""
    return [0.0] * len(responses)


def run_rl(cfg: Config, setting: Setting, rm_dir: str | None, out: Path, console: Console) -> dict[str, float]:
    """A2C (run_a2c) of the SFT policy against `rm_dir` (None: the constant control reward) on the RM-train
    prompts; exports the policy."""
    from prs_jax.train.a2c import (
        A2CConfig,
        A2CRunConfig,
        PromptsConfig,
        RewardConfig,
        RolloutConfig,
        run_a2c,
    )
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    a = cfg.a2c
    prompts_file = _write_jsonl(out / "prompts.jsonl", [{"id": it.id, "prompt": it.prompt,
                                                         "preference": it.preference} for it in setting.train_items])
    run_cfg = A2CRunConfig(
        model=setting.policy, dtype=cfg.dtype,
        prompts=PromptsConfig(path=str(prompts_file), include_preference=True),
        reward=RewardConfig(reward_model=rm_dir) if rm_dir else RewardConfig(
            callable="prs_jax.experiments.rlaif:zero_reward"),
        rollout=RolloutConfig(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature),
        a2c=A2CConfig(beta=a.beta, kl_mode=a.kl_mode),
        optim=OptimConfig(lr=a.lr, clip_norm=1.0),
        trainer=TrainerConfig(out_dir=str(out / "run"), steps=a.iterations, batch_size=a.prompts_per_iteration * a.n,
                              seed=cfg.seed, log_every=1, progress=cfg.progress, async_checkpoint=False,
                              tensorboard=False, mesh=cfg.mesh),
        export_dir=str(out / "policy"))
    return run_a2c(run_cfg, console=console)


def win_rate_gold(gold: Callable[[str, str, str | None], float], items: Sequence[PromptItem],
                  a: Sequence[Sequence[str]], b: Sequence[Sequence[str]]) -> PairedWinRate:
    """Win rate of policy A over B by the gold reward, sample j against sample j of the same prompt (ties half;
    prs_jax.eval.stats.win_rate on [prompts, samples] scores: the standard error is over prompts)."""
    ga, gb = [], []
    for it, ra, rb in zip(items, a, b):
        pairs = list(zip(ra, rb))
        ga.append([gold(it.prompt, x, it.preference) for x, _ in pairs])
        gb.append([gold(it.prompt, y, it.preference) for _, y in pairs])
    return win_rate(ga, gb)


def win_rate_judge(labeler: AILabeler, items: Sequence[PromptItem], a: Sequence[Sequence[str]],
                   b: Sequence[Sequence[str]], batch: int, seed: int, progress: bool) -> float:
    """Win rate of A over B with the AI labeler as judge (both orders; see feedback.metrics.judge_win_rate)."""
    ctx, ra, rb = [], [], []
    for it, xs, ys in zip(items, a, b):
        for x, y in zip(xs, ys):
            ctx.append(join_preference(it.prompt, it.preference))
            ra.append(x)
            rb.append(y)
    fake = [Pair(str(i), c, x, y, 0, "eval") for i, (c, x, y) in enumerate(zip(ctx, ra, rb))]
    labs = label_pairs(labeler, fake, batch, seed, "judge", progress)
    return judge_win_rate(labs.q_ab, labs.q_ba).win_rate


# ------------------------------------------------------------------------------------------------ run
def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """Run the study; returns the result record (results.json)."""
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    rec = Record("rlaif", cfg, cfg.out_dir, cfg.seed)
    work = rec.out / "work"
    shutil.rmtree(work, ignore_errors=True)  # a rerun recomputes everything (no stale trainer checkpoints)
    work.mkdir(parents=True)
    notes: list[str] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # the policy: the pairs' sampler (world), the labeler when real.labeler is unset, A2C's starting point
    env = StudyEnv.from_source(cfg.source, console, study="rlaif", require=(), dtype=cfg.dtype)
    setting = _setting(cfg, env, console, notes)
    pairs = setting.pairs
    timings["setup_and_pairs_s"] = time.perf_counter() - t0
    if not pairs:
        raise ValueError("rlaif: no labelled pairs (every sampled pair was a gold tie); raise prompts or "
                         "samples_per_prompt.")
    ex_file = _write_jsonl(work / "exemplars.jsonl", setting.exemplar_rows) if setting.exemplar_rows else None
    max_shots = max((v.shots for v in cfg.variants), default=0)
    if max_shots and (ex_file is None or len(setting.exemplar_rows) < max_shots):
        raise ValueError(f"rlaif: a variant asks for {max_shots} exemplars but only {len(setting.exemplar_rows)} "
                         "are available (real source: set real.exemplars).")
    align = pairs[:cfg.align_pairs]
    human = np.asarray([p.human for p in align])
    rec.results["data"] = {"pairs": len(pairs), "train_pairs": sum(p.split == "train" for p in pairs),
                           "eval_pairs": sum(p.split == "eval" for p in pairs), "align_pairs": len(align),
                           "share_a_preferred": float(np.mean(human == 0))}
    if setting.gold is not None:
        gaps = [abs(p.gold_a - p.gold_b) for p in pairs]  # type: ignore[operator]
        rec.results["data"]["mean_gold_gap"] = float(np.mean(gaps))

    same = setting.labeler == str(env.policy)
    model = env.model if same else env.load_policy(setting.labeler)
    tok = env.tokenizer if same else load_tokenizer(setting.labeler)
    by_variant = {v.name: v for v in cfg.variants}

    # ---------------------------------------------------------------- 1. labeler variants
    t0 = time.perf_counter()
    variants: dict[str, dict[str, Any]] = {}
    all_labels: dict[str, Labels] = {}
    for v in cfg.variants:
        lab = AILabeler(model, tok, labeler_config(cfg, prompt_config(setting.base_prompt, v, str(ex_file)
                                                                      if ex_file else None), v))
        subset = pairs if v.name == cfg.rm.label_variant else align
        labels = label_pairs(lab, subset, cfg.label_batch, cfg.seed, f"label {v.name}", cfg.progress)
        all_labels[v.name] = labels
        head = Labels(labels.p_a[:len(align)], labels.q_ab[:len(align)], labels.q_ba[:len(align)], labels.seconds,
                      labels.example_rationale)
        variants[v.name] = {**dataclasses.asdict(v), **alignment_row(head, human),
                            "example_rationale": labels.example_rationale}
        console.print(f"  {v.name}: alignment {variants[v.name]['alignment']:.3f} (no debiasing "
                      f"{variants[v.name]['alignment_no_debias']:.3f}), position bias "
                      f"{variants[v.name]['position_bias']:.3f}, {labels.seconds:.0f} s", markup=False)
    rec.results["variants"] = variants
    rec.table(f"AI labeler alignment with the {'gold' if setting.gold else 'human'} labels ({len(align)} pairs; "
              "± binomial s.e.)",
              ["variant", "preamble", "shots", "CoT", "k", "alignment (debiased)", "no debiasing",
               "position bias", "s"],
              [[n, r["preamble"], r["shots"], "yes" if r["cot"] else "no", r["self_consistency"],
                f"{r['alignment']:.3f} ± {r['alignment_se']:.3f}", r["alignment_no_debias"], r["position_bias"],
                f"{r['seconds']:.0f}"] for n, r in variants.items()])

    timings["variants_s"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- 1b. labeler size
    t0 = time.perf_counter()
    sizes: dict[str, dict[str, Any]] = {}
    if cfg.sizes:
        sv = by_variant[cfg.size_variant]
        sizes["base"] = {**variants[sv.name], "params": param_count(model)}
        for size in cfg.sizes:
            if size.model:
                path = size.model
            elif cfg.source.kind == "world":
                spec = cfg.source.world
                sized = build_world_from(dataclasses.replace(spec, overrides={**spec.overrides, **size.overrides}),
                                         console)
                path = str(sized.policy)
            else:
                raise ValueError(f"sizes[{size.name}]: set `model` (a labeler checkpoint dir) for a real source.")
            m = load_causal_lm(path, dtype=cfg.dtype)
            lab = AILabeler(m, load_tokenizer(path), labeler_config(cfg, prompt_config(
                setting.base_prompt, sv, str(ex_file) if ex_file else None), sv))
            labels = label_pairs(lab, align, cfg.label_batch, cfg.seed, f"size {size.name}", cfg.progress)
            sizes[size.name] = {**alignment_row(labels, human), "params": param_count(m), "model": path,
                                "overrides": size.overrides}
            console.print(f"  size {size.name} ({sizes[size.name]['params']:,} params): alignment "
                          f"{sizes[size.name]['alignment']:.3f}, position bias {sizes[size.name]['position_bias']:.3f}",
                          markup=False)
        rec.results["sizes"] = sizes
        rec.table(f"labeler size (variant {sv.name!r}, {len(align)} pairs)",
                  ["labeler", "parameters", "alignment (debiased)", "no debiasing", "position bias"],
                  [[n, f"{r['params']:,}", f"{r['alignment']:.3f} ± {r['alignment_se']:.3f}",
                    r["alignment_no_debias"], r["position_bias"]]
                   for n, r in sorted(sizes.items(), key=lambda kv: kv[1]["params"])])

    timings["sizes_s"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- 2. reward models
    t0 = time.perf_counter()
    train_idx = [i for i, p in enumerate(pairs) if p.split == "train"]
    eval_pairs = [p for p in pairs if p.split == "eval"]
    rm_dirs: dict[str, str] = {}
    if cfg.rm.steps > 0 and train_idx and eval_pairs:
        soft = all_labels[cfg.rm.label_variant].p_a[train_idx]
        train_pairs = [pairs[i] for i in train_idx]
        tr_human = np.asarray([p.human for p in train_pairs])
        eval_file = _write_jsonl(work / "rm_eval.jsonl", _rm_rows(eval_pairs, None))
        rms: dict[str, dict[str, Any]] = {}
        label_name = "gold" if setting.gold else "human"
        for name, p_a, is_soft in (("ai", soft, True), (label_name, None, False)):
            train_file = _write_jsonl(work / f"rm_train_{name}.jsonl", _rm_rows(train_pairs, p_a))
            console.print(f"rlaif: training the RM on {'AI soft' if is_soft else label_name} labels "
                          f"({len(train_pairs)} pairs)", markup=False)
            metrics = train_rm(cfg, setting.policy, train_file, eval_file, is_soft, work / f"rm_{name}", console)
            rm_dirs[name] = str(work / f"rm_{name}" / "export")
            acc = rm_accuracy(rm_dirs[name], eval_pairs, cfg.dtype)
            rms[name] = {"labels": "AI soft labels" if is_soft else f"{label_name} labels (hard)",
                         "eval_accuracy": acc, "eval_accuracy_se": _binomial_se(acc, len(eval_pairs)),
                         "trainer_eval": metrics,
                         "label_agreement": labeler_alignment(p_a, tr_human) if p_a is not None else 1.0}
        acc = rm_accuracy(setting.policy, eval_pairs, cfg.dtype, init_head=True)
        rms["untrained"] = {"labels": "none: the SFT policy with the fresh head both RMs start from",
                            "eval_accuracy": acc, "eval_accuracy_se": _binomial_se(acc, len(eval_pairs)),
                            "label_agreement": math.nan}
        if setting.proxy_rm:
            acc = rm_accuracy(setting.proxy_rm, eval_pairs, cfg.dtype)
            rms["world_proxy"] = {"labels": "the world's proxy RM (3000 teacher pairs, gold labels)",
                                  "eval_accuracy": acc, "eval_accuracy_se": _binomial_se(acc, len(eval_pairs)),
                                  "label_agreement": math.nan}
        rec.results["reward_models"] = rms
        rec.table(f"RM pairwise accuracy on {len(eval_pairs)} held-out {label_name}-labelled pairs "
                  f"(trained on {len(train_pairs)} pairs; ± binomial s.e.)",
                  ["reward model", "trained on", "train-label agreement with " + label_name, "held-out accuracy"],
                  [[n, r["labels"], r["label_agreement"], f"{r['eval_accuracy']:.3f} ± {r['eval_accuracy_se']:.3f}"]
                   for n, r in rms.items()])

    timings["reward_models_s"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- 3. A2C
    t0 = time.perf_counter()
    if cfg.a2c.enabled and rm_dirs and setting.train_items and setting.eval_items:
        a = cfg.a2c
        policies = {"sft": setting.policy}
        train_metrics = {}
        for name, rm_dir in rm_dirs.items():
            console.print(f"rlaif: A2C against the {name} RM ({a.iterations} iterations)", markup=False)
            train_metrics[name] = run_rl(cfg, setting, rm_dir, work / f"a2c_{name}", console)
            policies[name] = str(work / f"a2c_{name}" / "policy")
        if a.control:
            console.print(f"rlaif: A2C control with a constant reward ({a.iterations} iterations)", markup=False)
            train_metrics["control"] = run_rl(cfg, setting, None, work / "a2c_control", console)
            policies["control"] = str(work / "a2c_control" / "policy")
        queries = [join_preference(it.prompt, it.preference) for it in setting.eval_items]
        samples = {}
        for name, path in policies.items():
            pm = model if path == setting.labeler else load_causal_lm(path, dtype=cfg.dtype)
            ptok = tok if path == setting.labeler else load_tokenizer(path)
            samples[name] = sample_responses(env, pm, ptok, queries, a.eval_samples, a.eval_temperature,
                                             a.max_new_tokens, cfg.seed + 1, desc=f"eval {name}",
                                             progress=cfg.progress)
        judge = AILabeler(model, tok, labeler_config(cfg, prompt_config(setting.base_prompt, by_variant[
            cfg.rm.label_variant], str(ex_file) if ex_file else None), by_variant[cfg.rm.label_variant]))
        rl: dict[str, dict[str, Any]] = {}
        contests = [(n, "sft") for n in policies if n != "sft"] + (
            [("ai", next(n for n in rm_dirs if n != "ai"))] if len(rm_dirs) > 1 else [])
        for x, y in contests:
            row: dict[str, Any] = {"judge_win_rate": win_rate_judge(judge, setting.eval_items, samples[x], samples[y],
                                                                    cfg.label_batch, cfg.seed, cfg.progress)}
            if setting.gold is not None:
                w = win_rate_gold(setting.gold, setting.eval_items, samples[x], samples[y])
                row["gold_win_rate"], row["gold_win_rate_se"] = w.win_rate, w.se
            rl[f"{x}_vs_{y}"] = row
        means = {}
        if setting.gold is not None:
            for name, ss in samples.items():
                g = [float(np.mean([setting.gold(it.prompt, s, it.preference) for s in rs]))
                     for it, rs in zip(setting.eval_items, ss)]
                means[name] = mean_se(g)
        rec.results["rl"] = {"contests": rl, "gold_mean": {k: list(v) for k, v in means.items()},
                             "train_last": train_metrics,
                             "example": {"prompt": queries[0], **{k: v[0][0] for k, v in samples.items()}}}
        heads = ["policy A vs B", "AI-judge win rate"] + (["gold win rate (ties half)"] if setting.gold else [])
        rec.table(f"A2C policies vs each other on {len(queries)} held-out prompts x {a.eval_samples} samples "
                  f"({a.iterations} iterations x {a.prompts_per_iteration * a.n} rollouts)", heads,
                  [[k.replace("_vs_", " vs "), r["judge_win_rate"]]
                   + ([f"{r['gold_win_rate']:.3f} ± {r['gold_win_rate_se']:.3f}"] if setting.gold else [])
                   for k, r in rl.items()])
        if means:
            rec.table("mean gold reward of the policies' samples (± s.e. over prompts)",
                      ["policy", "gold reward", "last A2C batch: RM reward", "last A2C batch: KL"],
                      [[n, f"{m:.3f} ± {se:.3f}", train_metrics.get(n, {}).get("reward", math.nan),
                        train_metrics.get(n, {}).get("kl", math.nan)] for n, (m, se) in means.items()])

    timings["a2c_s"] = time.perf_counter() - t0
    rec.results["timings"] = timings
    _plots(rec, variants, sizes, rec.results.get("rl"))
    rec.notes.extend(notes)
    rec.notes.extend(_auto_notes(cfg, variants, sizes, rec.results))
    return rec.finish(console)


def _auto_notes(cfg: Config, variants: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]],
                results: dict[str, Any]) -> list[str]:
    """Plain statements of what the numbers show (computed, not written in advance)."""
    out = []
    pre = {n: r for n, r in variants.items() if r["shots"] == 0 and not r["cot"]}
    if len(pre) > 1:
        best = max(pre, key=lambda n: pre[n]["alignment"])
        out.append(f"preamble: best 0-shot alignment with {best!r} ({pre[best]['alignment']:.3f}); the world's "
                   "policy was trained only on its own judge preamble, so the prs_jax defaults are off-distribution "
                   "for it and are expected to do worse.")
    for n, r in variants.items():
        d = r["alignment"] - r["alignment_no_debias"]
        out.append(f"{n}: debiasing changes alignment by {d:+.3f}; position bias rate {r['position_bias']:.3f}.")
    rms = results.get("reward_models")
    if rms and "ai" in rms:
        other = next((k for k in rms if k not in ("ai", "world_proxy", "untrained")), None)
        if other:
            out.append(f"RM on AI labels: held-out accuracy {rms['ai']['eval_accuracy']:.3f} vs "
                       f"{rms[other]['eval_accuracy']:.3f} on {other} labels (paper, summarisation: 74.2 vs 79.3); "
                       f"the untrained start scores {rms['untrained']['eval_accuracy']:.3f}.")
    rl = results.get("rl")
    if rl:
        for k, r in rl["contests"].items():
            g = f"gold {r['gold_win_rate']:.3f} ± {r['gold_win_rate_se']:.3f}, " if "gold_win_rate" in r else ""
            out.append(f"A2C {k.replace('_vs_', ' vs ')}: {g}AI judge {r['judge_win_rate']:.3f}.")
        if "control_vs_sft" in rl["contests"] and "gold_win_rate" in rl["contests"]["control_vs_sft"]:
            out.append("control: A2C against a constant reward (no signal, only the KL term and the sampling at "
                       f"T={cfg.a2c.temperature}) wins {rl['contests']['control_vs_sft']['gold_win_rate']:.3f} against "
                       "SFT by gold; gains beyond it are what the reward models contributed.")
    if cfg.a2c.enabled:
        out.append(f"A2C is deliberately small here ({cfg.a2c.iterations} iterations of "
                   f"{cfg.a2c.prompts_per_iteration * cfg.a2c.n} rollouts): read its win rates as a direction "
                   "at best, with their standard errors.")
    return out


def _plots(rec: Record, variants: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]],
           rl: dict[str, Any] | None) -> None:
    def draw_alignment(fig: Any) -> None:
        ax = fig.add_subplot(1, 2 if sizes else 1, 1)
        names = list(variants)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [variants[n]["alignment"] for n in names], 0.4,
               yerr=[variants[n]["alignment_se"] for n in names], capsize=3, label="debiased")
        ax.bar(x + 0.2, [variants[n]["alignment_no_debias"] for n in names], 0.4, label="no debiasing")
        ax.plot(x, [variants[n]["position_bias"] for n in names], "k^", label="position-bias rate")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("AI labeler alignment with gold labels")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if sizes:
            ax2 = fig.add_subplot(1, 2, 2)
            items = sorted(sizes.items(), key=lambda kv: kv[1]["params"])
            ps = [r["params"] for _, r in items]
            ax2.errorbar(ps, [r["alignment"] for _, r in items], yerr=[r["alignment_se"] for _, r in items],
                         marker="o", capsize=3, label="alignment")
            ax2.plot(ps, [r["position_bias"] for _, r in items], "k^--", label="position bias")
            for (n, r), p in zip(items, ps):
                ax2.annotate(n, (p, r["alignment"]), fontsize=7)
            ax2.set_xscale("log")
            ax2.set_xlabel("labeler parameters")
            ax2.set_ylim(0, 1)
            ax2.legend(fontsize=8)
            ax2.grid(alpha=0.3)

    rec.figure("alignment.png", draw_alignment, figsize=(11, 4.5) if sizes else (7, 4.5))
    if rl and rl.get("contests"):
        def draw_wins(fig: Any) -> None:
            ax = fig.add_subplot(1, 1, 1)
            names = list(rl["contests"])
            x = np.arange(len(names))
            has_gold = all("gold_win_rate" in rl["contests"][n] for n in names)
            if has_gold:
                ax.bar(x - 0.2, [rl["contests"][n]["gold_win_rate"] for n in names], 0.4,
                       yerr=[rl["contests"][n]["gold_win_rate_se"] for n in names], capsize=3,
                       label="gold reward judge")
            ax.bar(x + (0.2 if has_gold else 0.0), [rl["contests"][n]["judge_win_rate"] for n in names], 0.4,
                   label="AI labeler judge")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xticks(x, [n.replace("_vs_", " vs ") for n in names])
            ax.set_ylim(0, 1)
            ax.set_ylabel("win rate of A over B")
            ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)

        rec.figure("win_rates.png", draw_wins)
