"""`prs-jax world build`: generate the corpora, train the tokenizer, pretrain the policy with the project's SFT
trainer, train the proxy reward model on gold-ranked pairs, and cache the result keyed by the config.

Layout of a built world (`<root>/world-<key>/`):
    tokenizer/            HF tokenizer directory (byte-level BPE trained on the corpus, chat template)
    policy/               HF checkpoint of the pretrained policy (Llama architecture) + tokenizer
    rm/                   HF checkpoint of the proxy reward model (initialised from the policy)
    data/                 sft.jsonl, sft_eval.jsonl, rm_train.jsonl, rm_eval.jsonl, heldout_prompts.jsonl
    runs/                 trainer output (metrics.jsonl, tensorboard, orbax checkpoints)
    report.json           config, key, timings, final SFT loss, proxy RM held-out accuracy, versions
A later build with the same config finds report.json and reuses everything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from prs_jax.config import to_dict
from prs_jax.data.io import write_jsonl
from prs_jax.models.tiny import build_checkpoint, build_tokenizer
from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
from prs_jax.train.trainer import OptimConfig, TrainerConfig
from prs_jax.world.behaviour import Behaviour, World
from prs_jax.world.corpus import Mixture, preference_pairs, sft_corpus, split_prompts

# Bump when something outside prs_jax/world that shapes a build changes (the trainer, the tokenizer builder);
# edits inside prs_jax/world change the key through the source digest.
WORLD_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class PolicySize:
    """The policy's Llama dimensions."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 1024
    max_position_embeddings: int = 512


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a built world (its cache key is a hash of this)."""

    seed: int = 0
    train_prompts: int = 2000
    heldout_prompts: int = 200
    sft_conversations: int = 6000
    sft_eval_conversations: int = 200
    rm_pairs: int = 3000
    rm_eval_pairs: int = 400
    policy: PolicySize = PolicySize()
    behaviour: Behaviour = Behaviour()
    mixture: Mixture = Mixture()
    sft_steps: int = 500
    sft_batch_size: int = 32
    sft_lr: float = 3e-3
    rm_steps: int = 300
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    max_length: int = 192
    pad_multiple: int = 32
    group_by_length: int = 8


def preset(name: Literal["default", "smoke"], **overrides: Any) -> WorldConfig:
    """The default world, or the smoke world (small corpus, tiny policy, few steps: for CI, not for results)."""
    if name == "default":
        return dataclasses.replace(WorldConfig(), **overrides)
    if name == "smoke":
        base = WorldConfig(train_prompts=200, heldout_prompts=16, sft_conversations=400, sft_eval_conversations=32,
                           rm_pairs=200, rm_eval_pairs=64, policy=PolicySize(hidden_size=64, intermediate_size=128,
                                                                             num_hidden_layers=2),
                           sft_steps=30, sft_batch_size=16, rm_steps=20, rm_batch_size=16, pad_multiple=64)
        return dataclasses.replace(base, **overrides)
    raise ValueError(f"unknown world preset {name!r}; use 'default' or 'smoke'.")


def _source_digest() -> str:
    """Hash of the world's own source files: editing a generator or a text invalidates cached builds."""
    h = hashlib.sha256()
    for name in ("task.py", "behaviour.py", "corpus.py", "build.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def world_key(cfg: WorldConfig) -> str:
    """A short hash of the config, the world version and the world's source code."""
    blob = json.dumps({"version": WORLD_VERSION, "source": _source_digest(), "config": to_dict(cfg)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class BuiltWorld:
    """Paths and report of a built world."""

    root: Path
    config: WorldConfig
    report: dict[str, Any]

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def reward_model(self) -> Path:
        return self.root / "rm"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def world(self) -> World:
        """The world's prompt sampler and behaviours (same seed as the build)."""
        return World(self.config.behaviour, seed=self.config.seed)

    def heldout(self) -> list[dict[str, Any]]:
        """Held-out prompts: rows with id, prompt (x) and preference (z)."""
        with (self.data / "heldout_prompts.jsonl").open() as fh:
            return [json.loads(line) for line in fh if line.strip()]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "prs-jax"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def build_world(cfg: WorldConfig = WorldConfig(), root: str | Path = "runs/world", force: bool = False,
                console: Console | None = None, progress: bool = True) -> BuiltWorld:
    """Build the world described by `cfg` under `root` (or reuse the cached build); returns its paths."""
    console = console or Console()
    key = world_key(cfg)
    out = Path(root) / f"world-{key}"
    report_file = out / "report.json"
    if report_file.is_file() and not force:
        console.print(f"world: reusing the cached build {out}", markup=False)
        return BuiltWorld(out, cfg, json.loads(report_file.read_text()))
    if force and out.exists():
        shutil.rmtree(out)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    world = World(cfg.behaviour, seed=cfg.seed)

    t0 = time.perf_counter()
    train_p, held_p = split_prompts(world, cfg.train_prompts, cfg.heldout_prompts, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    sft_rows = list(sft_corpus(world, train_p, cfg.sft_conversations, rng, cfg.mixture))
    sft_eval = list(sft_corpus(world, held_p, cfg.sft_eval_conversations, rng, cfg.mixture))
    rm_rows = list(preference_pairs(world, train_p, cfg.rm_pairs, rng))
    rm_eval = list(preference_pairs(world, held_p, cfg.rm_eval_pairs, rng))
    write_jsonl(data / "sft.jsonl", sft_rows)
    write_jsonl(data / "sft_eval.jsonl", sft_eval)
    write_jsonl(data / "rm_train.jsonl", rm_rows)
    write_jsonl(data / "rm_eval.jsonl", rm_eval)
    write_jsonl(data / "heldout_prompts.jsonl", [{"id": p.id, "prompt": p.x, "preference": p.z} for p in held_p])
    timings["corpus_s"] = time.perf_counter() - t0
    console.print(f"world {key}: {len(train_p)} train / {len(held_p)} held-out prompts, {len(sft_rows)} SFT "
                  f"conversations, {len(rm_rows)} RM pairs -> {data}", markup=False)

    t0 = time.perf_counter()
    text = "\n".join(m["content"] for row in sft_rows for m in row["messages"])
    tok_dir = build_tokenizer(out / "tokenizer", vocab_size=cfg.policy.vocab_size, corpus=text)
    sizes = dataclasses.asdict(cfg.policy)
    init = build_checkpoint(out / "init", "llama", seed=cfg.seed, tokenizer_dir=tok_dir, **sizes)
    timings["tokenizer_init_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data_cfg = DataConfig(train=str(data / "sft.jsonl"), eval=str(data / "sft_eval.jsonl"),
                          max_length=cfg.max_length, max_prompt_length=None, pad_multiple=cfg.pad_multiple)
    sft_cfg = TrainRunConfig(
        model=str(init), data=data_cfg,
        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=max(cfg.sft_steps // 20, 1), schedule="cosine",
                          min_lr_ratio=0.05, weight_decay=0.0),
        trainer=TrainerConfig(out_dir=str(out / "runs" / "sft"), steps=cfg.sft_steps,
                              batch_size=cfg.sft_batch_size, seed=cfg.seed, log_every=10, progress=progress,
                              async_checkpoint=False, group_by_length=cfg.group_by_length),
        export_dir=str(out / "policy"))
    sft_metrics = run_train("sft", sft_cfg, console=console)
    timings["sft_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rm_cfg = TrainRunConfig(
        model=str(out / "policy"),
        data=DataConfig(train=str(data / "rm_train.jsonl"), eval=str(data / "rm_eval.jsonl"),
                        max_length=cfg.max_length, max_prompt_length=None, use_chat_template=True,
                        pad_multiple=cfg.pad_multiple),
        loss=LossConfig(), optim=OptimConfig(lr=cfg.rm_lr, warmup_steps=max(cfg.rm_steps // 20, 1),
                                             schedule="cosine", min_lr_ratio=0.05),
        trainer=TrainerConfig(out_dir=str(out / "runs" / "rm"), steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
                              seed=cfg.seed, log_every=10, progress=progress, async_checkpoint=False,
                              group_by_length=cfg.group_by_length),
        export_dir=str(out / "rm"))
    rm_metrics = run_train("rm", rm_cfg, console=console)
    timings["rm_s"] = time.perf_counter() - t0
    shutil.rmtree(init, ignore_errors=True)

    timings["total_s"] = time.perf_counter() - t_start
    report = {"key": key, "version": WORLD_VERSION, "config": to_dict(cfg), "timings": timings,
              "sft_eval": sft_metrics, "rm_eval": rm_metrics,
              "rm_heldout_accuracy": rm_metrics.get("accuracy"), "versions": _versions()}
    report_file.write_text(json.dumps(report, indent=2))
    console.print(f"world {key} built in {timings['total_s']:.0f} s: SFT eval loss {sft_metrics.get('loss', float('nan')):.3f}, "
                  f"proxy RM held-out pairwise accuracy {report['rm_heldout_accuracy']:.3f}", markup=False)
    return BuiltWorld(out, cfg, report)
