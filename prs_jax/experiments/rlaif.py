"""RLAIF study (Lee et al. 2023, arXiv 2309.00267): AI preference labels vs gold labels, soft-label reward models,
and A2C against an AI-label RM, a gold-label RM, the gold reward itself and a constant reward.

World source (the default). The labelers are the world's SEPARATE AI labelers (prs_jax.world.labelers: three sizes
trained on judge and critique rows, built and cached in the world on first use), never the policy. Pairs are two
samples of the world's SFT policy for one prompt (x with its preference z); the response with the higher GOLD
reward is the "human" label, ties are skipped. RM-train pairs come from `rm_prompts` of the world's training
prompts; alignment and RM-eval pairs from `eval_prompts` held-out prompts (no eval prompt is seen by any RM).

1. Labeler alignment. Every labeler variant (a labeler size, the prompt preamble, few-shot exemplars, chain of
   thought, self-consistency k) labels the first `align_pairs` held-out pairs in both candidate orders. Per pair:
   the debiased label (both orders averaged), each single-order label (what a `both_orders=False` run computes)
   and whether the same POSITION won in both orders (position bias).
2. Reward models. The variant `rm.label_variant` soft-labels every RM-train pair; one RM is trained on these
   soft labels (`loss.soft_labels=True`), one on the gold labels of the same pairs (hard, Bradley-Terry). Both
   start from the SFT policy with the same fresh head and settings; each held-out pair's two scores are recorded
   for both, for that start ("untrained") and for the world's proxy RM.
3. RL (`a2c.arms`): A2C (prs_jax.train.a2c.run_a2c) from the SFT policy on the RM-train prompts against
   rlaif = the AI-label RM, rlhf = the gold-label RM, oracle = the gold reward itself (a positive control: the
   procedure can improve the policy when its signal is true), constant = a constant reward (a negative control:
   what the procedure does without a signal). Every policy then samples `a2c.eval_samples` responses per
   held-out prompt with one engine seed (common random numbers); each sample's gold reward is recorded, and the
   AI labeler's both-order judgement of every policy's sample j against SFT's sample j.

`measure_study` writes OUT/records.jsonl (the per-pair and per-prompt raw values above) and OUT/measure.json
(config, labeler gates, timings, the declared protocol); `report_study` makes the tables (95% CIs pooled over the
world seeds of `pool_dirs`), the plots and the protocol's verdicts from those alone (`--report`).

Endpoint names (units: pairs for align / debias / bias / rm, held-out prompts for gold / win):
  align:V        debiased label of variant V agrees with gold (1, tie 1/2) minus 1/2
  align:V:W      that agreement of V minus W's, per pair
  debias:V       V's debiased agreement minus the mean of its two single-order agreements
  bias:V | bias:V:W   V's same-position-in-both-orders indicator (minus W's)
  rm:R | rm:R:S  RM R ranks the pair as gold does (1, tie 1/2) minus 1/2 (minus S's); R in ai, gold, untrained,
                 proxy
  gold:P:Q       mean gold reward of policy P's samples minus Q's, per prompt; P, Q in sft and the A2C arms
  win:P:Q        share of samples j where P's beats Q's by the gold reward (ties 1/2) minus 1/2, per prompt

Real source (`source.kind: real`, the `full` config): the pairs are human preference pairs (`real.pairs`, chosen =
the human's choice, shown in a random order), labelers are checkpoint directories (`variants[].labeler`, default
`real.labeler`), RL prompts come from `source.real.prompt_set`. There is no gold reward: alignment and RM accuracy
are against the human labels, the oracle arm is not available, and RL is judged by the AI labeler only.
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

from prs_jax.config import check_ranges, to_dict
from prs_jax.data.io import write_jsonl, write_text_atomic
from prs_jax.experiments.common import Record, Source, measured_config, param_count, pool_measured
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.policy_tools import config_digest
from prs_jax.experiments.protocol import Protocol, pooled_ci, report_protocol
from prs_jax.feedback.labeler import AILabeler, LabelerConfig
from prs_jax.feedback.metrics import alignment_credit, same_position
from prs_jax.feedback.prompts import PromptConfig
from prs_jax.models.sharding import MeshConfig
from prs_jax.strategies.base import PromptItem, join_preference
from prs_jax.world.labelers import LabelerBuildConfig

Preamble = Literal["world", "base", "detailed"]
Arm = Literal["rlaif", "rlhf", "oracle", "constant"]
ARM_REWARD = {"rlaif": "the RM trained on AI soft labels", "rlhf": "the RM trained on gold (human) labels",
              "oracle": "the gold reward itself (positive control)", "constant": "a constant reward (negative control)"}
RECORDS, MEASURE_FACTS = "records.jsonl", "measure.json"


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True)
class LabelerVariant:
    """One AI-labeler set-up: which labeler (a world labeler size, or a checkpoint directory; "" = the default:
    the world's largest labeler, or real.labeler), preamble, few-shot exemplars, chain of thought,
    self-consistency k."""

    name: str
    labeler: str = ""
    preamble: Preamble = "world"  # world: the labeler's trained prompt; base / detailed: prs_jax defaults
    shots: int = 0
    cot: bool = False
    self_consistency: int = 1

    def __post_init__(self) -> None:
        if self.self_consistency > 1 and not self.cot:
            raise ValueError(f"variant {self.name!r}: self_consistency > 1 samples rationales; set cot: true.")
        if self.shots < 0:
            raise ValueError(f"variant {self.name!r}: shots must be >= 0 (got {self.shots}).")
        if ":" in self.name or not self.name:
            raise ValueError(f"variant {self.name!r}: names are non-empty and have no ':' (endpoint separator).")


@dataclasses.dataclass(frozen=True)
class RMSettings:
    """The two reward models (AI soft labels vs gold hard labels): same init, data size and optimisation."""

    label_variant: str = "large"
    steps: int = 120
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 8
    max_length: int = 192


@dataclasses.dataclass(frozen=True)
class A2CSettings:
    """A2C (prs_jax.train.a2c.run_a2c) per arm; evaluation samples per held-out prompt."""

    arms: tuple[Arm, ...] = ("rlaif", "rlhf", "oracle", "constant")
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

    def __post_init__(self) -> None:
        if len(set(self.arms)) != len(self.arms):
            raise ValueError(f"a2c.arms: {list(self.arms)} repeats an arm.")
        check_ranges(self, "a2c", {"iterations": ">= 1", "prompts_per_iteration": ">= 1", "n": ">= 1",
                                   "eval_samples": ">= 1", "max_new_tokens": ">= 1"})


@dataclasses.dataclass(frozen=True)
class RealPairs:
    """Human preference pairs and the default labeler for `source.kind: real` (see feedback.run.read_pairs for
    the accepted layouts; chosen/rejected columns mean the human preferred `chosen`)."""

    pairs: str = ""
    split: str | None = None
    max_pairs: int | None = None
    labeler: str = ""  # default: source.real.policy
    task: Literal["summarize", "helpful", "harmless"] = "helpful"
    exemplars: str | None = None  # JSONL of solved pairs for the few-shot variants (see feedback.prompts)


def _default_variants() -> tuple[LabelerVariant, ...]:
    return (LabelerVariant("small", "small"), LabelerVariant("medium", "medium"), LabelerVariant("large", "large"),
            LabelerVariant("large_cot", "large", cot=True),
            LabelerVariant("large_cot_sc4", "large", cot=True, self_consistency=4))


@dataclasses.dataclass(frozen=True)
class Config:
    """The RLAIF study (see the module docstring)."""

    source: Source = dataclasses.field(default_factory=Source)
    out_dir: str = "runs/experiments/rlaif"
    work_dir: str = "runs/experiments/rlaif/work"  # RMs and A2C policies under work_dir/<world key>
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    mesh: MeshConfig | None = None  # trainer mesh for the RM and A2C runs (real checkpoints on accelerators)
    progress: bool = True
    # pairs (world source)
    rm_prompts: int = 768  # training prompts whose pairs train the RMs (and whose prompts A2C trains on)
    eval_prompts: int = 256  # held-out prompts: alignment and RM-eval pairs, A2C evaluation
    samples_per_prompt: int = 8  # responses per prompt -> samples_per_prompt // 2 disjoint pairs
    temperature: float = 1.0
    max_new_tokens: int = 48
    rm_eval_fraction: float = 0.25  # real source only: share of the human pairs held out for RM evaluation
    # labelers
    labelers: LabelerBuildConfig = LabelerBuildConfig()  # the world's labelers (trained on first use)
    align_pairs: int = 600  # held-out pairs every variant labels
    variants: tuple[LabelerVariant, ...] = dataclasses.field(default_factory=_default_variants)
    label_batch: int = 64  # pairs per labeler call
    cot_max_new_tokens: int = 64
    sc_temperature: float = 0.7
    sc_top_k: int = 40
    rm: RMSettings = RMSettings()
    a2c: A2CSettings = A2CSettings()
    a2c_enabled: bool = True
    real: RealPairs = RealPairs()
    # declared endpoints (world source), evaluated by the report per world seed and pooled over pool_dirs
    protocol: Protocol = dataclasses.field(default_factory=lambda: Protocol(seeds=(0,), units=1))
    pool_dirs: tuple[str, ...] = ()  # report only: OUT directories of other world seeds pooled with out_dir
    n_boot: int = 2000  # bootstrap resamples of the tables' 95% intervals

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variants: names must be unique (got {names}).")
        if self.rm.label_variant not in names:
            raise ValueError(f"rm.label_variant: {self.rm.label_variant!r} is not one of the variants {names}.")
        if self.samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt must be >= 2 (got {self.samples_per_prompt}).")
        if not 0 < self.rm_eval_fraction < 1:
            raise ValueError(f"rm_eval_fraction must be in (0, 1) (got {self.rm_eval_fraction}).")
        check_ranges(self, "", {"rm_prompts": ">= 1", "eval_prompts": ">= 1", "align_pairs": ">= 1",
                                "label_batch": ">= 1", "cot_max_new_tokens": ">= 1", "max_new_tokens": ">= 1"})
        for e in self.protocol.endpoints:
            check_endpoint(self, e.name)


RM_NAMES = ("ai", "gold", "human", "untrained", "proxy")  # report order


def measured_names(cfg: Config) -> dict[str, list[str]]:
    """What a run of `cfg` records, by endpoint kind: variants, RMs and policies."""
    variants = [v.name for v in cfg.variants]
    world = cfg.source.kind == "world"
    rms = ["ai", "gold" if world else "human", "untrained"] + (
        ["proxy"] if world or cfg.source.real.reward_model else []) if cfg.rm.steps > 0 else []
    policies = ["sft", *runnable_arms(cfg, gold=world)] if cfg.a2c_enabled else []
    return {"align": variants, "debias": variants, "bias": variants, "rm": rms, "gold": policies, "win": policies}


def parse_endpoint(name: str) -> tuple[str, list[str]]:
    """(kind, arguments) of an endpoint name (see the module docstring)."""
    kind, *args = name.split(":")
    arity = {"align": (1, 2), "debias": (1,), "bias": (1, 2), "rm": (1, 2), "gold": (2,), "win": (2,)}
    if kind not in arity or len(args) not in arity[kind]:
        raise ValueError(f"protocol endpoint {name!r}: expected one of align:V[:W], debias:V, bias:V[:W], "
                         "rm:R[:S], gold:P:Q, win:P:Q.")
    return kind, args


def check_endpoint(cfg: Config, name: str) -> None:
    """Raise a ValueError naming the endpoint when it refers to something the config does not measure."""
    kind, args = parse_endpoint(name)
    known = measured_names(cfg)[kind]
    bad = [a for a in args if a not in known]
    if bad:
        raise ValueError(f"protocol endpoint {name!r}: {bad} not measured by this config (known for {kind!r}: "
                         f"{known}).")


# ------------------------------------------------------------------------------------------------ data
@dataclasses.dataclass(frozen=True)
class Pair:
    """A labelled pair: the prompt (text or messages), responses A and B (text or messages), which one the
    human / gold label prefers (0 = A, 1 = B), the RM split, and its statistical unit (the prompt id in the
    world, whose pairs share samples; the pair itself for human pairs)."""

    id: str
    prompt: Any
    a: Any
    b: Any
    human: int
    split: Literal["train", "eval"]
    unit: str = ""


def sample_responses(env: StudyEnv, model: Any, tok: Any, queries: Sequence[str], m: int, temperature: float,
                     max_new_tokens: int, seed: int, ids: Sequence[str] | None = None, batch: int = 64,
                     desc: str = "sample", progress: bool = True) -> list[list[str]]:
    """m responses per query (a user chat turn) of `model`, sampled on the env's engine in batches of prompts;
    keys derive from (seed, the query's id, the tree path), so `batch` changes nothing."""
    from prs_jax.tree.sampling import SamplingParams

    ids = [str(i) for i in range(len(queries))] if ids is None else list(ids)
    out: list[list[str]] = []
    for s in tqdm(range(0, len(queries), batch), desc=desc, unit="batch", disable=not progress):
        engine = env.engine(seed, model=model, tokenizer=tok)
        roots = engine.add_prompts([[{"role": "user", "content": q}] for q in queries[s:s + batch]],
                                   ids=ids[s:s + batch])
        kids = engine.expand(roots, m, SamplingParams(temperature=temperature), max_new_tokens=max_new_tokens)
        out += [[k.text for k in ks] for ks in kids]
    return out


def make_pairs(items: Sequence[PromptItem], responses: Sequence[Sequence[str]],
               gold: Callable[[str, str, str | None], float], split: Literal["train", "eval"]) -> list[Pair]:
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
                              a, b, 0 if ga > gb else 1, split, it.id))
    return pairs


@dataclasses.dataclass
class Setting:
    """What the study runs on: the policy, pairs, RL prompts, the gold reward if any, exemplars."""

    policy: str
    pairs: list[Pair]
    train_items: list[PromptItem]
    eval_items: list[PromptItem]
    base_prompt: PromptConfig
    exemplar_rows: list[dict[str, Any]]
    gold: Callable[[str, str, str | None], float] | None
    proxy_rm: str | None = None
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


def _sampled_pairs_setting(cfg: Config, env: StudyEnv, console: Console) -> Setting:
    """Gold-labelled pairs of the policy's own samples: RM-train pairs on training prompts, alignment and RM-eval
    pairs on held-out prompts."""
    from prs_jax.world.corpus import JUDGE_PROMPT

    train_items, eval_items = env.split(cfg.rm_prompts, cfg.eval_prompts)
    pairs = []
    for split, items in (("train", train_items), ("eval", eval_items)):
        console.print(f"rlaif: sampling {cfg.samples_per_prompt} responses for each of {len(items)} "
                      f"{'training' if split == 'train' else 'held-out'} prompts", markup=False)
        responses = sample_responses(env, env.model, env.tokenizer,
                                     [join_preference(it.prompt, it.preference) for it in items],
                                     cfg.samples_per_prompt, cfg.temperature, cfg.max_new_tokens, cfg.seed,
                                     ids=[it.id for it in items], desc=f"{split} pairs", progress=cfg.progress)
        pairs += make_pairs(items, responses, env.gold, split)
    n_cand = (len(train_items) + len(eval_items)) * (cfg.samples_per_prompt // 2)
    facts = {"candidate_pairs": n_cand, "train_prompts": len(train_items), "eval_prompts": len(eval_items)}
    return Setting(policy=str(env.policy), pairs=pairs, train_items=train_items, eval_items=eval_items,
                   base_prompt=JUDGE_PROMPT, exemplar_rows=_world_exemplars(env.world.data / "rm_train.jsonl"),
                   gold=env.gold, proxy_rm=str(env.reward_model), facts=facts)


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


def _human_pairs_setting(cfg: Config, env: StudyEnv) -> Setting:
    from prs_jax.errors import ConfigError
    from prs_jax.feedback.run import LabelRunConfig, read_pairs

    spec = env.source.real
    labeler = cfg.real.labeler or spec.policy
    if not cfg.real.pairs or not spec.policy:
        raise ConfigError("rlaif with source.kind=real needs real.pairs (human preference pairs) and "
                          "source.real.policy (the SFT policy); real.labeler defaults to the policy.")
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
        pairs.append(Pair(r.id, r.prompt, a, b, human, "eval" if i in eval_idx else "train", r.id))
    pairs.sort(key=lambda p: p.split != "eval")  # the alignment pairs are the first eval pairs
    items = env.real_prompts() if spec.prompts_path else []
    n_items_eval = max(1, round(cfg.rm_eval_fraction * len(items))) if items else 0
    ex_rows = []
    if cfg.real.exemplars:
        ex_rows = [json.loads(line) for line in Path(cfg.real.exemplars).read_text().splitlines() if line.strip()]
    return Setting(policy=spec.policy, pairs=pairs, train_items=items[:len(items) - n_items_eval],
                   eval_items=items[len(items) - n_items_eval:], base_prompt=PromptConfig(task=cfg.real.task),
                   exemplar_rows=ex_rows, gold=None, proxy_rm=spec.reward_model or None,
                   facts={"share_a_preferred": float(np.mean([p.human == 0 for p in pairs])) if pairs else math.nan})


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
    """Both-order soft labels of `pairs` in batches (rationales are keyed by each pair's tokens, so `batch`
    changes nothing)."""
    t0 = time.perf_counter()
    p_a, q_ab, q_ba = [], [], []
    rationale = None
    for s in tqdm(range(0, len(pairs), batch), desc=desc, unit="batch", disable=not progress):
        chunk = pairs[s:s + batch]
        labs = labeler.label([labeler_context(p.prompt) for p in chunk], [p.a for p in chunk], [p.b for p in chunk],
                             seed=seed)
        for lab in labs:
            p_a.append(lab.p_a)
            q_ab.append(float(lab.ab.dist[0]))
            q_ba.append(float(lab.ba.dist[0]) if lab.ba is not None else math.nan)
            if rationale is None and lab.ab.rationales:
                rationale = lab.ab.rationales[0]
    return Labels(np.asarray(p_a, float), np.asarray(q_ab, float), np.asarray(q_ba, float),
                  time.perf_counter() - t0, rationale)


def labeler_config(cfg: Config, prompt: PromptConfig, variant: LabelerVariant) -> LabelerConfig:
    """The AILabeler config of a variant (both orders always: no debiasing is read from one order)."""
    return LabelerConfig(prompt=prompt, both_orders=True, cot=variant.cot, cot_max_new_tokens=cfg.cot_max_new_tokens,
                         self_consistency=variant.self_consistency, temperature=cfg.sc_temperature,
                         top_k=cfg.sc_top_k)


def labeler_path(cfg: Config, env: StudyEnv, variant: LabelerVariant, console: Console) -> str:
    """The checkpoint directory of a variant's labeler: a world labeler size (trained on first use), a directory,
    or the default (the world's largest labeler; real: real.labeler or the policy)."""
    name = variant.labeler
    if env.kind == "world":
        sizes = [s.name for s in cfg.labelers.sizes]
        name = name or max(cfg.labelers.sizes, key=lambda s: s.hidden_size * s.num_hidden_layers).name
        if name in sizes:
            return str(env.labeler_path(name, cfg.labelers, console))
    else:
        name = name or cfg.real.labeler or env.source.real.policy
    if not Path(name).is_dir():
        what = (f"neither a labeler size of the world ({[s.name for s in cfg.labelers.sizes]}) nor"
                if env.kind == "world" else "not")
        raise FileNotFoundError(f"variants[{variant.name}].labeler: {name!r} is {what} a checkpoint directory "
                                "(config.json, *.safetensors, tokenizer files).")
    return name


# ------------------------------------------------------------------------------------------------ per-unit values
def align_units(r: dict[str, Any]) -> dict[str, np.ndarray]:
    """One align record's per-pair values: debiased agreement, single-order agreements, position bias."""
    human, q_ab, q_ba = r["human"], np.asarray(r["q_ab"], float), np.asarray(r["q_ba"], float)
    a_first = alignment_credit(q_ab, human)
    b_first = alignment_credit(1.0 - q_ba, human)  # with B first, P(A) = P(position 2)
    return {"debiased": alignment_credit(r["p_a"], human), "a_first": a_first, "b_first": b_first,
            "no_debias": (a_first + b_first) / 2, "bias": same_position(q_ab, q_ba)}


def unit_means(r: dict[str, Any], values: np.ndarray) -> dict[str, float]:
    """Per-pair values of a record averaged over each statistical unit (its `units`: the prompt in the world,
    whose pairs share samples, so pairs are not independent)."""
    sums: dict[str, list[float]] = {}
    for u, v in zip(r["units"], np.asarray(values, float).tolist()):
        sums.setdefault(u, []).append(v)
    return {u: float(np.mean(v)) for u, v in sums.items()}


def rm_credit(r: dict[str, Any]) -> np.ndarray:
    """Per eval pair: 1 when the RM scores the gold/human-preferred answer higher, 0 when lower, 1/2 on a tie."""
    a, b, h = np.asarray(r["a"], float), np.asarray(r["b"], float), np.asarray(r["human"], int)
    return np.where(a == b, 0.5, ((a > b) == (h == 0)).astype(float))


# ------------------------------------------------------------------------------------------------ reward models
def _rm_rows(pairs: Sequence[Pair], p_a: np.ndarray | None) -> list[dict[str, Any]]:
    """RM training rows: soft labels (chosen = A, p_chosen = P(A)) or gold/human hard labels (chosen = better)."""
    rows = []
    for i, p in enumerate(pairs):
        # a text prompt keeps text responses (the chat template wraps both); a conversation gets messages
        a, b = (p.a, p.b) if isinstance(p.prompt, str) else (_as_messages(p.a), _as_messages(p.b))
        if p_a is not None:
            rows.append({"id": p.id, "prompt": p.prompt, "chosen": a, "rejected": b, "p_chosen": float(p_a[i])})
        else:
            chosen, rejected = (a, b) if p.human == 0 else (b, a)
            rows.append({"id": p.id, "prompt": p.prompt, "chosen": chosen, "rejected": rejected, "p_chosen": 1.0})
    return rows


def _as_messages(response: Any) -> Any:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def _digest(run: Any, *files: Path) -> str:
    """A run directory's name: its settings (progress bars aside) and data."""
    return config_digest(to_dict(dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, progress=False))),
                         *files)


def _fresh_or_done(run_dir: Path) -> bool:
    """True when `run_dir` holds a finished export (a re-run of identical settings and data reuses it); otherwise
    clears it so that no stale trainer checkpoint is resumed."""
    if (run_dir / "export" / "config.json").is_file():
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def train_rm(cfg: Config, init: str, train_file: Path, eval_file: Path, soft: bool, work: Path, name: str,
             console: Console) -> str:
    """One RM run (run_train "rm") from `init`, in a directory named by its settings and data; returns the
    export directory."""
    from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    r = cfg.rm
    base = TrainRunConfig(
        model=init, dtype=cfg.dtype,
        data=DataConfig(train=str(train_file), eval=str(eval_file), max_length=r.max_length, max_prompt_length=None,
                        use_chat_template=True, pad_multiple=32, on_too_long="drop"),
        loss=LossConfig(soft_labels=soft),
        optim=OptimConfig(lr=r.lr, warmup_steps=r.warmup_steps, schedule="cosine", min_lr_ratio=0.05),
        trainer=TrainerConfig(steps=r.steps, batch_size=r.batch_size, seed=cfg.seed, log_every=10,
                              progress=cfg.progress, async_checkpoint=False, tensorboard=False, group_by_length=4,
                              mesh=cfg.mesh))
    run_dir = work / f"rm_{name}-{_digest(base, train_file, eval_file)}"
    if not _fresh_or_done(run_dir):
        trainer = dataclasses.replace(base.trainer, out_dir=str(run_dir / "run"))
        run_train("rm", dataclasses.replace(base, trainer=trainer, export_dir=str(run_dir / "export")),
                  console=console)
    return str(run_dir / "export")


def rm_scores(rm_dir: str, pairs: Sequence[Pair], dtype: str, init_head: bool = False, head_name: str | None = None
              ) -> tuple[list[float], list[float]]:
    """Scores of A and of B for each pair (chat formatter). `init_head`: the checkpoint is a causal LM given a
    fresh head, as run_train("rm") starts (same seed); `head_name`: the RM's head parameter (real proxy RMs)."""
    from prs_jax.models import load_reward_model, load_tokenizer
    from prs_jax.tree.scoring import RewardScorer

    scorer = RewardScorer(load_reward_model(rm_dir, dtype=dtype, init_head=init_head, head_name=head_name),
                          load_tokenizer(rm_dir))
    ctx = [_prompt_text(p.prompt) for p in pairs]
    sa = scorer.score_pairs([(c, _resp_text(p.a)) for c, p in zip(ctx, pairs)])
    sb = scorer.score_pairs([(c, _resp_text(p.b)) for c, p in zip(ctx, pairs)])
    return [float(x) for x in sa], [float(x) for x in sb]


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
    """A constant reward: the A2C negative control (what the procedure alone does to the policy)."""
    return [0.0] * len(responses)


def run_rl(cfg: Config, setting: Setting, arm: Arm, rm_dirs: dict[str, str], work: Path, console: Console) -> str:
    """A2C (run_a2c) of the SFT policy for one arm on the RM-train prompts, in a directory named by its settings
    and data; returns the exported policy directory."""
    from prs_jax.train.a2c import A2CConfig, A2CRunConfig, PromptsConfig, RewardConfig, RolloutConfig, run_a2c
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    a = cfg.a2c
    prompts_file = write_jsonl(work / "a2c_prompts.jsonl", [
        {"id": it.id, "prompt": it.prompt, "preference": it.preference} for it in setting.train_items])
    reward = {"rlaif": lambda: RewardConfig(reward_model=rm_dirs["ai"]),
              "rlhf": lambda: RewardConfig(reward_model=rm_dirs["gold" if setting.gold else "human"]),
              # the A2C prompts are x, a blank line, z: gold_reward splits them (world.task.split_query)
              "oracle": lambda: RewardConfig(callable="prs_jax.world.task:gold_reward", interface="pair"),
              "constant": lambda: RewardConfig(callable="prs_jax.experiments.rlaif:zero_reward")}[arm]()
    base = A2CRunConfig(
        model=setting.policy, dtype=cfg.dtype,
        prompts=PromptsConfig(path=str(prompts_file), include_preference=True), reward=reward,
        rollout=RolloutConfig(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature),
        a2c=A2CConfig(beta=a.beta, kl_mode=a.kl_mode), optim=OptimConfig(lr=a.lr, clip_norm=1.0),
        trainer=TrainerConfig(steps=a.iterations, batch_size=a.prompts_per_iteration * a.n, seed=cfg.seed,
                              log_every=1, progress=cfg.progress, async_checkpoint=False, tensorboard=False,
                              mesh=cfg.mesh))
    run_dir = work / f"a2c_{arm}-{_digest(base, prompts_file)}"
    if not _fresh_or_done(run_dir):
        run_a2c(dataclasses.replace(base, trainer=dataclasses.replace(base.trainer, out_dir=str(run_dir / "run")),
                                    export_dir=str(run_dir / "export")), console=console)
    return str(run_dir / "export")


# ------------------------------------------------------------------------------------------------ measure
POOL_FREE = ("source.world.seed", "source.world.path")  # what may differ between the pooled OUT directories


# config keys that do not decide the records (where they go, the protocol, pooling and report settings)
NOT_MEASURED = ("out_dir", "work_dir", "pool_dirs", "protocol", "n_boot", "progress")


def _judge_records(labeler: AILabeler, items: Sequence[PromptItem], a: Sequence[Sequence[str]],
                   b: Sequence[Sequence[str]], cfg: Config, desc: str) -> dict[str, list[list[float]]]:
    """The AI labeler's both-order judgement of sample j of A against sample j of B, per prompt: P(position 1)
    with A first (q_ab) and with B first (q_ba), as [prompts][samples]."""
    fake = [Pair(f"{i}/{j}", [{"role": "user", "content": join_preference(it.prompt, it.preference)}], x, y, 0,
                 "eval") for i, (it, xs, ys) in enumerate(zip(items, a, b)) for j, (x, y) in enumerate(zip(xs, ys))]
    keep = [k for k, p in enumerate(fake) if p.a.strip() and p.b.strip()]  # pair readers refuse empty responses
    labs = label_pairs(labeler, [fake[k] for k in keep], cfg.label_batch, cfg.seed, desc, cfg.progress)
    q_ab, q_ba = np.full(len(fake), 0.5), np.full(len(fake), 0.5)  # an empty response: no judgement (a tie)
    q_ab[keep], q_ba[keep] = labs.q_ab, labs.q_ba
    m = len(a[0]) if a else 0
    return {"q_ab": q_ab.reshape(-1, m).tolist() if m else [], "q_ba": q_ba.reshape(-1, m).tolist() if m else []}


def measure_study(cfg: Config, console: Any = None) -> Path:
    """Measure: pairs, every variant's labels of the alignment pairs, the RMs' scores of the held-out pairs, the
    A2C policies' held-out samples; writes OUT/records.jsonl and OUT/measure.json. No tables."""
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    t_all = time.perf_counter()
    env = StudyEnv.from_source(cfg.source, console, study="rlaif", require=(), dtype=cfg.dtype)
    work = Path(cfg.work_dir) / (str(env.world.report.get("key")) if env.world is not None else "real")
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    setting = _sampled_pairs_setting(cfg, env, console) if env.kind == "world" else _human_pairs_setting(cfg, env)
    pairs = setting.pairs
    timings["pairs_s"] = time.perf_counter() - t0
    if not pairs:
        raise ValueError("rlaif: no labelled pairs (every sampled pair was a gold tie or empty); raise rm_prompts, "
                         "eval_prompts or samples_per_prompt." if env.kind == "world" else
                         f"rlaif: {cfg.real.pairs}: no pair with a human choice.")
    ex_file = write_jsonl(work / "exemplars.jsonl", setting.exemplar_rows) if setting.exemplar_rows else None
    for v in cfg.variants:
        if v.shots > len(setting.exemplar_rows):
            raise ValueError(f"variants[{v.name}].shots: {v.shots} exemplars asked for, {len(setting.exemplar_rows)} "
                             "available (" + ("the world offers 4" if env.kind == "world" else
                                              "set real.exemplars to a JSONL of solved pairs") + ").")
    train_pairs = [p for p in pairs if p.split == "train"]
    eval_pairs = [p for p in pairs if p.split == "eval"]
    align = eval_pairs[:cfg.align_pairs]
    warnings = _unit_shortfalls(cfg, align, eval_pairs, setting.eval_items)
    for w in warnings:
        console.print(f"rlaif: warning: {w}", markup=False)
    records: list[dict[str, Any]] = []
    gates = env.labelers(cfg.labelers, console)["gates"] if env.kind == "world" else None
    # ---------------------------------------------------------------- 1. labeler variants
    t0 = time.perf_counter()
    loaded: dict[str, tuple[Any, Any]] = {}
    variants: dict[str, dict[str, Any]] = {}
    judge: AILabeler | None = None  # the RM's label variant: labels the RM-train pairs and judges the policies
    for v in cfg.variants:
        path = labeler_path(cfg, env, v, console)
        if path not in loaded:
            loaded[path] = (load_causal_lm(path, dtype=cfg.dtype), load_tokenizer(path))
        model, tok = loaded[path]
        labeler = AILabeler(model, tok, labeler_config(cfg, prompt_config(
            setting.base_prompt, v, str(ex_file) if ex_file else None), v))
        if v.name == cfg.rm.label_variant:
            judge = labeler
        labels = label_pairs(labeler, align, cfg.label_batch, cfg.seed, f"align {v.name}", cfg.progress)
        records.append({"kind": "align", "variant": v.name, **_pair_fields(align), "p_a": labels.p_a.tolist(),
                        "q_ab": labels.q_ab.tolist(), "q_ba": labels.q_ba.tolist()})
        variants[v.name] = {**dataclasses.asdict(v), "labeler_path": path, "params": param_count(model),
                            "seconds": labels.seconds, "example_rationale": labels.example_rationale}
        u = align_units(records[-1])
        console.print(f"  {v.name}: alignment {u['debiased'].mean():.3f} (no debiasing {u['no_debias'].mean():.3f}), "
                      f"position bias {u['bias'].mean():.3f}, {labels.seconds:.0f} s", markup=False)
    loaded.clear()  # only the judge's labeler stays in memory for the RM and RL parts
    timings["labelers_s"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- 2. reward models
    t0 = time.perf_counter()
    rm_dirs: dict[str, str] = {}
    label_name = "gold" if setting.gold else "human"
    if cfg.rm.steps > 0 and train_pairs and eval_pairs:
        v = cfg.rm.label_variant
        tl = label_pairs(judge, train_pairs, cfg.label_batch, cfg.seed, f"AI labels ({v})", cfg.progress)
        records.append({"kind": "rm_labels", "variant": v, **_pair_fields(train_pairs), "p_a": tl.p_a.tolist()})
        eval_file = write_jsonl(work / "rm_eval.jsonl", _rm_rows(eval_pairs, None))
        for name, p_a in (("ai", tl.p_a), (label_name, None)):
            train_file = write_jsonl(work / f"rm_train_{name}.jsonl", _rm_rows(train_pairs, p_a))
            console.print(f"rlaif: RM on {'AI soft' if p_a is not None else label_name} labels "
                          f"({len(train_pairs)} pairs, {cfg.rm.steps} steps of {cfg.rm.batch_size})", markup=False)
            rm_dirs[name] = train_rm(cfg, setting.policy, train_file, eval_file, p_a is not None, work, name, console)
        scored = [(n, d, False, None) for n, d in rm_dirs.items()] + [("untrained", setting.policy, True, None)]
        if setting.proxy_rm:
            scored.append(("proxy", setting.proxy_rm, False, env.rm_head_name))
        for name, d, init_head, head in scored:
            a, b = rm_scores(d, eval_pairs, cfg.dtype, init_head=init_head, head_name=head)
            records.append({"kind": "rm", "rm": name, **_pair_fields(eval_pairs), "a": a, "b": b})
            console.print(f"  RM {name}: held-out accuracy {rm_credit(records[-1]).mean():.3f}", markup=False)
    timings["reward_models_s"] = time.perf_counter() - t0
    # ---------------------------------------------------------------- 3. A2C
    t0 = time.perf_counter()
    arms = runnable_arms(cfg, gold=setting.gold is not None) if rm_dirs or cfg.rm.steps == 0 else []
    if cfg.a2c_enabled and arms and setting.train_items and setting.eval_items:
        a = cfg.a2c
        policies = {"sft": setting.policy}
        for arm in arms:
            console.print(f"rlaif: A2C {arm} against {ARM_REWARD[arm]} ({a.iterations} iterations)", markup=False)
            policies[arm] = run_rl(cfg, setting, arm, rm_dirs, work, console)
        items = setting.eval_items
        queries = [join_preference(it.prompt, it.preference) for it in items]
        ids = [it.id for it in items]
        samples: dict[str, list[list[str]]] = {}
        for name, path in policies.items():
            model = env.model if name == "sft" else env.load_policy(path)
            samples[name] = sample_responses(env, model, env.tokenizer, queries, a.eval_samples, a.eval_temperature,
                                             a.max_new_tokens, cfg.seed + 1, ids=ids, desc=f"eval {name}",
                                             progress=cfg.progress)  # one seed: common random numbers
            row: dict[str, Any] = {"kind": "policy", "policy": name, "ids": ids, "example": samples[name][0][0]}
            if setting.gold is not None:
                row["gold"] = [[float(setting.gold(it.prompt, s, it.preference)) for s in ss]
                               for it, ss in zip(items, samples[name])]
            if name != "sft":
                row["judge_vs_sft"] = _judge_records(judge, items, samples[name], samples["sft"], cfg,
                                                     f"judge {name} vs sft")
            records.append(row)
    else:
        arms = []
    timings["a2c_s"] = time.perf_counter() - t0
    out = Path(cfg.out_dir)
    write_jsonl(out / RECORDS, records)
    world = None if env.world is None else {
        "key": env.world.report.get("key"), "root": str(env.world.root), "seed": env.world.config.seed}
    facts = {"config": measured_config(cfg, NOT_MEASURED), "source": cfg.source.kind, "world": world,
             "world_seed": None if world is None else world["seed"], "env": env.info,
             "policy_params": param_count(env.model), "labeler_gates": gates, "variants": variants,
             "pairs": {"total": len(pairs), "train": len(train_pairs), "eval": len(eval_pairs), "align": len(align),
                       "align_units": len({p.unit for p in align}), "eval_units": len({p.unit for p in eval_pairs}),
                       **setting.facts},
             "rm_dirs": rm_dirs, "arms": arms, "labels": label_name, "warnings": warnings, "timings": timings,
             "measure_seconds": time.perf_counter() - t_all,
             "protocol_declared": json.loads(json.dumps(to_dict(cfg.protocol)))}
    write_text_atomic(out / MEASURE_FACTS, json.dumps(facts, indent=2))
    return out


def _pair_fields(pairs: Sequence[Pair]) -> dict[str, list]:
    """What every per-pair record carries: pair ids, statistical units and the gold / human labels."""
    return {"ids": [p.id for p in pairs], "units": [p.unit for p in pairs], "human": [p.human for p in pairs]}


def runnable_arms(cfg: Config, gold: bool) -> list[str]:
    """The A2C arms this config can run: rlaif / rlhf need trained RMs (rm.steps > 0), oracle the gold reward."""
    return [x for x in cfg.a2c.arms if (x not in ("rlaif", "rlhf") or cfg.rm.steps > 0) and (x != "oracle" or gold)]


def _unit_shortfalls(cfg: Config, align: Sequence[Pair], eval_pairs: Sequence[Pair],
                     eval_items: Sequence[PromptItem]) -> list[str]:
    """Endpoints whose declared units exceed what was sampled (they will read "untestable here"): said at once,
    not after the RM and RL parts."""
    have = {"align": len({p.unit for p in align}), "rm": len({p.unit for p in eval_pairs}),
            "gold": len(eval_items)}
    out = []
    for e in cfg.protocol.endpoints:
        kind = parse_endpoint(e.name)[0]
        group = {"debias": "align", "bias": "align", "win": "gold"}.get(kind, kind)
        need = cfg.protocol.units if e.units is None else e.units
        if have[group] < need:
            out.append(f"endpoint {e.name!r} declares {need} units per seed, the pairs give {have[group]}; "
                       "raise eval_prompts / align_pairs or lower its units.")
    return out


# ------------------------------------------------------------------------------------------------ report
def find(records: Sequence[dict[str, Any]], kind: str, **match: str) -> dict[str, Any] | None:
    """The first record of `kind` whose fields equal `match`, or None."""
    return next((r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())), None)


def _need(records: Sequence[dict[str, Any]], what: str, kind: str, **match: str) -> dict[str, Any]:
    r = find(records, kind, **match)
    if r is None:
        raise ValueError(f"protocol endpoint {what!r}: no {kind} record of {match}; measure again with it.")
    return r


def _paired(x: dict[str, float], y: dict[str, float] | None) -> np.ndarray:
    if y is None:
        return np.array(list(x.values()), float)
    return np.array([x[k] - y[k] for k in x if k in y], float)


def judge_credit(judgement: dict[str, list[list[float]]]) -> np.ndarray:
    """Per prompt: the share of samples j whose debiased AI judgement prefers the policy's sample to SFT's
    (ties 1/2), from the both-order P(position 1) of `_judge_records`."""
    q_ab, q_ba = np.asarray(judgement["q_ab"], float), np.asarray(judgement["q_ba"], float)
    p = (q_ab + (1.0 - q_ba)) / 2.0
    return np.where(p > 0.5, 1.0, np.where(p < 0.5, 0.0, 0.5)).mean(axis=1)


def endpoint_units(name: str, records: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per-unit values of one endpoint on one seed's records (see the module docstring). Pair endpoints average
    each unit's pairs (a world prompt's pairs share samples) and pair units by id; prompts pair by id."""
    kind, args = parse_endpoint(name)
    if kind in ("align", "debias", "bias"):
        recs = [_need(records, name, "align", variant=v) for v in args]
        units = [align_units(r) for r in recs]
        if kind == "debias":
            return _paired(unit_means(recs[0], units[0]["debiased"] - units[0]["no_debias"]), None)
        key, off = ("debiased", 0.5) if kind == "align" else ("bias", 0.0)
        vals = [unit_means(r, u[key] - off) for r, u in zip(recs, units)]
        return _paired(vals[0], vals[1] if len(vals) > 1 else None)
    if kind == "rm":
        recs = [_need(records, name, "rm", rm=x) for x in args]
        vals = [unit_means(r, rm_credit(r) - 0.5) for r in recs]
        return _paired(vals[0], vals[1] if len(vals) > 1 else None)
    p, q = (_need(records, name, "policy", policy=x) for x in args)
    if "gold" not in p or "gold" not in q:
        raise ValueError(f"protocol endpoint {name!r}: the policy records have no gold reward (real source).")
    if p["ids"] != q["ids"]:
        raise ValueError(f"protocol endpoint {name!r}: the two policies were evaluated on different prompts.")
    gp, gq = np.asarray(p["gold"], float), np.asarray(q["gold"], float)
    if kind == "gold":
        return gp.mean(axis=1) - gq.mean(axis=1)
    return np.where(gp > gq, 1.0, np.where(gp < gq, 0.0, 0.5)).mean(axis=1) - 0.5


def _ci(c: Sequence[float]) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def report_study(cfg: Config, console: Any = None, started: float | None = None) -> dict[str, Any]:
    """Report: alignment, RM and RL tables (95% CIs pooled over the world seeds of out_dir + pool_dirs, the unit
    a prompt), plots and the protocol's verdicts, from the saved records alone."""
    measured = measured_config(cfg, NOT_MEASURED)
    facts_by, by_seed = pool_measured(cfg.out_dir, cfg.pool_dirs, measured, "rlaif", POOL_FREE,
                                      MEASURE_FACTS, RECORDS)
    seeds = sorted(by_seed)
    facts = next(iter(facts_by.values()))
    rec = Record("rlaif", cfg, cfg.out_dir, cfg.seed)
    if started is not None:
        rec._t0 = started  # run(): the wall time covers measuring too
    label_name = facts["labels"]
    where = f"world seeds {seeds}" if facts["world"] is not None else "real source"
    nb = cfg.n_boot

    def ci_over(values: Callable[[list[dict[str, Any]]], np.ndarray | None], key: str) -> tuple[float, float, float]:
        groups = [values(by_seed[s]) for s in seeds]
        return pooled_ci([g for g in groups if g is not None], nb, key)

    def per_unit(r: dict[str, Any] | None, values: np.ndarray) -> np.ndarray | None:
        return None if r is None else np.array(list(unit_means(r, values).values()), float)

    count = {k: sum(f["pairs"][k] for f in facts_by.values()) for k in ("align", "align_units", "eval", "eval_units",
                                                                       "train")}
    # ---------------------------------------------------------------- alignment
    align: dict[str, dict[str, Any]] = {}
    for v in cfg.variants:
        def unit(key: str, name: str = v.name) -> Callable[[list[dict[str, Any]]], np.ndarray | None]:
            return lambda rs: per_unit(find(rs, "align", variant=name),
                                       align_units(find(rs, "align", variant=name))[key])
        info = facts["variants"][v.name]
        align[v.name] = {"labeler": Path(info["labeler_path"]).name, "params": info["params"],
                         **{k: ci_over(unit(k), f"align:{v.name}:{k}") for k in ("debiased", "no_debias", "bias")},
                         "seconds": float(np.mean([f["variants"][v.name]["seconds"] for f in facts_by.values()])),
                         "example_rationale": info.get("example_rationale")}
    rec.table(f"AI-labeler alignment with the {label_name} labels ({where}; {count['align']} held-out pairs of "
              f"{count['align_units']} units in all; 95% CI over units)",
              ["variant", "labeler", "parameters", "preamble", "shots", "CoT", "k", "alignment (debiased)",
               "no debiasing", "position bias", "s per seed"],
              [[v.name, align[v.name]["labeler"], f"{align[v.name]['params']:,}", v.preamble, v.shots,
                "yes" if v.cot else "no", v.self_consistency, _ci(align[v.name]["debiased"]),
                _ci(align[v.name]["no_debias"]), _ci(align[v.name]["bias"]), f"{align[v.name]['seconds']:.0f}"]
               for v in cfg.variants])
    gate_rows = [[s, g["gate"], "n/a" if g["value"] is None else f"{g['value']:.3f}",
                  f"{g['direction']} {g['target']}",
                  {True: "pass", False: "FAIL"}.get(g.get("passed"), "")]
                 for s in seeds for g in (facts_by[s].get("labeler_gates") or {}).get("rows", [])]
    if gate_rows:
        rec.table("Labeler gates of each world (largest labeler, measured when the labelers were built)",
                  ["world seed", "gate", "value", "target", ""], gate_rows)
    # ---------------------------------------------------------------- reward models
    rms: dict[str, dict[str, Any]] = {}
    rm_names = [n for n in RM_NAMES if find(by_seed[seeds[0]], "rm", rm=n) is not None]
    for n in rm_names:
        rms[n] = {"accuracy": ci_over(lambda rs, n=n: per_unit(find(rs, "rm", rm=n), rm_credit(find(rs, "rm", rm=n))),
                                      f"rm:{n}")}
    agree = None
    if rms:
        agree = ci_over(lambda rs: (None if find(rs, "rm_labels") is None else per_unit(
            find(rs, "rm_labels"), alignment_credit(find(rs, "rm_labels")["p_a"], find(rs, "rm_labels")["human"]))),
            "rm_labels")
        what = {"ai": f"AI soft labels ({cfg.rm.label_variant}; agree with {label_name}: {_ci(agree)})",
                "gold": "gold labels (hard)", "human": "human labels (hard)",
                "untrained": "none: the SFT policy with the fresh head both RMs start from",
                "proxy": ("the world's proxy RM (teacher, minimal and policy pairs)" if facts["world"] is not None
                          else "source.real.reward_model")}
        rec.table(f"RM pairwise accuracy on held-out {label_name}-labelled pairs ({where}; {count['eval']} pairs of "
                  f"{count['eval_units']} units in all; trained on {count['train']} pairs in all; 95% CI over units)",
                  ["reward model", "trained on", "held-out accuracy"],
                  [[n, what[n], _ci(r["accuracy"])] for n, r in rms.items()])
    rec.results["rm_train_label_agreement"] = agree
    # ---------------------------------------------------------------- RL
    rl: dict[str, dict[str, Any]] = {}
    has_gold = facts["world"] is not None
    for p in (["sft", *facts["arms"]] if facts["arms"] else []):
        row: dict[str, Any] = {}
        if has_gold:
            row["gold"] = ci_over(lambda rs, p=p: np.mean(find(rs, "policy", policy=p)["gold"], axis=1), f"gold:{p}")
            if p != "sft":
                row["gold_vs_sft"] = ci_over(lambda rs, p=p: endpoint_units(f"gold:{p}:sft", rs), f"gold:{p}:sft")
                row["win_vs_sft"] = ci_over(lambda rs, p=p: endpoint_units(f"win:{p}:sft", rs) + 0.5, f"win:{p}:sft")
        if p != "sft":
            row["judge_win_vs_sft"] = ci_over(
                lambda rs, p=p: judge_credit(find(rs, "policy", policy=p)["judge_vs_sft"]), f"judge_win:{p}:sft")
        rl[p] = row
    if rl:
        a = cfg.a2c
        n_prompts = sum(len(find(by_seed[s], "policy", policy="sft")["ids"]) for s in seeds)
        heads = ["policy", "reward in A2C"] + (["mean gold reward", "gold - SFT", "gold win rate vs SFT"]
                                                if has_gold else []) + ["AI-judge win rate vs SFT"]
        rows = []
        for p, r in rl.items():
            cells = [p, "none (the starting SFT policy)" if p == "sft" else ARM_REWARD[p]]
            if has_gold:
                cells += [_ci(r["gold"]), "" if p == "sft" else _ci(r["gold_vs_sft"]),
                          "" if p == "sft" else _ci(r["win_vs_sft"])]
            cells.append("" if p == "sft" else _ci(r["judge_win_vs_sft"]))
            rows.append(cells)
        rec.table(f"A2C policies on {n_prompts} held-out prompts in all x {a.eval_samples} samples ({where}; "
                  f"{a.iterations} iterations x {a.prompts_per_iteration * a.n} rollouts; 95% CI over prompts)",
                  heads, rows)
    # ---------------------------------------------------------------- protocol, plots, notes
    verdicts: list[dict[str, Any]] = []
    if cfg.protocol.endpoints and facts["world"] is not None:
        verdicts = report_protocol(rec, cfg.protocol, by_seed, endpoint_units, facts_by, MEASURE_FACTS)
    elif cfg.protocol.endpoints:
        rec.notes.append("The protocol was not evaluated: its endpoints need the world's gold labels and reward "
                         "(source.kind: world).")
    _plots(rec, cfg, align, rl, has_gold, label_name)
    rec.notes.extend(_notes(cfg, facts_by, align, rms, rl, label_name))
    rec.results.update(world_seeds=seeds, labels=label_name, alignment=align, reward_models=rms, rl=rl,
                       protocol=verdicts, pairs={str(s): f["pairs"] for s, f in facts_by.items()},
                       timings={str(s): f["timings"] for s, f in facts_by.items()},
                       labeler_gates={str(s): f.get("labeler_gates") for s, f in facts_by.items()},
                       examples={p: find(by_seed[seeds[0]], "policy", policy=p)["example"] for p in rl})
    return rec.finish(console)


def run(cfg: Config, console: Any = None) -> dict[str, Any]:
    """measure_study, then report_study; returns the result record (also written to out_dir)."""
    started = time.perf_counter()
    measure_study(cfg, console)
    return report_study(cfg, console, started=started)


def _notes(cfg: Config, facts_by: dict[int, dict[str, Any]], align: dict[str, dict[str, Any]],
           rms: dict[str, dict[str, Any]], rl: dict[str, dict[str, Any]], label_name: str) -> list[str]:
    """The set-up in words, and plain statements of what the numbers show (computed, not written in advance)."""
    out = []
    for s, f in facts_by.items():
        p = f["pairs"]
        out.append(f"World seed {s}: {p['train']} RM-train pairs (training prompts) and {p['eval']} held-out pairs "
                   f"on {p['eval_units']} prompts (the first {p['align']}, on {p['align_units']} prompts, are the "
                   f"alignment pairs) with different {label_name} labels; gold ties, identical and empty responses "
                   "skipped." if f["world"] is not None else
                   f"Pairs: {p['total']} human pairs ({p['eval']} held out for RM evaluation).")
        out += [f"World seed {s}: {w}" for w in f.get("warnings", [])]
    out.append("Statistical unit: a held-out prompt (its pairs share samples, so they are averaged first); the "
               "intervals and the protocol's tests resample units within each world seed.")
    out.append("Alignment: the debiased label averages both candidate orders; 'no debiasing' is the mean agreement "
               "of the two single-order labels (what a both_orders=False run computes); position bias is the share "
               "of pairs on which the same position wins in both orders.")
    for n, r in align.items():
        d = r["debiased"][0] - r["no_debias"][0]
        out.append(f"{n}: alignment {r['debiased'][0]:.3f}, debiasing changes it by {d:+.3f}, position bias "
                   f"{r['bias'][0]:.3f}.")
    if "ai" in rms and label_name in rms:
        out.append(f"RM on AI soft labels: held-out accuracy {rms['ai']['accuracy'][0]:.3f} vs "
                   f"{rms[label_name]['accuracy'][0]:.3f} on {label_name} labels (paper, summarisation: 74.2 vs "
                   f"79.3); the untrained start scores {rms['untrained']['accuracy'][0]:.3f}.")
    if rl:
        a = cfg.a2c
        out.append(f"A2C: {a.iterations} iterations of {a.prompts_per_iteration} prompts x {a.n} rollouts "
                   f"(T = {a.temperature:g}), beta {a.beta:g} (KL in the {a.kl_mode}), lr {a.lr:g}, from the SFT "
                   "policy on the RM-train prompts; every policy samples the held-out prompts with one engine seed "
                   "(common random numbers). The AI judge is the RM's label variant, both orders: the same labeler "
                   "whose labels trained the RLAIF RM, so its win rates lean towards rlaif; the gold columns do not.")
    return out


def _plots(rec: Record, cfg: Config, align: dict[str, dict[str, Any]], rl: dict[str, dict[str, Any]],
           has_gold: bool, label_name: str) -> None:
    def err(cs: Sequence[Sequence[float]]) -> list[list[float]]:
        return [[c[0] - c[1] for c in cs], [c[2] - c[0] for c in cs]]

    def draw_alignment(fig: Any) -> None:
        ax = fig.add_subplot(1, 2, 1)
        names = list(align)
        x = np.arange(len(names))
        for off, key, label in ((-0.2, "debiased", "debiased"), (0.2, "no_debias", "no debiasing")):
            cs = [align[n][key] for n in names]
            ax.bar(x + off, [c[0] for c in cs], 0.4, yerr=err(cs), capsize=3, label=label)
        ax.plot(x, [align[n]["bias"][0] for n in names], "k^", label="position-bias rate")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"agreement with {label_name} labels (95% CI)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax2 = fig.add_subplot(1, 2, 2)
        # the size curve: the prompt set-up (preamble, shots, CoT, k) shared by the most labelers
        groups: dict[tuple, dict[int, str]] = {}
        for v in cfg.variants:
            groups.setdefault((v.preamble, v.shots, v.cot, v.self_consistency), {})[align[v.name]["params"]] = v.name
        setup, sized = max(groups.items(), key=lambda kv: len(kv[1]))
        by_params = sorted(sized.items())
        if by_params:
            ps = [p for p, _ in by_params]
            cs = [align[n]["debiased"] for _, n in by_params]
            ax2.errorbar(ps, [c[0] for c in cs], yerr=err(cs), marker="o", capsize=3, label="alignment (debiased)")
            ax2.plot(ps, [align[n]["bias"][0] for _, n in by_params], "k^--", label="position bias")
            for p, n in by_params:
                ax2.annotate(n, (p, align[n]["debiased"][0]), fontsize=7)
            ax2.set_xscale("log")
        ax2.set_xlabel(f"labeler parameters (preamble {setup[0]}, {setup[1]} shots, CoT {'on' if setup[2] else 'off'}, "
                       f"k {setup[3]})")
        ax2.set_ylim(0, 1)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)

    rec.figure("alignment.png", draw_alignment, figsize=(11, 4.5))
    if not rl:
        return

    def draw_rl(fig: Any) -> None:
        arms = [p for p in rl if p != "sft"]
        ax = fig.add_subplot(1, 2, 1)
        if has_gold:
            cs = [rl[p]["gold"] for p in rl]
            ax.bar(np.arange(len(rl)), [c[0] for c in cs], yerr=err(cs), capsize=3)
            ax.set_xticks(np.arange(len(rl)), list(rl))
            ax.set_ylabel("held-out mean gold reward (95% CI)")
            ax.grid(axis="y", alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no gold reward on a real source", ha="center", va="center")
            ax.set_axis_off()
        ax2 = fig.add_subplot(1, 2, 2)
        x = np.arange(len(arms))
        if has_gold:
            cs = [rl[p]["win_vs_sft"] for p in arms]
            ax2.bar(x - 0.2, [c[0] for c in cs], 0.4, yerr=err(cs), capsize=3, label="gold judge")
        cs = [rl[p]["judge_win_vs_sft"] for p in arms]
        ax2.bar(x + (0.2 if has_gold else 0.0), [c[0] for c in cs], 0.4, yerr=err(cs), capsize=3, label="AI judge")
        ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax2.set_xticks(x, arms)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("win rate vs SFT (ties half)")
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)

    rec.figure("rl.png", draw_rl, figsize=(10, 4.2))
