"""`prs-jax world build`: generate the corpora, train the tokenizer, pretrain the policy with the project's SFT
trainer (a one-preference curriculum, then the full corpus), train the proxy reward model on teacher pairs,
minimal pairs and pairs of the policy's own samples, measure the skill gates, and cache the result keyed by the
config.

Layout of a built world (`<root>/world-<key>/`):
    tokenizer/            HF tokenizer directory (BPE whose vocabulary holds every word of the world as one
                          token, chat template)
    policy/               HF checkpoint of the pretrained policy (Llama architecture) + tokenizer
    rm/                   HF checkpoint of the proxy reward model (initialised from the policy)
    data/                 sft.jsonl, sft_curriculum.jsonl, sft_eval.jsonl, rm_train.jsonl, rm_eval.jsonl,
                          heldout_prompts.jsonl
    runs/                 trainer output (metrics.jsonl, tensorboard, orbax checkpoints)
    report.json           config, key, timings, loss share per skill, SFT curve, the gate table, versions
A later build with the same config finds report.json and reuses everything (the gates are checked again).
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
from prs_jax.data.io import write_jsonl, write_text_atomic
from prs_jax.models.tiny import CHAT_TEMPLATE, build_checkpoint, build_tokenizer
from prs_jax.train.run import DataConfig, LossConfig, TrainRunConfig, run_train
from prs_jax.train.trainer import OptimConfig, TrainerConfig
from prs_jax.world.behaviour import Behaviour, World
from prs_jax.world.corpus import (
    SKILL_OF_KIND,
    Mixture,
    curriculum_prompts,
    preference_pairs,
    sft_corpus,
    split_prompts,
    vocabulary_text,
)
from prs_jax.world.gates import GateConfig, GateError, gate_table, measure_gates, policy_pairs

# Bump when something outside prs_jax/world that shapes a build changes (the trainer, the tokenizer builder);
# edits inside prs_jax/world change the key through the source digest.
WORLD_VERSION = "3"  # 3: sampling keys by tree position (engine v2), which changes the RM's policy-sample pairs
DEFAULT_SEEDS = (0, 1, 2)


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
    train_prompts: int = 4000
    heldout_prompts: int = 512
    curriculum_prompts: int = 1000
    curriculum_conversations: int = 8000
    sft_conversations: int = 52000
    sft_eval_conversations: int = 400
    rm_pairs: int = 8000
    rm_policy_prompts: int = 600  # training prompts the SFT policy samples for the RM's own-sample pairs
    rm_policy_samples: int = 8
    rm_policy_pairs_per_prompt: int = 4
    rm_eval_pairs: int = 600
    policy: PolicySize = PolicySize()
    behaviour: Behaviour = Behaviour()
    mixture: Mixture = Mixture()
    curriculum_steps: int = 100
    sft_steps: int = 2800  # measured: 1400 -> 2800 lifts 7 gates (README, world section); still rising
    sft_batch_size: int = 48  # rows; packed (sft_packing), each holds ~2 conversations of the corpus
    sft_packing: bool = True  # several whole conversations per row of max_length (prs_jax.data.sft.pack_plan)
    sft_lr: float = 3e-3
    rm_steps: int = 900  # 600 left the 'last' and validity AUCs at 0.68-0.80
    rm_batch_size: int = 32
    rm_lr: float = 1e-3
    max_length: int = 160
    pad_multiple: int = 32
    group_by_length: int = 8
    gates: GateConfig = GateConfig()

    def __post_init__(self) -> None:
        positive = ("train_prompts", "heldout_prompts", "sft_conversations", "sft_eval_conversations", "rm_pairs",
                    "rm_eval_pairs", "sft_steps", "sft_batch_size", "rm_steps", "rm_batch_size", "max_length",
                    "pad_multiple")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"world config: {name} must be positive, got {getattr(self, name)}")
        for name in ("curriculum_prompts", "curriculum_conversations", "curriculum_steps", "rm_policy_prompts",
                     "rm_policy_samples", "rm_policy_pairs_per_prompt", "group_by_length"):
            if getattr(self, name) < 0:
                raise ValueError(f"world config: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("sft_lr", "rm_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"world config: {name} must be a positive learning rate, got {getattr(self, name)}")


def preset(name: Literal["default", "smoke"], **overrides: Any) -> WorldConfig:
    """The default world, or the smoke world (small corpus, tiny policy, few steps: for CI, not for results)."""
    if name == "default":
        return dataclasses.replace(WorldConfig(), **overrides)
    if name == "smoke":
        base = WorldConfig(train_prompts=200, heldout_prompts=16, curriculum_prompts=40, curriculum_conversations=64,
                           sft_conversations=400, sft_eval_conversations=32, rm_pairs=200, rm_policy_prompts=8,
                           rm_policy_samples=4, rm_eval_pairs=64,
                           policy=PolicySize(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                           curriculum_steps=5, sft_steps=30, sft_batch_size=16, rm_steps=20, rm_batch_size=16,
                           pad_multiple=64, gates=GateConfig(prompts=8, samples=4, vs_samples=16, enforce=False))
        return dataclasses.replace(base, **overrides)
    raise ValueError(f"unknown world preset {name!r}; use 'default' or 'smoke'.")


_BUILD_SOURCES = ("task.py", "behaviour.py", "corpus.py", "build.py")  # what the artifacts (policy, RM) depend on
_GATE_SOURCES = ("gates.py",)  # how the artifacts are measured: re-measured on a cached build, never retrained


def _source_digest(names: tuple[str, ...] = _BUILD_SOURCES) -> str:
    """Hash of world source files: editing a generator or a text invalidates cached builds."""
    h = hashlib.sha256()
    for name in names:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()


def world_key(cfg: WorldConfig) -> str:
    """A short hash of what the artifacts depend on: the config (without the gates, which only measure), the
    world version and the source of the generators, the corpus and the build."""
    config = to_dict(cfg)
    config.pop("gates", None)
    blob = json.dumps({"version": WORLD_VERSION, "source": _source_digest(), "config": config}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def gates_key(cfg: WorldConfig) -> str:
    """A short hash of how the gates are measured (gates.py and the gate config, not whether they are enforced):
    a cached world whose report carries another gates key is re-measured, not rebuilt."""
    gates = to_dict(cfg)["gates"]
    gates.pop("enforce", None)
    blob = json.dumps({"source": _source_digest(_GATE_SOURCES), "gates": gates}, sort_keys=True)
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
        """The world's prompt sampler and teacher programs (same seed as the build)."""
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


def _template_text(messages: list[dict[str, str]]) -> str:
    """A conversation rendered with the world's chat template before any tokenizer exists (its training text)."""
    import jinja2

    return jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def loss_share(rows: list[dict[str, Any]], tokenizer: Any) -> dict[str, float]:
    """Share of the SFT loss tokens (assistant turns) per skill."""
    counts: dict[str, int] = {}
    for row in rows:
        n = sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 1
                for m in row["messages"] if m["role"] == "assistant")
        skill = SKILL_OF_KIND.get(row["kind"], row["kind"])
        counts[skill] = counts.get(skill, 0) + n
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items())}


def _curve(run_dir: Path) -> list[dict[str, float]]:
    """The training loss curve (step, loss) from a trainer run's metrics.jsonl, thinned to <= 50 points."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    pts = []
    for line in f.read_text().splitlines():
        row = json.loads(line)
        loss = row.get("train/loss", row.get("loss"))
        if loss is not None and "step" in row:
            pts.append({"step": int(row["step"]), "loss": float(loss)})
    stride = max(1, len(pts) // 50)
    return pts[::stride] + ([pts[-1]] if pts and (len(pts) - 1) % stride else [])


_SAVE_EVERY = 200  # trainer checkpoints during the world's SFT / RM runs: a killed build loses at most this many steps


def _sft(cfg: WorldConfig, model: Path, train: Path, evalf: Path, out_dir: Path, export: Path, steps: int,
         console: Console, progress: bool) -> dict[str, float]:
    data_cfg = DataConfig(train=str(train), eval=str(evalf), max_length=cfg.max_length, max_prompt_length=None,
                          pad_multiple=cfg.pad_multiple, on_too_long="drop", packing=cfg.sft_packing)
    run = TrainRunConfig(
        model=str(model), data=data_cfg,
        optim=OptimConfig(lr=cfg.sft_lr, warmup_steps=max(steps // 20, 1), schedule="cosine", min_lr_ratio=0.05,
                          weight_decay=0.0),
        trainer=TrainerConfig(out_dir=str(out_dir), steps=steps, batch_size=cfg.sft_batch_size, seed=cfg.seed,
                              log_every=10, progress=progress, async_checkpoint=False, save_every=_SAVE_EVERY,
                              group_by_length=cfg.group_by_length),
        export_dir=str(export))
    return run_train("sft", run, console=console)


def _phase_done(out: Path, phase: str) -> dict[str, Any] | None:
    """What a finished phase of an interrupted build recorded (None when it has not finished)."""
    f = out / ".phases" / f"{phase}.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _phase_mark(out: Path, phase: str, **info: Any) -> None:
    (out / ".phases").mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / ".phases" / f"{phase}.json", json.dumps(info, default=float))


def build_world(cfg: WorldConfig = WorldConfig(), root: str | Path = "runs/world", force: bool = False,
                console: Console | None = None, progress: bool = True, allow_weak: bool = False) -> BuiltWorld:
    """Build the world described by `cfg` under `root` (or reuse the cached build); returns its paths. Raises
    GateError naming the failed skill gates unless `allow_weak` (or the config's gates are not enforced).

    An interrupted build resumes: every finished phase (data, tokenizer, curriculum, SFT, policy samples, RM) is
    recorded under .phases/ and skipped, and the SFT / RM runs resume from their last checkpoint (the trainer's
    exact resume), so the artifacts equal an uninterrupted build's. A cached build whose gates were measured by
    another gates.py or gate config is re-measured (minutes), not retrained."""
    console = console or Console()
    key = world_key(cfg)
    out = Path(root) / f"world-{key}"
    report_file = out / "report.json"
    if report_file.is_file() and not force:
        console.print(f"world: reusing the cached build {out}", markup=False)
        built = BuiltWorld(out, cfg, json.loads(report_file.read_text()))
        built = _remeasure_if_stale(built, console)
        _check_gates(built, allow_weak, console, print_table=False)
        return built
    if out.exists() and (force or not (out / ".phases").is_dir()):
        shutil.rmtree(out)  # --force, or a directory no resumable build wrote
    elif out.exists():
        console.print(f"world {key}: resuming the interrupted build in {out} (finished: "
                      f"{', '.join(sorted(f.stem for f in (out / '.phases').glob('*.json'))) or 'nothing'})",
                      markup=False)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (out / ".phases").mkdir(exist_ok=True)  # marks the directory as a resumable build's
    world = World(cfg.behaviour, seed=cfg.seed)

    # the corpus is a pure function of the config: drawn again on a resume (seconds), written once
    t0 = time.perf_counter()
    train_p, held_p = split_prompts(world, cfg.train_prompts, cfg.heldout_prompts, cfg.seed)
    if len(held_p) < cfg.heldout_prompts or len(train_p) < cfg.train_prompts:
        raise ValueError(f"world config: could not draw {cfg.train_prompts} train + {cfg.heldout_prompts} distinct "
                         f"held-out prompts (got {len(train_p)} + {len(held_p)}); lower the counts.")
    cur_p = curriculum_prompts(world, cfg.curriculum_prompts, cfg.seed, {p.id for p in held_p})
    rng = np.random.default_rng([cfg.seed, 3])
    cur_rows = list(sft_corpus(world, cur_p, cfg.curriculum_conversations, rng, cfg.mixture)) if cur_p else []
    sft_rows = list(sft_corpus(world, train_p, cfg.sft_conversations, rng, cfg.mixture))
    sft_eval = list(sft_corpus(world, held_p, cfg.sft_eval_conversations, rng, cfg.mixture))
    rm_rows = list(preference_pairs(world, train_p, cfg.rm_pairs, rng))
    rm_eval = list(preference_pairs(world, held_p, cfg.rm_eval_pairs, rng))
    if not _phase_done(out, "data"):
        write_jsonl(data / "sft.jsonl", sft_rows)
        write_jsonl(data / "sft_curriculum.jsonl", cur_rows)
        write_jsonl(data / "sft_eval.jsonl", sft_eval)
        write_jsonl(data / "heldout_prompts.jsonl", [{"id": p.id, "prompt": p.x, "preference": p.z} for p in held_p])
        _phase_mark(out, "data")
    timings["corpus_s"] = time.perf_counter() - t0
    console.print(f"world {key}: {len(train_p)} train / {len(held_p)} held-out prompts, {len(cur_rows)} curriculum + "
                  f"{len(sft_rows)} SFT conversations, {len(rm_rows)} teacher RM pairs -> {data}", markup=False)

    t0 = time.perf_counter()
    tok_dir, init = out / "tokenizer", out / "init"
    if not _phase_done(out, "tokenizer"):
        # every message, and rendered conversations (the template's newlines), so each pre-token is in the vocabulary
        docs = [m["content"] for row in [*cur_rows, *sft_rows] for m in row["messages"]]
        docs += [_template_text(row["messages"]) for row in sft_rows[:2000]] + vocabulary_text()
        build_tokenizer(tok_dir, vocab_size=cfg.policy.vocab_size, corpus=docs, model="word")
        build_checkpoint(init, "llama", seed=cfg.seed, tokenizer_dir=tok_dir, **dataclasses.asdict(cfg.policy))
        _phase_mark(out, "tokenizer", seconds=time.perf_counter() - t0)
    from prs_jax.models import load_tokenizer

    shares = loss_share(sft_rows, load_tokenizer(tok_dir))
    timings["tokenizer_init_s"] = _phase_done(out, "tokenizer")["seconds"]

    start = init
    if cur_rows and cfg.curriculum_steps:
        if not _phase_done(out, "curriculum"):
            t0 = time.perf_counter()
            _sft(cfg, init, data / "sft_curriculum.jsonl", data / "sft_eval.jsonl", out / "runs" / "sft_curriculum",
                 out / "curriculum", cfg.curriculum_steps, console, progress)
            _phase_mark(out, "curriculum", seconds=time.perf_counter() - t0)
        start = out / "curriculum"
    if not _phase_done(out, "sft"):
        t0 = time.perf_counter()
        metrics = _sft(cfg, start, data / "sft.jsonl", data / "sft_eval.jsonl", out / "runs" / "sft", out / "policy",
                       cfg.sft_steps, console, progress)
        _phase_mark(out, "sft", seconds=time.perf_counter() - t0, metrics=metrics)
    sft_metrics = _phase_done(out, "sft")["metrics"]
    timings["sft_s"] = sum((_phase_done(out, ph) or {}).get("seconds", 0.0) for ph in ("curriculum", "sft"))

    if not _phase_done(out, "policy_samples"):
        t0 = time.perf_counter()
        own_train = policy_pairs(out / "policy", world, train_p[: cfg.rm_policy_prompts], cfg.rm_policy_samples,
                                 cfg.rm_policy_pairs_per_prompt, seed=cfg.seed)
        # the second half of the held-out prompts: the gates measure on the first ones
        own_eval = policy_pairs(out / "policy", world, held_p[len(held_p) // 2:][:64], cfg.rm_policy_samples, 2,
                                seed=cfg.seed + 1)
        write_jsonl(data / "rm_train.jsonl", rm_rows + own_train)
        write_jsonl(data / "rm_eval.jsonl", rm_eval + own_eval)
        _phase_mark(out, "policy_samples", seconds=time.perf_counter() - t0, policy_pairs=len(own_train))
    samples = _phase_done(out, "policy_samples")
    timings["policy_samples_s"] = samples["seconds"]

    if not _phase_done(out, "rm"):
        t0 = time.perf_counter()
        rm_cfg = TrainRunConfig(
            model=str(out / "policy"),
            data=DataConfig(train=str(data / "rm_train.jsonl"), eval=str(data / "rm_eval.jsonl"),
                            max_length=cfg.max_length, max_prompt_length=None, use_chat_template=True,
                            pad_multiple=cfg.pad_multiple, on_too_long="drop"),
            loss=LossConfig(), optim=OptimConfig(lr=cfg.rm_lr, warmup_steps=max(cfg.rm_steps // 20, 1),
                                                 schedule="cosine", min_lr_ratio=0.05),
            trainer=TrainerConfig(out_dir=str(out / "runs" / "rm"), steps=cfg.rm_steps, batch_size=cfg.rm_batch_size,
                                  seed=cfg.seed, log_every=10, progress=progress, async_checkpoint=False,
                                  save_every=_SAVE_EVERY, group_by_length=cfg.group_by_length),
            export_dir=str(out / "rm"))
        metrics = run_train("rm", rm_cfg, console=console)
        _phase_mark(out, "rm", seconds=time.perf_counter() - t0, metrics=metrics)
    rm_metrics = _phase_done(out, "rm")["metrics"]
    timings["rm_s"] = _phase_done(out, "rm")["seconds"]
    shutil.rmtree(init, ignore_errors=True)
    shutil.rmtree(out / "curriculum", ignore_errors=True)

    t0 = time.perf_counter()
    provisional = BuiltWorld(out, cfg, {"key": key})
    gates = measure_gates(provisional, cfg.gates, console=console)
    timings["gates_s"] = time.perf_counter() - t0

    # a resumed build's total counts each phase once (its recorded time), not the interruption
    timings["total_s"] = sum(v for k, v in timings.items())
    report = {"key": key, "gates_key": gates_key(cfg), "version": WORLD_VERSION, "config": to_dict(cfg),
              "timings": timings, "loss_share": shares, "sft_curve": _curve(out / "runs" / "sft"),
              "sft_eval": sft_metrics, "rm_eval": rm_metrics, "rm_heldout_accuracy": rm_metrics.get("accuracy"),
              "rm_pairs": {"teacher_and_minimal": len(rm_rows), "policy": samples["policy_pairs"]},
              "gates": gates, "versions": _versions()}
    write_text_atomic(report_file, json.dumps(report, indent=2))
    console.print(f"world {key} built in {timings['total_s']:.0f} s: SFT eval loss "
                  f"{sft_metrics.get('loss', float('nan')):.3f}, proxy RM held-out pairwise accuracy "
                  f"{report['rm_heldout_accuracy']:.3f}; loss share per skill "
                  + ", ".join(f"{k} {v:.2f}" for k, v in shares.items()), markup=False)
    built = BuiltWorld(out, cfg, report)
    _check_gates(built, allow_weak, console, print_table=True)
    return built


def _remeasure_if_stale(built: BuiltWorld, console: Console) -> BuiltWorld:
    """Re-measure the gates of a cached build whose report was written under another gates key (an edit of
    gates.py or of the gate config); the artifacts are kept."""
    want = gates_key(built.config)
    if built.report.get("gates_key") == want:
        return built
    console.print(f"world {built.report.get('key')}: the gates were measured by another gates.py or gate config; "
                  "measuring them again (the policy and RM are kept)", markup=False)
    t0 = time.perf_counter()
    gates = measure_gates(built, built.config.gates, console=console)
    report = {**built.report, "gates": gates, "gates_key": want, "config": to_dict(built.config)}
    report["timings"] = {**report.get("timings", {}), "gates_s": time.perf_counter() - t0}
    write_text_atomic(built.root / "report.json", json.dumps(report, indent=2))
    built = BuiltWorld(built.root, built.config, report)
    _check_gates(built, True, console, print_table=True)
    return built


def load_world(path: str | Path, allow_weak: bool = False, console: Console | None = None) -> BuiltWorld:
    """A built world from its directory (e.g. one built with overrides): its config is read from report.json."""
    from prs_jax.config import from_dict

    path = Path(path)
    report_file = path / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{path}: not a built world (no report.json); build one with `prs-jax world build`.")
    report = json.loads(report_file.read_text())
    config = report.get("config", {})
    config.get("gates", {}).setdefault("enforce", True)
    built = BuiltWorld(path, from_dict(WorldConfig, config), report)
    _check_gates(built, allow_weak, console or Console(), print_table=False)
    return built


def _check_gates(built: BuiltWorld, allow_weak: bool, console: Console, print_table: bool) -> None:
    gates = built.report.get("gates") or {}
    if print_table and gates:
        console.print(gate_table(gates, title=f"skill gates of world {built.report.get('key')} "
                                             f"(held-out prompts; teacher = ceiling)"))
    failed = [g for g in gates.get("rows", []) if g.get("passed") is False]
    if failed and not allow_weak and built.config.gates.enforce:
        names = ", ".join(f"{g['gate']} ({g['value']:.3f} vs target {g['direction']} {g['target']})" for g in failed)
        raise GateError(f"world {built.report.get('key')} failed {len(failed)} skill gate(s): {names}. The build is "
                        f"kept in {built.root} (report.json holds the table); pass --allow-weak to use it anyway, or "
                        f"train longer (sft_steps=..., rm_steps=...).")
