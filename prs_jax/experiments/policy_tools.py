"""Helpers shared by the studies that sample from a policy, score with a gold reward or a reward model, and
retrain (sr_dpo, offline_rl): the study environment (world or real checkpoints), chunked strategy runs on the
tree engine, conversational training rows, and pure statistics (win rate with ties, Pearson, Spearman).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from prs_jax.experiments.common import Source, build_world_from
from prs_jax.strategies.base import (
    CallableScorer,
    PromptItem,
    RewardModelScorer,
    Scorer,
    StrategyResult,
)
from prs_jax.strategies.templates import PRSTemplates
from prs_jax.tree.engine import EngineConfig, TreeEngine

GoldFn = Callable[[str, str, "str | None"], float]


@dataclasses.dataclass
class StudyEnv:
    """What a study samples from and scores with: the starting policy, the (proxy) reward model, prompts, the
    gold reward (world only; None for real checkpoints), the Sr-* quality instruction and the PRS templates the
    policy understands."""

    kind: str
    policy: Path
    reward_model: Path | None
    rm_head_name: str | None
    dtype: str
    train_items: list[PromptItem]
    heldout_items: list[PromptItem]
    gold: GoldFn | None
    quality_instruction: str
    templates: PRSTemplates
    info: dict[str, Any]


def resolve_env(source: Source, n_train: int, n_heldout: int, console: Any = None,
                eval_prompt_set: str = "", eval_prompts_path: str = "") -> StudyEnv:
    """Build or reuse the world (or point at the real checkpoints) and pick the train / held-out prompts."""
    if source.kind == "world":
        from prs_jax.world.corpus import (
            QUALITY_INSTRUCTION,
            split_prompts,
            world_templates,
        )
        from prs_jax.world.task import gold_reward

        built = build_world_from(source.world, console)
        wc = built.config
        train_p, _ = split_prompts(built.world(), wc.train_prompts, wc.heldout_prompts, wc.seed)
        train = [PromptItem(p.id, p.x, p.z) for p in train_p]
        held = [PromptItem(r["id"], r["prompt"], r["preference"]) for r in built.heldout()]
        if n_train > len(train) or n_heldout > len(held):
            raise ValueError(f"the world {built.root} has {len(train)} training and {len(held)} held-out prompts; "
                             f"the study asks for {n_train} and {n_heldout}. Lower the study's prompt counts or "
                             "raise source.world.overrides train_prompts / heldout_prompts.")
        return StudyEnv("world", built.policy, built.reward_model, None, "float32", train[:n_train],
                        held[:n_heldout], gold_reward, QUALITY_INSTRUCTION, world_templates(),
                        {"world_key": built.report.get("key"), "world_root": str(built.root),
                         "proxy_rm_heldout_accuracy": built.report.get("rm_heldout_accuracy")})
    from prs_jax.data.prompt_sets import load_prompt_set
    from prs_jax.train.run import DEFAULT_PROMPT_PREFIX

    real = source.real
    if not real.policy or not real.prompts_path:
        raise ValueError("source.kind 'real' needs source.real.policy (an HF checkpoint directory) and "
                         "source.real.prompts_path (a prompt file for source.real.prompt_set).")
    if not real.reward_model:
        raise ValueError("source.kind 'real' has no gold reward: set source.real.reward_model (an HF reward-model "
                         "directory) to rank samples and to judge win rates.")
    items = load_prompt_set(real.prompt_set, real.prompts_path)
    if real.max_prompts:
        items = items[:real.max_prompts]
    if eval_prompts_path:
        held = load_prompt_set(eval_prompt_set or real.prompt_set, eval_prompts_path)[:n_heldout]
        train = items[:n_train]
    else:
        if n_train + n_heldout > len(items):
            raise ValueError(f"{real.prompts_path}: {len(items)} prompts, fewer than the {n_train} training + "
                             f"{n_heldout} held-out prompts asked for; lower them or give eval_prompts_path.")
        train, held = items[:n_train], items[len(items) - n_heldout:]
    return StudyEnv("real", Path(real.policy), Path(real.reward_model), real.rm_head_name, real.dtype, train, held,
                    None, DEFAULT_PROMPT_PREFIX, PRSTemplates(), {"prompt_set": real.prompt_set})


def make_engine(model: Any, tok: Any, seed: int) -> TreeEngine:
    """A tree engine with the bucket floors the world studies use (few compiled shapes)."""
    return TreeEngine(model, tok, seed=seed, config=EngineConfig(min_prefix_bucket=64, min_new_tokens_bucket=32,
                                                                 min_extend_bucket=32))


def proxy_scorer(env: StudyEnv, tok: Any) -> RewardModelScorer:
    """The environment's reward model on the batched scoring path (the world's RM sees x and z)."""
    from prs_jax.models import load_reward_model
    from prs_jax.tree.scoring import RewardScorer

    rm = load_reward_model(env.reward_model, dtype=env.dtype, head_name=env.rm_head_name)
    return RewardModelScorer(RewardScorer(rm, tok), include_preference=env.kind == "world")


def gold_scorer(env: StudyEnv) -> Scorer | None:
    """The gold reward as a scorer (None outside the world)."""
    return CallableScorer(env.gold) if env.gold is not None else None


def run_chunked(strategy: Any, items: Sequence[PromptItem], model: Any, tok: Any, scorer: Scorer, seed: int,
                chunk: int, desc: str) -> list[StrategyResult]:
    """Run a strategy over prompts in chunks (a fresh engine per chunk bounds the KV held at once). Every chunk's
    engine has the same seed: samples are keyed by prompt id and tree path, so `chunk` does not change them."""
    out: list[StrategyResult] = []
    starts = range(0, len(items), max(chunk, 1))
    for i, start in enumerate(tqdm(starts, desc=desc, unit="chunk", leave=False)):
        engine = make_engine(model, tok, seed)
        out.extend(strategy.run(list(items[start:start + chunk]), engine, scorer))
    return out


def rescore(results: Sequence[StrategyResult], scorer: Scorer) -> list[list[float]]:
    """Another scorer's rewards for every candidate of every result (the stored node rewards are unchanged)."""
    flat = [(r.item, c.text) for r in results for c in r.candidates]
    scores = scorer([it.prompt for it, _ in flat], [t for _, t in flat], [it.preference for it, _ in flat])
    out, k = [], 0
    for r in results:
        out.append([float(s) for s in scores[k:k + len(r.candidates)]])
        k += len(r.candidates)
    return out


def config_digest(obj: Any, *files: Path) -> str:
    """A short hash of a config (as JSON) and data files: names run directories, so that a rerun resumes only
    a run with the same settings and data."""
    h = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:10]


def user_turn(item: PromptItem) -> list[dict[str, str]]:
    """The policy's input for (x, z) as one user message (x, a blank line, z)."""
    from prs_jax.strategies.base import join_preference

    return [{"role": "user", "content": join_preference(item.prompt, item.preference)}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# ------------------------------------------------------------------------------------------------ correlations
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (nan when either side is constant or fewer than two points)."""
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    if x_.size < 2 or x_.std() == 0 or y_.std() == 0:
        return float("nan")
    return float(np.corrcoef(x_, y_)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), float)
    ranks[order] = np.arange(len(v), dtype=float)
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    if x_.size < 2:
        return float("nan")
    return pearson(_ranks(x_), _ranks(y_))
