"""`prs-jax sample`: n completions per prompt from a JSONL file, written as JSONL, on the tree engine."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from prs_jax.config import check_ranges, to_dict
from prs_jax.data.io import iter_jsonl
from prs_jax.data.lock import check_output_file, output_lock
from prs_jax.errors import ConfigError, DataError
from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.models.window import check_fits, window_of
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each needs 'prompt' (text) or 'messages' (chat list). Errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompts file not found" + (" (it is a directory)" if path.is_dir() else "")
                        + "; give a JSONL file with a 'prompt' or 'messages' per line.")
    rows = []
    for r in iter_jsonl(path):
        row = r.data
        if not ({"prompt", "messages"} & set(row)):
            raise DataError(f"{r.where}: each row needs a 'prompt' string or a 'messages' list.")
        if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"]):
            raise DataError(f"{r.where}: 'prompt' must be a non-empty string.")
        if "messages" in row and "prompt" not in row and not (isinstance(row["messages"], list) and row["messages"]):
            raise DataError(f"{r.where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts.")
        rows.append(dict(row, _where=r.where))
    if not rows:
        raise DataError(f"{path}: no prompts.")
    return rows


# the flags of `prs-jax sample` are shortcuts for these keys of SampleRunConfig
FLAG_KEYS: dict[str, str] = {
    "out": "out", "n": "n", "max_new_tokens": "max-new-tokens", "seed": "seed", "batch_size": "batch-size",
    "stop": "stop", "chat": "raw", "sampling.temperature": "temperature", "sampling.top_k": "top-k",
    "sampling.top_p": "top-p", "sampling.min_p": "min-p", "sampling.repetition_penalty": "repetition-penalty",
    "sampling.presence_penalty": "presence-penalty", "sampling.frequency_penalty": "frequency-penalty",
    "sampling.greedy": "greedy",
}


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The sampling section of a `sample` run (SamplingParams' fields, checked with their dotted keys)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy:
            check_ranges(self, "sampling", {"temperature": "> 0"})
        check_ranges(self, "sampling", {"top_k": ">= 0", "top_p": "in (0, 1]", "min_p": "in [0, 1)",
                                         "repetition_penalty": "> 0"})

    def params(self) -> SamplingParams:
        """The engine's SamplingParams (greedy decoding ignores the temperature)."""
        kw = dataclasses.asdict(self)
        if self.greedy:
            kw["temperature"] = 1.0
        return SamplingParams(**kw)


@dataclasses.dataclass(frozen=True)
class SampleRunConfig:
    """`prs-jax sample`: `n` completions for every prompt of a JSONL file.

    Given as YAML plus dotted overrides (`prs-jax sample run.yaml n=8 sampling.top_p=0.9`), like every other
    command; the flags (`--n 8 --top-p 0.9`) and the two positionals (CKPT PROMPTS) are shortcuts for keys."""

    checkpoint: str = ""
    prompts: str = ""
    out: str = ""
    n: int = 1
    max_new_tokens: int = 128
    sampling: SampleConfig = SampleConfig()
    seed: int = 0
    batch_size: int = 16  # prompts per engine call (the rows do not depend on it)
    chat: bool = True  # 'prompt' becomes a user chat turn; false: raw text
    stop: tuple[str, ...] = ()
    group_tile: int = 8  # groups per engine program (EngineConfig.group_tile)

    def __post_init__(self) -> None:
        check_ranges(self, "", {"n": ">= 1", "max_new_tokens": ">= 1", "batch_size": ">= 1", "group_tile": ">= 0"})
        for key, what in (("checkpoint", "a local HF causal-LM checkpoint directory"),
                          ("prompts", "a JSONL file with a 'prompt' or 'messages' per line"),
                          ("out", "the output JSONL path")):
            if not str(getattr(self, key)).strip():
                flag = "--out OUT" if key == "out" else key.upper()
                raise ConfigError(f"no {key} given: pass {what} as `{key}=...`, in the YAML config, or as {flag}.")


def run_sample_config(cfg: SampleRunConfig) -> int:
    """Run a `SampleRunConfig` (the resolved config is written beside the output as OUT.config.json)."""
    return run_sample(Path(cfg.checkpoint), Path(cfg.prompts), Path(cfg.out), n=cfg.n,
                      max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling.params(), seed=cfg.seed,
                      batch_size=cfg.batch_size, chat=cfg.chat, stop=cfg.stop, group_tile=cfg.group_tile,
                      provenance=to_dict(cfg))


def check_sample_args(*, n: int, max_new_tokens: int, batch_size: int) -> None:
    """Usage checks of `run_sample`'s arguments, named by their keys."""
    for key, value in (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}.")


def run_sample(checkpoint: Path, prompts_file: Path, out_file: Path, *, n: int, max_new_tokens: int,
               sampling: SamplingParams, seed: int, batch_size: int, chat: bool, stop: Sequence[str] = (),
               group_tile: int = 8, provenance: dict[str, Any] | None = None) -> int:
    """Sample `n` completions for every prompt, `batch_size` prompts per engine call; returns rows written.

    Each prompt's samples are keyed by (seed, the row's "id" if it has one else its index in the file, the
    prompt's tokens), and programs run `group_tile` groups each (`EngineConfig.group_tile`): the output does not
    depend on `batch_size`, to the byte.

    Arguments and inputs are checked before anything is written; the output is locked, written to a temporary
    file and renamed when complete, so a bad argument or a failed run leaves an existing output as it was."""
    check_sample_args(n=n, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out_file = check_output_file(out_file)
    rows = read_prompts(prompts_file)
    tok = load_tokenizer(checkpoint)
    model = load_causal_lm(checkpoint)
    engine = TreeEngine(model, tok, seed=seed, config=EngineConfig(group_tile=group_tile))
    items = [r["messages"] if "messages" in r else (
        [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"]) for r in rows]
    for r, item in zip(rows, items):
        name = f"prompt {r['id']!r} ({r['_where']})" if "id" in r else f"prompt at {r['_where']}"
        n_tok = len(engine.encode(item))
        check_fits(n_tok + max_new_tokens, window_of(model), what=f"{name}: prompt ({n_tok} tokens) + "
                   f"max_new_tokens ({max_new_tokens})", model="policy",
                   fix="lower max_new_tokens (--max-new-tokens), shorten or drop the prompt, or use a "
                       "longer-context model.")
    tmp = out_file.with_name(out_file.name + ".tmp")
    with output_lock(out_file):
        try:
            _write_samples(tmp, rows, items, engine, n, sampling, max_new_tokens, batch_size, stop)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(out_file)
        if provenance is not None:  # what wrote the rows (run_sample_config passes the resolved config)
            out_file.with_name(out_file.name + ".config.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return len(rows)


def _write_samples(tmp: Path, rows: list[dict[str, Any]], items: list[Any], engine: TreeEngine, n: int,
                   sampling: SamplingParams, max_new_tokens: int, batch_size: int, stop: Sequence[str]) -> None:
    """Sample batch by batch into `tmp` (one JSON row per prompt)."""
    with open(tmp, "w", encoding="utf-8") as fh, tqdm(total=len(rows), desc="sampling", unit="prompt") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            ids = [str(r["id"]) if r.get("id") is not None else f"#{start + i}" for i, r in enumerate(batch)]
            roots = engine.add_prompts(items[start:start + batch_size], ids=ids)
            children = engine.expand(roots, n, sampling, max_new_tokens=max_new_tokens, stop=list(stop) or None)
            for row, kids in zip(batch, children):
                out = {k: v for k, v in row.items() if k != "_where"}
                out["completions"] = [{"text": k.text, "finish_reason": k.finish_reason,
                                       "num_tokens": len(k.tokens), "sum_logprob": k.sum_logprob} for k in kids]
                fh.write(json.dumps(out, ensure_ascii=False) + "\n")
            engine.release([k for ks in children for k in ks] + list(roots))
            bar.update(len(batch))
            bar.set_postfix(compilations=engine.compilations)
