"""The study environment: ONE place that turns a `Source` (a synthetic world seed, or real HF checkpoints and a
prompt set) into what a study samples from and scores with, and ONE tree-engine factory.

    env = StudyEnv.from_source(cfg.source, console)
    env.model, env.tokenizer            the policy (loaded on first use)
    env.proxy                           the proxy reward model on the batched scoring path (loaded on first use)
    env.gold                            the world's gold reward r*(x, z, y) (None for real checkpoints)
    env.templates, env.vs_templates     the PRS / verbalized-sampling wording the policy understands
    env.quality_instruction             the Sr-* quality instruction
    env.heldout(n), env.split(a, b)     held-out prompts; train / held-out prompts
    env.labeler_path("large")           the world's separate AI labelers (trained on first use)
    env.engine(seed)                    a TreeEngine with the studies' bucket floors

The studies never resolve a source or build an engine themselves: tests/experiments/test_env.py checks that no
study module constructs a TreeEngine or an EngineConfig.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prs_jax.errors import ConfigError
from prs_jax.experiments.common import Source, build_world_from, param_count
from prs_jax.strategies.base import CallableScorer, PromptItem, RewardModelScorer, Scorer
from prs_jax.tree.engine import STUDY_FLOORS, study_engine_config

GoldFn = Callable[[str, str, "str | None"], float]

# the bucket floors of every study engine (shared with the world's gates: prs_jax.tree.engine.STUDY_FLOORS)
ENGINE_FLOORS: dict[str, int] = STUDY_FLOORS

# what each source.real key is, for the errors that name a missing one
REAL_KEYS: dict[str, str] = {
    "policy": "the policy: a local HF checkpoint directory (config.json, *.safetensors, tokenizer files)",
    "reward_model": "a local HF reward-model directory; real data has no gold reward, so it ranks the samples "
                    "and judges",
    "prompts_path": "the prompt file, in the format of source.real.prompt_set",
}


class SourceError(ConfigError, ValueError):
    """A study's source misses a key it needs (a config error; also a ValueError for callers that catch those)."""


def engine_config(**options: Any):
    """The EngineConfig of a study engine: the shared bucket floors plus `options` (attention_impl,
    min_groups_bucket, min_rows_bucket, ...)."""
    return study_engine_config(**options)


class StudyEnv:
    """What a study samples from and scores with (see the module docstring). Models load on first use, so a
    study pays only for what it touches."""

    def __init__(self, kind: str, policy: str | Path, reward_model: str | Path | None, *,
                 rm_head_name: str | None = None, dtype: str = "float32", gold: GoldFn | None = None,
                 templates: Any = None, vs_templates: dict[str, str] | None = None, quality_instruction: str = "",
                 world: Any = None, source: Source | None = None, mesh: Any = None,
                 engine_options: dict[str, Any] | None = None, rm_formatter: Any = None,
                 rm_include_preference: bool | None = None):
        from prs_jax.strategies.templates import PRSTemplates

        self.kind, self.source, self.world = kind, source, world
        self.policy = Path(policy)
        self.reward_model = Path(reward_model) if reward_model else None
        self.rm_head_name, self.dtype, self.gold = rm_head_name, dtype, gold
        self.templates = templates if templates is not None else PRSTemplates()
        self.vs_templates = dict(vs_templates or {})
        self.quality_instruction = quality_instruction
        # the engine and the scorer run inside this mesh with its sharding rules (real checkpoints on accelerators)
        self.mesh_context = mesh.context() if mesh is not None else None
        self.engine_options = dict(engine_options or {})
        # how `proxy` formats (prompt, response) for the RM and whether it sees z (None: in the world only)
        self.rm_formatter, self.rm_include_preference = rm_formatter, rm_include_preference
        self.compilations = 0  # XLA programs compiled by the engines a study ran (it adds them up)
        self._labelers: dict[str, dict[str, Any]] = {}  # labeler build config -> report

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_source(cls, source: Source, console: Any = None, *, study: str = "study",
                    require: Sequence[str] = ("policy", "reward_model"), reward_model: str | Path | None = None,
                    **options: Any) -> StudyEnv:
        """Build or reuse the world of `source.world`, or point at the real checkpoints of `source.real` (checking
        that the `require`d source.real keys are set). `reward_model` replaces the source's RM; `options` go to
        the constructor (mesh, engine_options, rm_formatter, rm_include_preference, dtype)."""
        if source.kind == "world":
            return cls.from_world(build_world_from(source.world, console), source=source, reward_model=reward_model,
                                  **options)
        from prs_jax.train.run import DEFAULT_PROMPT_PREFIX

        real = source.real
        missing = [k for k in require if not getattr(real, k)]
        if missing:
            raise SourceError(f"{study}: source.kind 'real' needs "
                              + "; ".join(f"source.real.{k} ({REAL_KEYS[k]})" for k in missing)
                              + ". Set it in the config or on the command line (source.real.KEY=...).")
        options.setdefault("dtype", real.dtype)
        return cls("real", real.policy, reward_model or real.reward_model or None, rm_head_name=real.rm_head_name,
                   quality_instruction=DEFAULT_PROMPT_PREFIX, source=source, **options)

    @classmethod
    def from_world(cls, built: Any, *, source: Source | None = None, reward_model: str | Path | None = None,
                   **options: Any) -> StudyEnv:
        """The environment of an already built world (prs_jax.world.build.BuiltWorld)."""
        from prs_jax.world.corpus import QUALITY_INSTRUCTION, world_templates, world_vs_templates
        from prs_jax.world.task import gold_reward

        return cls("world", built.policy, reward_model or built.reward_model, gold=gold_reward,
                   templates=world_templates(), vs_templates=world_vs_templates(),
                   quality_instruction=QUALITY_INSTRUCTION, world=built, source=source, **options)

    # ------------------------------------------------------------------------------------------ models
    def _checkpoint(self, path: Path | None, key: str) -> Path:
        if path is None or not path.is_dir():
            where = f"source.real.{key}" if self.kind == "real" else f"the world's {key}"
            raise FileNotFoundError(f"{where}: {str(path) if path else ''!r} is not a checkpoint directory; point it "
                                    "at a local HF checkpoint (config.json + *.safetensors + tokenizer files).")
        return path

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The policy's tokenizer."""
        from prs_jax.models import load_tokenizer

        return load_tokenizer(self._checkpoint(self.policy, "policy"))

    @functools.cached_property
    def model(self) -> Any:
        """The starting policy (inside the mesh, if any)."""
        return self.load_policy()

    def load_policy(self, path: str | Path | None = None, dtype: str | None = None) -> Any:
        """A causal LM: the policy, or another checkpoint (a retrained policy), in the env's mesh and dtype."""
        from prs_jax.models import load_causal_lm

        ctx = self.mesh_context
        p = self._checkpoint(self.policy, "policy") if path is None else Path(path)
        return load_causal_lm(p, dtype=dtype or self.dtype, mesh=ctx.mesh if ctx else None,
                              sharding_rules=ctx.rules if ctx else None)

    def param_count(self) -> int:
        """Number of policy parameters."""
        return param_count(self.model)

    @functools.cached_property
    def reward_model_module(self) -> Any:
        """The proxy reward model (inside the mesh, if any)."""
        from prs_jax.models import load_reward_model

        ctx = self.mesh_context
        return load_reward_model(self._checkpoint(self.reward_model, "reward_model"), dtype=self.dtype,
                                 mesh=ctx.mesh if ctx else None, head_name=self.rm_head_name,
                                 sharding_rules=ctx.rules if ctx else None)

    @functools.cached_property
    def rm_tokenizer(self) -> Any:
        """The reward model's own tokenizer."""
        from prs_jax.models import load_tokenizer

        return load_tokenizer(self._checkpoint(self.reward_model, "reward_model"))

    @functools.cached_property
    def proxy(self) -> RewardModelScorer:
        """The proxy RM on the batched scoring path: formatted with `rm_formatter` (default: the RM tokenizer's
        chat template); it sees the preference z when `rm_include_preference`, by default in the world (where it
        was trained on x and z) and not on real checkpoints."""
        from prs_jax.tree.scoring import RewardFormatter, RewardScorer

        scorer = RewardScorer(self.reward_model_module, self.rm_tokenizer, self.rm_formatter or RewardFormatter(),
                              mesh_context=self.mesh_context)
        include = self.rm_include_preference
        return RewardModelScorer(scorer, include_preference=self.kind == "world" if include is None else include)

    def gold_scorer(self) -> Scorer | None:
        """The gold reward as a scorer (None outside the world)."""
        return CallableScorer(self.gold) if self.gold is not None else None

    # ------------------------------------------------------------------------------------------ labelers
    def labelers(self, cfg: Any = None, console: Any = None, allow_weak: bool = True) -> dict[str, Any]:
        """The world's separate AI labelers, trained on first use and cached in the world (their report:
        paths and gates); see prs_jax.world.labelers."""
        if self.world is None:
            raise SourceError("the world's AI labelers exist only for source.kind 'world'; give a labeler "
                              "checkpoint directory for real checkpoints.")
        from prs_jax.world.labelers import LabelerBuildConfig, build_labelers

        key = repr(cfg)
        if key not in self._labelers:
            self._labelers[key] = build_labelers(self.world, cfg or LabelerBuildConfig(), console=console,
                                                 allow_weak=allow_weak)
        return self._labelers[key]

    def labeler_path(self, size: str = "large", cfg: Any = None, console: Any = None) -> Path:
        """The checkpoint directory of the world's labeler of `size` (built on first use)."""
        from prs_jax.world.labelers import labeler_dir

        self.labelers(cfg, console)
        return labeler_dir(self.world, size)

    # ------------------------------------------------------------------------------------------ prompts
    def heldout(self, limit: int, strict: bool = True) -> list[PromptItem]:
        """The first `limit` held-out prompts of the world (`strict`: an error when it has fewer)."""
        rows = self._world("held-out prompts").heldout()
        if strict and limit > len(rows):
            raise ValueError(f"prompts={limit} but the world has {len(rows)} held-out prompts; lower `prompts` or "
                             "build the world with more (source.world.overrides.heldout_prompts).")
        return [PromptItem(r["id"], r["prompt"], r["preference"]) for r in rows[:limit]]

    def train_prompts(self) -> list[PromptItem]:
        """The world's training prompts (the SFT / RM split of the build)."""
        from prs_jax.world.corpus import split_prompts

        built = self._world("training prompts")
        wc = built.config
        train, _ = split_prompts(built.world(), wc.train_prompts, wc.heldout_prompts, wc.seed)
        return [PromptItem(p.id, p.x, p.z) for p in train]

    def real_prompts(self, limit: int | None = None, **options: Any) -> list[PromptItem]:
        """Prompts of source.real.prompt_set from source.real.prompts_path (at most `limit` and max_prompts)."""
        from prs_jax.data.prompt_sets import load_prompt_set

        real = self._real()
        if not real.prompts_path:
            raise SourceError("source.real.prompts_path is empty; point it at the prompt set file "
                              f"({real.prompt_set} format).")
        caps = [x for x in (limit, real.max_prompts) if x is not None]
        return load_prompt_set(real.prompt_set, real.prompts_path, limit=min(caps) if caps else None, **options)

    def split(self, n_train: int, n_heldout: int, eval_prompt_set: str = "", eval_prompts_path: str = ""
              ) -> tuple[list[PromptItem], list[PromptItem]]:
        """Training and held-out prompts. World: its training prompts and its held-out prompts. Real: the first
        n_train and the last n_heldout of the prompt set, or the held-out ones from `eval_prompts_path`."""
        if self.kind == "world":
            train, held = self.train_prompts(), self.heldout(len(self.world.heldout()))
            if n_train > len(train) or n_heldout > len(held):
                raise ValueError(f"the world {self.world.root} has {len(train)} training and {len(held)} held-out "
                                 f"prompts; the study asks for {n_train} and {n_heldout}. Lower the study's prompt "
                                 "counts or raise source.world.overrides train_prompts / heldout_prompts.")
            return train[:n_train], held[:n_heldout]
        from prs_jax.data.prompt_sets import load_prompt_set

        real = self._real()
        items = load_prompt_set(real.prompt_set, real.prompts_path)
        if real.max_prompts:
            items = items[:real.max_prompts]
        if eval_prompts_path:
            return items[:n_train], load_prompt_set(eval_prompt_set or real.prompt_set, eval_prompts_path)[:n_heldout]
        if n_train + n_heldout > len(items):
            raise ValueError(f"{real.prompts_path}: {len(items)} prompts, fewer than the {n_train} training + "
                             f"{n_heldout} held-out prompts asked for; lower them or give eval_prompts_path.")
        return items[:n_train], items[len(items) - n_heldout:]

    def _world(self, what: str) -> Any:
        if self.world is None:
            raise SourceError(f"{what}: only a world source has them (source.kind is {self.kind!r}).")
        return self.world

    def _real(self) -> Any:
        if self.source is None or self.kind != "real":
            raise SourceError(f"only a real source has source.real prompts (source.kind is {self.kind!r}).")
        return self.source.real

    # ------------------------------------------------------------------------------------------ engine
    def engine(self, seed: int, model: Any = None, tokenizer: Any = None):
        """A tree engine over the policy (or `model`, e.g. a retrained policy) with the study bucket floors and
        the env's engine options and mesh. Engines of one seed give the same samples (keys derive from the seed,
        the prompt id and the tree path), so a fresh engine per batch changes nothing."""
        from prs_jax.tree.engine import TreeEngine

        return TreeEngine(self.model if model is None else model, self.tokenizer if tokenizer is None else tokenizer,
                          seed=seed, config=engine_config(**self.engine_options), mesh_context=self.mesh_context)

    # ------------------------------------------------------------------------------------------ facts
    @property
    def info(self) -> dict[str, Any]:
        """Facts a result records about the source (world key and root, RM accuracy; or the prompt set)."""
        if self.world is not None:
            return {"world_key": self.world.report.get("key"), "world_root": str(self.world.root),
                    "proxy_rm_heldout_accuracy": self.world.report.get("rm_heldout_accuracy")}
        return {"prompt_set": self.source.real.prompt_set if self.source is not None else None}
