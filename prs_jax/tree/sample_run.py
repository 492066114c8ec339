"""`prs-jax sample`: n completions per prompt from a JSONL file, written as JSONL, on the tree engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from prs_jax.errors import PrsJaxError
from prs_jax.models import load_causal_lm, load_tokenizer
from prs_jax.tree.engine import EngineConfig, TreeEngine
from prs_jax.tree.sampling import SamplingParams


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; each needs 'prompt' (text) or 'messages' (chat list). Errors name file and line."""
    rows = []
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrsJaxError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
                raise PrsJaxError(f"{path}:{lineno}: each row needs a 'prompt' string or a 'messages' list.")
            if "prompt" in row and not (isinstance(row["prompt"], str) and row["prompt"]):
                raise PrsJaxError(f"{path}:{lineno}: 'prompt' must be a non-empty string.")
            rows.append(row)
    if not rows:
        raise PrsJaxError(f"{path}: no prompts.")
    return rows


def run_sample(checkpoint: Path, prompts_file: Path, out_file: Path, *, n: int, max_new_tokens: int,
               sampling: SamplingParams, seed: int, batch_size: int, chat: bool, stop: Sequence[str] = (),
               group_tile: int = 8) -> int:
    """Sample `n` completions for every prompt, `batch_size` prompts per engine call; returns rows written.

    Each prompt's samples are keyed by (seed, the row's "id" if it has one else its index in the file, the
    prompt's tokens), and programs run `group_tile` groups each (`EngineConfig.group_tile`): the output does not
    depend on `batch_size`, to the byte."""
    rows = read_prompts(prompts_file)
    tok = load_tokenizer(checkpoint)
    model = load_causal_lm(checkpoint)
    engine = TreeEngine(model, tok, seed=seed, config=EngineConfig(group_tile=group_tile))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out_file, "w") as fh, tqdm(total=len(rows), desc="sampling", unit="prompt") as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            items = [r["messages"] if "messages" in r else (
                [{"role": "user", "content": r["prompt"]}] if chat else r["prompt"]) for r in batch]
            ids = [str(r["id"]) if r.get("id") is not None else f"#{start + i}" for i, r in enumerate(batch)]
            roots = engine.add_prompts(items, ids=ids)
            children = engine.expand(roots, n, sampling, max_new_tokens=max_new_tokens, stop=list(stop) or None)
            for row, kids in zip(batch, children):
                out = dict(row)
                out["completions"] = [{"text": k.text, "finish_reason": k.finish_reason, "num_tokens": len(k.tokens),
                                       "sum_logprob": k.sum_logprob} for k in kids]
                fh.write(json.dumps(out) + "\n")
                written += 1
            engine.release([k for ks in children for k in ks] + list(roots))
            bar.update(len(batch))
            bar.set_postfix(compilations=engine.compilations)
    return written
