"""The README's main job (foundation stage): build a tiny Llama checkpoint offline, load it back through the HF
loader, and sample from it on the jit-compiled KV-cache decoder.

Weights are random until the synthetic preference world lands, so the text is gibberish; what the job shows
is the full path a real checkpoint takes (tokenizer + chat template -> safetensors -> Flax NNX -> decode ->
detokenize) and its speed, with compile time reported apart from steady-state time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
from flax import nnx
from rich.console import Console
from rich.table import Table

from prs_jax.models import encode_chat, load_causal_lm, load_tokenizer
from prs_jax.models.tiny import build_checkpoint
from prs_jax.tree.decode import generate, left_pad
from prs_jax.tree.sampling import SamplingParams

PROMPTS = [
    "List three fruits in alphabetical order.",
    "Explain reflective sampling in one sentence.",
    "What is a preference pair?",
    "Write a polite reply that mentions the deadline.",
    "Name the capital of France.",
    "Give two numbers and their sum.",
    "Describe a reward model briefly.",
    "Why does a KL penalty keep the policy close to the reference?",
]


def run_quickstart(out_dir: Path, seed: int = 0, smoke: bool = False) -> int:
    """Build (or reuse) the tiny checkpoint under `out_dir`, sample from it, print and save the results."""
    console = Console()
    ckpt = out_dir / ("tiny-llama-smoke" if smoke else "tiny-llama")
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    if not (ckpt / "config.json").is_file():
        console.print(f"building a random tiny Llama checkpoint in {ckpt} ...")
        build_checkpoint(ckpt, "llama", seed=seed, max_position_embeddings=512, **size)
    tok = load_tokenizer(ckpt)
    model = load_causal_lm(ckpt)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts = PROMPTS[:4] if smoke else PROMPTS
    ids, mask = left_pad([encode_chat(tok, [{"role": "user", "content": p}]) for p in prompts], tok.pad_token_id)
    new_tokens = 16 if smoke else 64
    results = []
    table = Table(title=f"{ckpt.name}: random weights, {len(prompts)} prompts x {new_tokens} new tokens")
    for col in ("mode", "compile+run s", "steady s", "new tok/s", "first completion (random weights)"):
        table.add_column(col)
    for mode, sampling in (("greedy", SamplingParams(greedy=True)), ("T=1.0 top_p=0.9",
                                                                     SamplingParams(temperature=1.0, top_p=0.9))):
        key = jax.random.key(seed)
        t0 = time.perf_counter()
        out = generate(model, ids, mask, max_new_tokens=new_tokens, sampling=sampling, key=key,
                       eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
        jax.block_until_ready(out.tokens)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(model, ids, mask, max_new_tokens=new_tokens, sampling=sampling, key=key,
                       eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
        jax.block_until_ready(out.tokens)
        steady = time.perf_counter() - t0
        n_new = int(out.lengths.sum())
        texts = [tok.decode(row[: int(n)], skip_special_tokens=True) for row, n in zip(out.tokens.tolist(),
                                                                                      out.lengths.tolist())]
        for p, t, n in zip(prompts, texts, out.lengths.tolist()):
            results.append({"mode": mode, "prompt": p, "completion": t, "new_tokens": n})
        table.add_row(mode, f"{first:.2f}", f"{steady:.3f}", f"{n_new / steady:.0f}", repr(texts[0][:48]))
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / ("samples-smoke.jsonl" if smoke else "samples.jsonl")
    with out_file.open("w") as fh:
        for row in results:
            fh.write(json.dumps(row) + "\n")
    console.print(f"checkpoint: {ckpt} (try `prs-jax info {ckpt}`); samples: {out_file}; parameters: {n_params:,}")
    return 0
