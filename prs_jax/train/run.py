"""`prs-jax train sft|rm|dpo CONFIG [key=value ...]`: typed run configs wired to data, models and the trainer."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Sequence

import numpy as np
from rich.console import Console

from prs_jax.config import check_ranges, to_dict
from prs_jax.data.batching import ExampleSource, pad_id_of
from prs_jax.data.io import iter_rows
from prs_jax.data.pairs import collate_pairs, tokenize_pairs
from prs_jax.data.sft import collate_sft, collate_sft_packed, pack_plan, tokenize_sft
from prs_jax.errors import ConfigError
from prs_jax.models import load_causal_lm, load_reward_model, load_tokenizer, save_pretrained
from prs_jax.train.logprobs import LogProbConfig
from prs_jax.train.objectives import PreferenceLoss, RewardLoss, SFTLoss
from prs_jax.train.reference import batch_arrays, cache_key, cached_reference, compute_reference
from prs_jax.train.trainer import ArraySource, OptimConfig, Trainer, TrainerConfig

Task = Literal["sft", "rm", "dpo"]

# The prompt-augmentation text p of Sr-DPO / Sr-IPO (our wording; replace it with `loss.prompt_prefix=...`).
DEFAULT_PROMPT_PREFIX = ("Give the best response you can to the request below: one that a careful expert would "
                         "score 100 out of 100 for helpfulness, accuracy and clarity, while staying honest and "
                         "harmless.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is tokenised (see prs_jax.data)."""

    train: str = ""
    eval: str | None = None
    split: str | None = None
    eval_split: str | None = None
    max_length: int = 512
    max_prompt_length: int | None = 256
    truncation: Literal["keep_start", "keep_end"] = "keep_end"
    on_too_long: Literal["error", "drop"] = "error"
    use_chat_template: bool | None = None
    pad_to: Literal["bucket", "max_length"] = "bucket"
    pad_multiple: int = 64  # bucketed batches pad to a multiple of this (smaller: less padding, more compiles)
    soft_label_column: str = "p_chosen"
    # SFT only: pack several whole conversations into each training row of max_length tokens (each attends only
    # to itself, positions restart), so a step carries ~max_length / mean length conversations per row instead
    # of padding; the eval set stays one conversation per row
    packing: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, "data", {"max_length": ">= 1", "max_prompt_length": ">= 1", "pad_multiple": ">= 1"})


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """DPO-family loss (name in prs_jax.train.losses.LOSSES), Sr-* prompt augmentation, RM label mode."""

    name: str = "sigmoid"
    beta: float = 0.1
    lam: float = 0.5
    eps: float = 0.1
    ipo_normalize: Literal["sum", "mean"] = "sum"
    prompt_prefix: str = DEFAULT_PROMPT_PREFIX
    placement: Literal["user_turn_start", "system", "raw_prefix"] = "user_turn_start"
    soft_labels: bool = False
    delta_reference: Literal["augmented", "plain"] = "augmented"  # Sr-*: objectives.PreferenceLoss
    ipo_delta_units: Literal["reward", "log_ratio"] = "reward"  # Sr-IPO: losses.sr_ipo's delta_units

    def __post_init__(self) -> None:
        check_ranges(self, "loss", {"beta": "> 0", "lam": ">= 0", "eps": ">= 0"})


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """One training run: model(s), data, loss, optimizer, loop."""

    model: str = ""
    ref_model: str | None = None  # default: the policy's starting checkpoint
    tokenizer: str | None = None  # default: the model directory
    dtype: Literal["float32", "bfloat16"] = "float32"
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    precompute_ref: bool = False
    ref_cache_dir: str = "runs/ref_cache"
    export_dir: str | None = None
    logprob_method: Literal["plain", "chunked", "pallas"] = "chunked"
    remat: bool = False  # rematerialise decoder layers in the backward pass (less memory, ~1.3x compute)
    # preference pairs: "packed" rows [prompt | chosen | rejected] compute the prompt once;
    # "cascade": the prompt once as its own row, responses attend to it by cascade attention (prompts must not
    # be empty; no remat; log-prob losses only); "separate" rows [prompt | chosen], [prompt | rejected] (the
    # unshared forward); "auto" (default): cascade, the fastest (benchmarks/results/train.json), wherever it
    # applies, else packed (`resolve_pair_layout`). Same results (tests/train/test_packed_pairs.py)
    pair_layout: Literal["auto", "packed", "cascade", "separate"] = "auto"
    rm_head_name: str | None = None
    rm_init_head: bool = True


def resolve_pair_layout(requested: str, task: Task, remat: bool, examples: Sequence[Any]) -> tuple[str, str]:
    """The pair layout a run uses and why: an explicit layout is kept; "auto" picks "cascade" (measured fastest
    for DPO-family steps) when the loss is a log-prob loss (not a reward model), remat is off and every prompt
    (and Sr-* augmented prompt) has a token, and "packed" otherwise (same results)."""
    if requested != "auto":
        return requested, "as configured"
    if task != "dpo":
        return "packed", "reward models read hidden states of packed rows"
    if remat:
        return "packed", "remat is on (the cascade path keeps its activations)"
    for i, e in enumerate(examples):
        aug = getattr(e, "augmented", None)
        if len(e.prompt_ids) == 0 or (aug is not None and len(aug.prompt_ids) == 0):
            return "packed", f"pair {i} ({getattr(e, 'where', '?')}) has an empty prompt"
    return "cascade", "log-prob loss, no remat, every prompt non-empty"


def run_train(task: Task, cfg: TrainRunConfig, console: Console | None = None) -> dict[str, float]:
    """Run a training job end to end; returns the final evaluation metrics (or the last train metrics)."""
    console = console or Console()
    if not cfg.model:
        raise ConfigError("train: `model` (a local HF checkpoint directory) is required.")
    if not cfg.data.train:
        raise ConfigError("train: `data.train` (JSONL / Parquet / datasets source) is required.")
    tok = load_tokenizer(cfg.tokenizer or cfg.model)
    pad = pad_id_of(tok)
    d = cfg.data
    common = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                  on_too_long=d.on_too_long, use_chat_template=d.use_chat_template)
    frozen: dict[str, Any] = {}
    loss_fn: Any
    lp = LogProbConfig(method=cfg.logprob_method, remat=cfg.remat)
    if task == "sft":
        model: Any = load_causal_lm(cfg.model, dtype=cfg.dtype)

        def make(source, split, pack=False):
            examples, report = tokenize_sft(iter_rows(source, split), tok, **common)
            console.print(f"data: {source}: {report.summary()}", markup=False)
            if pack:
                plan = pack_plan([len(e.prompt_ids) + len(e.response_ids) for e in examples], d.max_length,
                                 seed=cfg.trainer.seed)
                console.print(f"packing: {len(examples)} conversations in {len(plan)} rows of <= {d.max_length} "
                              f"tokens ({len(examples) / len(plan):.2f} per row)", markup=False)
                return ExampleSource([[examples[i] for i in row] for row in plan],
                                     functools.partial(collate_sft_packed, max_length=d.max_length, pad_id=pad,
                                                       pad_to=d.pad_to, multiple=d.pad_multiple),
                                     length_fn=lambda g: sum(len(e.prompt_ids) + len(e.response_ids) for e in g))
            return ExampleSource(examples, functools.partial(collate_sft, max_length=d.max_length, pad_id=pad,
                                                             pad_to=d.pad_to, multiple=d.pad_multiple),
                                 length_fn=lambda e: len(e.prompt_ids) + len(e.response_ids))

        loss_fn = SFTLoss(lp)
    else:
        loss = PreferenceLoss(cfg.loss.name, cfg.loss.beta, cfg.loss.lam, cfg.loss.eps, cfg.loss.ipo_normalize, lp,
                              delta_reference=cfg.loss.delta_reference, ipo_delta_units=cfg.loss.ipo_delta_units)
        augmented = task == "dpo" and loss.augmented
        pair_kw = dict(common, soft_label_column=d.soft_label_column,
                       prompt_prefix=cfg.loss.prompt_prefix if augmented else None, placement=cfg.loss.placement)
        if task == "rm":
            model = load_reward_model(cfg.model, dtype=cfg.dtype, head_name=cfg.rm_head_name,
                                      init_head=cfg.rm_init_head)
            loss_fn = RewardLoss(soft_labels=cfg.loss.soft_labels, remat=cfg.remat)
        else:
            model = load_causal_lm(cfg.model, dtype=cfg.dtype)
            loss_fn = loss
        ref_dir = cfg.ref_model or cfg.model

        def make(source, split):
            examples, report = tokenize_pairs(iter_rows(source, split), tok, **pair_kw)
            console.print(f"data: {source}: {report.summary()}", markup=False)
            layout, why = resolve_pair_layout(cfg.pair_layout, task, cfg.remat, examples)
            console.print(f"pair layout: {layout} ({why})", markup=False)
            collate = functools.partial(collate_pairs, max_length=d.max_length, pad_id=pad, pad_to=d.pad_to,
                                        multiple=d.pad_multiple, layout=layout)
            if task != "dpo" or not cfg.precompute_ref:
                return ExampleSource(examples, collate,
                                     length_fn=lambda e: len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids))
            # the whole set as one batch (shapes: its longest row, bucketed), reference log-probs attached
            data = collate_pairs(examples, d.max_length, pad, multiple=d.pad_multiple, layout=layout)
            key = cache_key(ref_dir, batch_arrays(data), cfg.tokenizer or cfg.model,
                            extra=[cfg.logprob_method, cfg.dtype])
            refs, hit = cached_reference(cfg.ref_cache_dir, key, lambda: compute_reference(
                load_causal_lm(ref_dir, dtype=cfg.dtype), data, batch_size=cfg.trainer.batch_size,
                augmented=augmented, config=lp))
            console.print(f"reference log-probs {'loaded from cache' if hit else 'computed and cached'} "
                          f"({cfg.ref_cache_dir}, key {key})", markup=False)
            return ArraySource(dataclasses.replace(data, **{k: np.asarray(v) for k, v in refs.items()}))

        if task == "dpo" and not cfg.precompute_ref:
            frozen["ref"] = load_causal_lm(ref_dir, dtype=cfg.dtype)
    if d.packing and task != "sft":
        raise ConfigError(f"data.packing: sequence packing is for SFT only (task is {task!r}); preference pairs "
                          "already share their prompt (pair_layout).")
    train_src = make(d.train, d.split, pack=True) if task == "sft" and d.packing else make(d.train, d.split)
    eval_src = make(d.eval, d.eval_split) if d.eval else None
    trainer = Trainer(model, loss_fn, cfg.trainer, cfg.optim, frozen=frozen,
                      run_config={"task": task, **to_dict(cfg)})
    last = trainer.fit(train_src, eval_source=eval_src)
    result = trainer.evaluate(eval_src) if eval_src is not None else last
    if cfg.export_dir:
        out = save_pretrained(trainer.model, cfg.export_dir, tokenizer=cfg.tokenizer or cfg.model)
        console.print(f"export: HF checkpoint written to {out}", markup=False)
    console.print("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
    return result
