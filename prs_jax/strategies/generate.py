"""`prs-jax generate CONFIG`: run a sampling strategy over a prompt set and write one JSONL row per prompt.

Restartable without loss: rows are appended one batch at a time with a single write + fsync; on restart a
torn last line (a kill mid-write) is cut off and every prompt id already written is skipped, so nothing is
lost or duplicated. The output is locked while a run writes it (data/lock.py) and stamped with the config that
decides its rows (data/stamp.py): a resume with another policy, strategy, sampling, scorer or seed is refused.
Multi-host: with jax.distributed each process takes every k-th prompt and writes its own part file;
`merge_parts` combines them (in prompt order, each id once).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Sequence

from rich.console import Console
from tqdm import tqdm

from prs_jax.config import check_ranges, import_object, require, to_dict
from prs_jax.data.io import append_rows, done_ids, write_text_atomic
from prs_jax.data.lock import check_output_file, output_lock
from prs_jax.data.stamp import check_stamp, diff_keys, read_stamp, stamp_path, write_stamp
from prs_jax.data.prompt_sets import load_prompt_set
from prs_jax.errors import ConfigError, DataError, StampError
from prs_jax.models.window import ContextError, check_fits, policy_prompt_ids, window_of
from prs_jax.strategies.base import CallableScorer, PromptItem, RewardModelScorer, Scorer, join_preference
from prs_jax.strategies.prs import PRS, BestOfN
from prs_jax.strategies.verbalized import VerbalizedSampling
from prs_jax.tree.engine import SHAPE_SCHEME, EngineConfig, TreeEngine
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

    def __post_init__(self) -> None:
        check_ranges(self, "strategy", {"n": ">= 1", "k": ">= 1", "depth": ">= 1", "split": "in (0, 1)",
                                        "max_new_tokens": ">= 1", "feedback_max_new_tokens": ">= 1",
                                        "top_k": ">= 0", "top_p": "in (0, 1]", "min_p": "in [0, 1)",
                                        "repetition_penalty": "> 0", "tau": ">= 0"})
        require(self.temperature > 0, "strategy.temperature", "> 0 (for greedy decoding use strategy.name=greedy)",
                self.temperature)
        if self.widths is not None:
            require(len(self.widths) > 0 and all(w >= 1 for w in self.widths), "strategy.widths",
                    "a non-empty list of positive integers", list(self.widths))

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty)

    @classmethod
    def of(cls, name: str, n: int, sampling: SamplingParams, **fields: Any) -> StrategyConfig:
        """A config from code that holds its sampling as SamplingParams (the studies): the sampling fields are
        copied from `sampling`, the rest are `fields`."""
        if sampling.greedy or sampling.tempered_logprobs:
            raise ConfigError("StrategyConfig.of: greedy decoding is strategy name 'greedy', and tempered log-probs "
                              "are not a strategy setting.")
        return cls(name=name, n=n, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                   min_p=sampling.min_p, presence_penalty=sampling.presence_penalty,
                   frequency_penalty=sampling.frequency_penalty, repetition_penalty=sampling.repetition_penalty,
                   **fields)

    def build(self, templates: Any = None, **runtime: Any) -> PRS | BestOfN | VerbalizedSampling:
        """The strategy object. `templates` (PRS: PRSTemplates; VS: method -> template) and `runtime` (VS:
        min_survivors, select, seed, weight_mode, ...) are settings of the code that runs it, not of this config."""
        if self.name == "vs":
            extra = {**runtime, **({"templates": templates} if templates is not None else {})}
            return VerbalizedSampling(method=self.vs_method, k=self.k, n=self.n, sampling=self.sampling(),
                                      max_new_tokens=self.max_new_tokens,
                                      probability_upper_bound=self.probability_upper_bound, tau=self.tau, **extra)
        if runtime:
            raise ConfigError(f"strategy {self.name!r}: unexpected settings {sorted(runtime)}.")
        if self.name == "prs":
            base = PRS(widths=self.widths) if self.widths else PRS.with_budget(self.n, self.split, self.depth)
            extra = {"templates": templates} if templates is not None else {}
            return dataclasses.replace(base, feedback=self.feedback, mode=self.mode, sampling=self.sampling(),
                                       max_new_tokens=self.max_new_tokens,
                                       feedback_max_new_tokens=self.feedback_max_new_tokens, stop=self.stop, **extra)
        # best-of-N has no templates: it asks the plain question
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
        """The scorer: the callable imported (it wins over `reward_model`), or the reward model loaded; `stable`
        sizes reward-model programs by each pair's own lengths only (batch-invariant scores)."""
        if self.callable:
            fn = import_object(self.callable, key="scorer.callable")
            if not callable(fn):
                raise ConfigError(f"scorer.callable: {self.callable!r} is not callable.")
            return CallableScorer(fn)
        if not self.reward_model:
            raise ConfigError("scorer: set `scorer.reward_model` (an RM checkpoint dir) or `scorer.callable` "
                              "(package.module:function).")
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

    def __post_init__(self) -> None:
        check_ranges(self, "", {"batch_size": ">= 1", "max_prompts": ">= 1"})


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


def row_config(cfg: GenerateConfig) -> dict[str, Any]:
    """The part of the config that decides an output's rows (its stamp): not the output path, batch size,
    prompt limit or attention kernel."""
    d = to_dict(cfg)
    for key in ("out", "batch_size", "max_prompts", "attention_impl"):
        d.pop(key)
    d["engine_shape_scheme"] = SHAPE_SCHEME  # the floats of a row depend on its padded shapes
    return d


def check_windows(cfg: GenerateConfig, items: Sequence[PromptItem], tokenizer: Any, window: int,
                  scorer: Scorer) -> None:
    """Before any work: every prompt (with its preference where the strategy shows it) plus
    `strategy.max_new_tokens` fits the policy, and fits the reward model; errors name the prompt id."""
    s = cfg.strategy
    rm = scorer.scorer if isinstance(scorer, RewardModelScorer) else None
    for it in items:
        text = it.prompt if s.name in ("rand", "greedy") else join_preference(it.prompt, it.preference)
        n = len(policy_prompt_ids(tokenizer, text))
        check_fits(n + s.max_new_tokens, window, model="policy",
                   what=f"prompt {it.id!r}: prompt ({n} tokens) + strategy.max_new_tokens ({s.max_new_tokens})",
                   fix="lower strategy.max_new_tokens, shorten or drop the prompt, or use a longer-context policy.")
        if rm is not None:
            shown = join_preference(it.prompt, it.preference) if cfg.scorer.include_preference else it.prompt
            head, tail = rm.formatter.split(rm.tokenizer, shown, "")
            check_fits(len(head) + len(tail) + 1, window_of(rm.rm), what=f"prompt {it.id!r}: the reward-model input",
                       model="reward model", fix="shorten or drop the prompt, or use a longer-context reward model.")


def run_generate(cfg: GenerateConfig, console: Console | None = None, process_index: int = 0,
                 process_count: int = 1) -> Path:
    """Generate for every prompt not yet written; returns the file this process wrote.

    The output is locked for the run (a second writer fails at once) and stamped with `row_config`: a resume
    with a config that would write other rows is refused, naming the keys that differ."""
    from prs_jax.models import load_causal_lm, load_tokenizer

    console = console or Console()
    if not cfg.policy or not cfg.prompts:
        raise ConfigError("generate: `policy` (checkpoint dir) and `prompts` (source) are required.")
    out = check_output_file(part_path(Path(cfg.out), process_index, process_count))
    items = read_prompt_items(cfg)
    mine = items[process_index::process_count]
    with output_lock(out):
        done = done_ids(out)
        check_stamp(stamp_path(out), row_config(cfg), resuming=bool(done), what=str(out))
        todo = [it for it in mine if it.id not in done]
        console.print(f"generate: {len(mine)} prompts for process {process_index}/{process_count}, {len(done)} "
                      f"already in {out}, {len(todo)} to go", markup=False)
        write_text_atomic(out.parent / f"{out.stem}.config.json", json.dumps(to_dict(cfg), indent=2))
        if not todo:
            return out
        strategy = cfg.strategy.build()
        scorer = cfg.scorer.build(stable=cfg.group_tile > 0)
        tok = load_tokenizer(cfg.policy)
        model = load_causal_lm(cfg.policy)
        check_windows(cfg, todo, tok, window_of(model), scorer)
        engine = TreeEngine(model, tok, seed=cfg.seed, config=EngineConfig(attention_impl=cfg.attention_impl,
                                                                        group_tile=cfg.group_tile))
        with tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"generate[{cfg.strategy.name}]",
                  unit="prompt") as bar:
            for start in range(0, len(todo), cfg.batch_size):
                batch = todo[start:start + cfg.batch_size]
                try:
                    results = strategy.run(batch, engine, scorer)
                except ValueError as e:  # the engine's window check on a grown tree (drafts, feedback, refinement)
                    if "max_position_embeddings" not in str(e):
                        raise
                    raise ContextError(f"prompt(s) {', '.join(repr(it.id) for it in batch)}: {e} Lower "
                                       "strategy.max_new_tokens / strategy.feedback_max_new_tokens or use a "
                                       "longer-context policy.") from None
                append_rows(out, [r.to_row(with_tree=cfg.with_tree) for r in results])
                engine.release(list(engine.tree))  # the rows are written; the KV is not needed any more
                bar.update(len(batch))
                bar.set_postfix(reward=f"{sum(r.reward for r in results) / len(results):.3f}",
                                compilations=engine.compilations)
    return out


def merge_parts(out: str | Path, prompts_order: Sequence[str] | None = None) -> Path:
    """Combine `out`'s part files into `out` (each id once; in `prompts_order` if given). The parts must carry
    the same config stamp; `out` is locked, written to a temporary file and renamed, and stamped like them."""
    out = check_output_file(out)
    parts = sorted(out.parent.glob(f"{out.stem}.part*-of-*{out.suffix}"))
    if not parts:
        raise DataError(f"{out}: no part files ({out.stem}.partNNN-of-MMM{out.suffix}) to merge.")
    stamps = {p: read_stamp(stamp_path(p)) for p in parts}
    configs = {json.dumps(s["config"], sort_keys=True) for s in stamps.values() if s is not None}
    if len(configs) > 1:
        first, *_ = [p for p, s in stamps.items() if s is not None]
        other = next(p for p, s in stamps.items() if s is not None and s["config"] != stamps[first]["config"])
        keys = diff_keys(stamps[first]["config"], stamps[other]["config"])
        raise StampError(f"{out}: part files were written with different configs ({first.name} and {other.name} "
                         f"differ in {', '.join(keys)}); rerun the parts with one config before merging.")
    rows: dict[str, dict[str, Any]] = {}
    with output_lock(out):
        for p in parts:
            with output_lock(p):
                done_ids(p)  # trims a torn line, and names a broken one
                for line in p.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        row = json.loads(line)
                        rows.setdefault(str(row["id"]), row)
        order = list(prompts_order) if prompts_order is not None else sorted(rows, key=lambda k: (len(k), k))
        tmp = out.with_suffix(out.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for pid in order:
                if pid in rows:
                    fh.write(json.dumps(rows[pid], ensure_ascii=False) + "\n")
        tmp.replace(out)
        stamp = next((s for s in stamps.values() if s is not None), None)
        if stamp is not None:
            write_stamp(stamp_path(out), stamp["config"])
    return out
