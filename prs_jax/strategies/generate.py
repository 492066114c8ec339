"""`prs-jax generate CONFIG`: run a sampling strategy over a prompt set and write one JSONL row per prompt.

Restartable without loss: rows are appended one batch at a time with a single write + fsync; on restart a
torn last line (a kill mid-write) is cut off and every prompt id already written is skipped, so nothing is
lost or duplicated. Multi-host: with jax.distributed each process takes every k-th prompt and writes its
own part file; `merge_parts` combines them (in prompt order, each id once).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, Literal, Sequence

from rich.console import Console
from tqdm import tqdm

from prs_jax.config import to_dict
from prs_jax.data.io import append_rows, done_ids
from prs_jax.data.prompt_sets import load_prompt_set
from prs_jax.errors import DataError
from prs_jax.strategies.base import CallableScorer, PromptItem, RewardModelScorer, Scorer
from prs_jax.strategies.prs import PRS, BestOfN
from prs_jax.strategies.verbalized import VerbalizedSampling
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams
from prs_jax.tree.scoring import RewardFormatter, RewardScorer, ScorerConfig


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """Which strategy and its budget. PRS widths default to `n` split by `split` over `depth` layers."""

    name: Literal["prs", "rand", "prand", "greedy", "vs"] = "prs"
    n: int = 16
    vs_method: Literal["direct", "cot", "sequence", "multi_turn", "vs_standard", "vs_cot", "vs_multi"] = "vs_standard"
    k: int = 5  # verbalized sampling: responses per call
    probability_upper_bound: float | None = None
    tau: float = 0.0
    widths: tuple[int, ...] | None = None
    split: float = 0.5
    depth: int = 2
    feedback: bool = True
    mode: Literal["conversation", "template"] = "conversation"
    max_new_tokens: int = 256
    feedback_max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty)

    def build(self) -> PRS | BestOfN | VerbalizedSampling:
        """The strategy object."""
        if self.name == "vs":
            return VerbalizedSampling(method=self.vs_method, k=self.k, n=self.n, sampling=self.sampling(),
                                      max_new_tokens=self.max_new_tokens,
                                      probability_upper_bound=self.probability_upper_bound, tau=self.tau)
        if self.name == "prs":
            base = PRS(widths=self.widths) if self.widths else PRS.with_budget(self.n, self.split, self.depth)
            return dataclasses.replace(base, feedback=self.feedback, mode=self.mode, sampling=self.sampling(),
                                       max_new_tokens=self.max_new_tokens,
                                       feedback_max_new_tokens=self.feedback_max_new_tokens, stop=self.stop)
        return BestOfN(n=self.n, variant=self.name, sampling=self.sampling(), max_new_tokens=self.max_new_tokens,
                       stop=self.stop)


@dataclasses.dataclass(frozen=True)
class ScorerSpec:
    """A reward model directory, or a Python callable `module:function(prompt, response, preference)`."""

    reward_model: str | None = None
    head_name: str | None = None
    formatter: Literal["chat", "template"] = "chat"
    template: str = "Human: {prompt}\n\nAssistant: {response}"
    include_preference: bool = False
    callable: str | None = None
    token_budget: int = 65536  # reward-model programs: rows x padded length (see tree.scoring.ScorerConfig)
    activation_budget_mb: int = 2048  # and their attention activations
    stable_rows: int = 4  # rows per group when the run asks for batch-invariant shapes (group_tile > 0)

    def build(self, stable: bool = False) -> Scorer:
        """The scorer; `stable` sizes reward-model programs by each pair's own lengths only."""
        if self.callable:
            module, _, fn = self.callable.partition(":")
            if not fn:
                raise ValueError(f"scorer.callable must look like 'package.module:function', got {self.callable!r}")
            return CallableScorer(getattr(importlib.import_module(module), fn))
        if not self.reward_model:
            raise ValueError("scorer: set `scorer.reward_model` (an RM checkpoint dir) or `scorer.callable`.")
        from prs_jax.models import load_reward_model, load_tokenizer

        rm = load_reward_model(self.reward_model, head_name=self.head_name)
        config = ScorerConfig(token_budget=self.token_budget, activation_budget_bytes=self.activation_budget_mb << 20,
                              stable_rows=self.stable_rows if stable else 0)
        scorer = RewardScorer(rm, load_tokenizer(self.reward_model), RewardFormatter(self.formatter, self.template),
                              config)
        return RewardModelScorer(scorer, include_preference=self.include_preference)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """A data-generation run."""

    policy: str = ""
    prompts: str = ""
    prompt_format: str = "generic"
    split: str | None = None
    prompt_column: str = "prompt"
    id_column: str = "id"
    preference_column: str = "preference"
    max_prompts: int | None = None
    out: str = "runs/generate/results.jsonl"
    batch_size: int = 8
    seed: int = 0
    with_tree: bool = False
    strategy: StrategyConfig = StrategyConfig()
    scorer: ScorerSpec = ScorerSpec()
    attention_impl: Literal["auto", "reference", "pallas"] = "auto"
    # Groups per engine program, fixed, so that every row (text, log-probs, rewards) is byte-identical whatever
    # batch_size, process count or resume point; 0 sizes programs by the batch (fewer programs, but floats can
    # differ in the last bits between batchings). Sampling keys never depend on batching either way.
    group_tile: int = 8


def read_prompt_items(cfg: GenerateConfig) -> list[PromptItem]:
    """Prompts through the prompt-set loaders (`prompt_format`: generic, alpaca_eval, mt_bench, ultrafeedback,
    hh, tldr); the generic format reads `prompt_column` / `id_column` / `preference_column`."""
    options: dict = {"limit": cfg.max_prompts}
    if cfg.prompt_format in ("generic", "jsonl"):
        options.update(prompt_column=cfg.prompt_column, id_column=cfg.id_column,
                       preference_column=cfg.preference_column)
    items = load_prompt_set(cfg.prompt_format, cfg.prompts, cfg.split, **options)
    if not items:
        raise DataError(f"{cfg.prompts}: no prompts.")
    return items


def part_path(out: Path, index: int, count: int) -> Path:
    """The file process `index` of `count` writes."""
    return out if count == 1 else out.with_name(f"{out.stem}.part{index:03d}-of-{count:03d}{out.suffix}")


def run_generate(cfg: GenerateConfig, console: Console | None = None, process_index: int = 0,
                 process_count: int = 1) -> Path:
    """Generate for every prompt not yet written; returns the file this process wrote."""
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    if not cfg.policy or not cfg.prompts:
        raise ValueError("generate: `policy` (checkpoint dir) and `prompts` (source) are required.")
    items = read_prompt_items(cfg)
    mine = items[process_index::process_count]
    out = part_path(Path(cfg.out), process_index, process_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    todo = [it for it in mine if it.id not in done]
    console.print(f"generate: {len(mine)} prompts for process {process_index}/{process_count}, {len(done)} already "
                  f"in {out}, {len(todo)} to go", markup=False)
    (out.parent / f"{out.stem}.config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if not todo:
        return out
    tok = load_tokenizer(cfg.policy)
    engine = TreeEngine(load_causal_lm(cfg.policy), tok, seed=cfg.seed,
                        config=EngineConfig(attention_impl=cfg.attention_impl, group_tile=cfg.group_tile))
    strategy = cfg.strategy.build()
    scorer = cfg.scorer.build(stable=cfg.group_tile > 0)
    with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"generate[{cfg.strategy.name}]",
              unit="prompt") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            results = strategy.run(batch, engine, scorer)
            append_rows(out, [r.to_row(with_tree=cfg.with_tree) for r in results])
            engine.release(list(engine.tree))  # the rows are written; the KV is not needed any more
            bar.update(len(batch))
            bar.set_postfix(reward=f"{sum(r.reward for r in results) / len(results):.3f}",
                            compilations=engine.compilations)
    return out


def merge_parts(out: str | Path, prompts_order: Sequence[str] | None = None) -> Path:
    """Combine `out`'s part files into `out` (each id once; in `prompts_order` if given)."""
    out = Path(out)
    parts = sorted(out.parent.glob(f"{out.stem}.part*-of-*{out.suffix}"))
    if not parts:
        raise DataError(f"{out}: no part files ({out.stem}.partNNN-of-MMM{out.suffix}) to merge.")
    rows: dict[str, dict[str, Any]] = {}
    for p in parts:
        done_ids(p)  # trims a torn line
        for line in p.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.setdefault(str(row["id"]), row)
    order = list(prompts_order) if prompts_order is not None else sorted(rows, key=lambda k: (len(k), k))
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w") as fh:
        for pid in order:
            if pid in rows:
                fh.write(json.dumps(rows[pid], ensure_ascii=False) + "\n")
    tmp.replace(out)
    return out
