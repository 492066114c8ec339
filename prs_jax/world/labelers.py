"""The world's AI labelers (RLAIF): SEPARATE models from the policy, at three sizes, trained on judge rows (label
only and with the two-critique rationale) and critique rows, built and cached inside a built world on first use
(`labelers/<size>/`), with the labeler gates measured on the largest:

  labeler_teacher_accuracy   debiased accuracy on teacher pairs (the answer with fewer violations)   >= 0.85
  labeler_policy_accuracy    debiased accuracy on gold-ranked pairs of the policy's own samples      >= 0.75
  labeler_position_bias      share of pairs whose preferred position is the same in both orders      <= 0.35
                             (without chain of thought)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from prs_jax.data.io import write_jsonl
from prs_jax.world.ceiling import prompt_rng
from prs_jax.world.corpus import JUDGE_PROMPT, Mixture, _judge_pair, query, sample_pairs, sft_corpus, split_prompts
from prs_jax.world.gates import GateError, _prompt_of, _row, gate_table

# judging needs the critique skill (the rationale is the two critiques): critique rows, drills included
LABELER_MIXTURE = Mixture(**{f.name: 0.0 for f in dataclasses.fields(Mixture)} | {
    "judge": 0.45, "judge_cot": 0.25, "critique_given": 0.12, "critique_drill": 0.08, "critique": 0.1})


@dataclasses.dataclass(frozen=True)
class LabelerSize:
    """One labeler's name and Llama dimensions."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int = 4


@dataclasses.dataclass(frozen=True)
class LabelerBuildConfig:
    """What the labelers are trained on and how long."""

    sizes: tuple[LabelerSize, ...] = (LabelerSize("small", 64, 192, 2), LabelerSize("medium", 96, 288, 3),
                                      LabelerSize("large", 128, 384, 4))
    mixture: Mixture = LABELER_MIXTURE  # part of the fingerprint: another mixture rebuilds the labelers
    conversations: int = 24000
    steps: int = 600
    batch_size: int = 48
    lr: float = 3e-3
    gate_pairs: int = 200
    packing: bool = True  # several conversations per training row (prs_jax.data.sft.pack_plan)
    teacher_accuracy: float = 0.85
    policy_accuracy: float = 0.75
    position_bias: float = 0.35


def labeler_dir(built: Any, size: str) -> Path:
    """Where the labeler of `size` lives inside a built world."""
    return Path(built.root) / "labelers" / size


def build_labelers(built: Any, cfg: LabelerBuildConfig = LabelerBuildConfig(), console: Console | None = None,
                   progress: bool = True, allow_weak: bool = False) -> dict[str, Any]:
    """Train (or reuse) the labelers of a built world; returns {"paths", "gates"}. Raises GateError when the
    largest misses a labeler gate, unless `allow_weak`."""
    from prs_jax.models.tiny import build_checkpoint
    from prs_jax.train.run import DataConfig, TrainRunConfig, run_train
    from prs_jax.train.trainer import OptimConfig, TrainerConfig

    console = console or Console()
    root = Path(built.root) / "labelers"
    report_file = root / "report.json"
    fingerprint = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        if report.get("config") == fingerprint:
            _check(report, allow_weak, built.config.gates.enforce)
            return report
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    wcfg = built.config
    world = built.world()
    train_p, _ = split_prompts(world, wcfg.train_prompts, wcfg.heldout_prompts, wcfg.seed)
    rng = np.random.default_rng([wcfg.seed, 9])
    rows = list(sft_corpus(world, train_p, cfg.conversations, rng, cfg.mixture))
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "eval.jsonl", list(sft_corpus(world, train_p[:200], 200, rng, cfg.mixture)))
    paths, timings = {}, {}
    for size in cfg.sizes:
        t0 = time.perf_counter()
        init = build_checkpoint(root / f"init-{size.name}", "llama", seed=wcfg.seed, tokenizer_dir=built.tokenizer,
                                hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                                num_hidden_layers=size.num_hidden_layers, num_attention_heads=size.num_attention_heads,
                                num_key_value_heads=size.num_attention_heads, vocab_size=wcfg.policy.vocab_size,
                                max_position_embeddings=wcfg.policy.max_position_embeddings)
        run = TrainRunConfig(
            model=str(init), data=DataConfig(train=str(root / "train.jsonl"), eval=str(root / "eval.jsonl"),
                                             max_length=wcfg.max_length, max_prompt_length=None,
                                             pad_multiple=wcfg.pad_multiple, on_too_long="drop",
                                             packing=cfg.packing),
            optim=OptimConfig(lr=cfg.lr, warmup_steps=max(cfg.steps // 20, 1), schedule="cosine", min_lr_ratio=0.05),
            trainer=TrainerConfig(out_dir=str(root / "runs" / size.name), steps=cfg.steps, batch_size=cfg.batch_size,
                                  seed=wcfg.seed, log_every=10, progress=progress, async_checkpoint=False,
                                  group_by_length=wcfg.group_by_length),
            export_dir=str(labeler_dir(built, size.name)))
        run_train("sft", run, console=console)
        shutil.rmtree(init, ignore_errors=True)
        paths[size.name] = str(labeler_dir(built, size.name))
        timings[size.name] = time.perf_counter() - t0
    largest = max(cfg.sizes, key=lambda s: s.hidden_size * s.num_hidden_layers)
    gates = measure_labeler(built, labeler_dir(built, largest.name), cfg)
    report = {"config": fingerprint, "paths": paths, "timings": timings, "gated": largest.name, "gates": gates}
    report_file.write_text(json.dumps(report, indent=2))
    console.print(gate_table(gates, title=f"labeler gates ({largest.name} labeler, world {built.report.get('key')})"))
    _check(report, allow_weak, built.config.gates.enforce)
    return report


def _check(report: dict[str, Any], allow_weak: bool, enforce: bool) -> None:
    failed = [g for g in report["gates"]["rows"] if g.get("passed") is False]
    if failed and enforce and not allow_weak:
        raise GateError("labelers failed " + ", ".join(f"{g['gate']} ({g['value']:.3f} vs {g['direction']} "
                                                          f"{g['target']})" for g in failed)
                        + "; pass allow_weak to use them anyway, or train longer (steps=...).")


def measure_labeler(built: Any, path: Path | str, cfg: LabelerBuildConfig) -> dict[str, Any]:
    """Debiased accuracy on teacher and policy pairs and the position-bias rate of one labeler (no CoT)."""
    from prs_jax.feedback.labeler import AILabeler, LabelerConfig
    from prs_jax.world.gates import _engine, _user
    from prs_jax.tree.sampling import SamplingParams

    world = built.world()
    seed = built.config.seed
    prompts = [_prompt_of(r) for r in built.heldout()[: cfg.gate_pairs]]
    lab = AILabeler.from_pretrained(str(path), LabelerConfig(prompt=JUDGE_PROMPT, both_orders=True))
    teacher = [_judge_pair(world, p, prompt_rng(seed, p.id, 30), cot=True) for p in prompts]
    ctx = [query(p) for p in prompts]
    t_labels = lab.label(ctx, [a.text() for a, _, _ in teacher], [b.text() for _, b, _ in teacher], seed=seed)
    t_acc = float(np.mean([(lab_.p_a > 0.5) == (y == 1) for lab_, (_, _, y) in zip(t_labels, teacher)]))
    bias = float(np.mean([(lab_.ab.dist[0] > 0.5) == (lab_.ba.dist[0] > 0.5) for lab_ in t_labels]))
    engine, _ = _engine(built.policy, seed + 31)
    roots = engine.add_prompts([_user(query(p)) for p in prompts])
    kids = engine.expand(roots, 4, SamplingParams(temperature=1.0), max_new_tokens=40)
    pairs = []
    for p, ks in zip(prompts, kids):
        for row in sample_pairs(p, [k.text for k in ks], prompt_rng(seed, p.id, 32), 1):
            pairs.append((query(p), row["chosen"][0]["content"], row["rejected"][0]["content"]))
    p_acc = float("nan")
    if pairs:
        half = len(pairs) // 2  # chosen first in one half, second in the other
        a = [c if i < half else r for i, (_, c, r) in enumerate(pairs)]
        b = [r if i < half else c for i, (_, c, r) in enumerate(pairs)]
        p_labels = lab.label([q for q, _, _ in pairs], a, b, seed=seed)
        p_acc = float(np.mean([(lab_.p_a > 0.5) == (i < half) for i, lab_ in enumerate(p_labels)]))
    rows = [_row("labeler_teacher_accuracy", t_acc, cfg.teacher_accuracy, 1.0, note=f"{len(teacher)} pairs"),
            _row("labeler_policy_accuracy", p_acc, cfg.policy_accuracy, None, note=f"{len(pairs)} pairs"),
            _row("labeler_position_bias", bias, cfg.position_bias, None, upper=True,
                 note="same position preferred in both orders, no CoT")]
    return {"rows": rows}
