"""S1: a PRS run on the tree engine vs the same sampling done the way the released PRS scripts do it
(separate calls that re-encode every prompt), side by side in one run.

    python benchmarks/bench_prs.py --out benchmarks/results/prs.json [--prompts 64 --prompt-tokens 200 --new 128]

Contenders (same random tiny Llama: hidden 256, 4 layers, vocab 32000, f32; same N and widths):
  prs_jax_shared      PRS, conversation mode: drafts share the prompt KV, feedback and refinement turns are
                      appended on the best draft's node, refinements share that context
  reencode_engine     template mode with prefix sharing off: every call gets a fresh prompt quoting the
                      question/answer/feedback, and every row prefills its own copy (the released scripts' flow)
  reencode_hf         the same re-encoding flow with transformers' generate (num_return_sequences per call)
The scorer is a cheap callable (token-count based), so time is sampling only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from prs_jax.models import load_causal_lm, load_tokenizer  # noqa: E402
from prs_jax.models.tiny import build_checkpoint  # noqa: E402
from prs_jax.strategies.base import CallableScorer, PromptItem  # noqa: E402
from prs_jax.strategies.prs import PRS  # noqa: E402
from prs_jax.tree.engine import EngineConfig, TreeEngine  # noqa: E402
from prs_jax.tree.sampling import SamplingParams  # noqa: E402

CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)


def score(prompt: str, response: str, preference: str | None) -> float:
    return float(len(response) % 97)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/prs.json"))
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="prompts per strategy call")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="prs_s1_"))
    ckpt = build_checkpoint(tmp / "llama", "llama", seed=0, **CONFIG)
    model, tok = load_causal_lm(ckpt), load_tokenizer(ckpt)
    rng = np.random.default_rng(0)
    words = ["alpha", "river", "stone", "light", "quiet", "number", "garden", "metal", "cloud", "signal"]

    def text_of(n_tokens: int) -> str:  # random words until the tokenizer counts n_tokens
        out = []
        while len(tok(" ".join(out))["input_ids"]) < n_tokens:
            out.append(str(rng.choice(words)))
        return " ".join(out)

    items = [PromptItem(f"p{i}", text_of(args.prompt_tokens), "I prefer concise answers with one example.")
             for i in range(args.prompts)]
    half = args.n // 2
    sampling = SamplingParams(temperature=0.8, top_k=50)
    common = dict(widths=(half, args.n - half), sampling=sampling, max_new_tokens=args.new,
                  feedback_max_new_tokens=args.new, stop=())
    results: dict = {"date": datetime.date.today().isoformat(), "model": CONFIG,
                     "setup": {"prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new,
                               "n": args.n, "widths": [half, args.n - half], "batch": args.batch},
                     "note": "EOS disabled: every sample runs to the token budget"}

    def run_engine(name: str, mode: str, share: bool) -> None:
        eng = TreeEngine(model, tok, seed=0, config=EngineConfig(share_prefix=share), eos_ids=[])
        prs = PRS(mode=mode, **common)
        scorer = CallableScorer(score)
        prs.run(items[:args.batch], eng, scorer)  # warm-up: compile
        eng.tree = type(eng.tree)()
        t0 = time.perf_counter()
        kv_peak = 0
        new_tokens = 0
        for start in range(0, len(items), args.batch):
            res = prs.run(items[start:start + args.batch], eng, scorer)
            kv_peak = max(kv_peak, eng.last_decode_stats["prefix_kv_bytes"] + eng.last_decode_stats["suffix_kv_bytes"])
            new_tokens += sum(len(c.tokens) for r in res for c in r.candidates)  # the N samples (feedback excluded)
            eng.release(list(eng.tree))
        wall = time.perf_counter() - t0
        n_nodes = len(eng.tree)
        results[name] = {"wall_s": wall, "sampled_tokens": new_tokens, "tok_per_s": new_tokens / wall,
                         "last_decode_kv_bytes": kv_peak, "compilations": eng.compilations, "nodes": n_nodes}
        print(name, json.dumps(results[name]))

    run_engine("prs_jax_shared", "conversation", True)
    run_engine("reencode_engine", "template", False)

    if not args.skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()

        def gen(prompts_ids: list[list[int]], n: int) -> list[list[list[int]]]:
            width = max(len(p) for p in prompts_ids)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts_ids])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=50,
                                  max_new_tokens=args.new, min_new_tokens=args.new, num_return_sequences=n,
                                  pad_token_id=0)
            new = out[:, width:].tolist()
            return [new[i * n:(i + 1) * n] for i in range(len(prompts_ids))]

        t0 = time.perf_counter()
        sampled = 0
        for start in range(0, len(items), args.batch):
            batch = items[start:start + args.batch]
            q = [tok(f"{it.prompt}\n\n{it.preference}")["input_ids"] for it in batch]
            drafts = gen(q, half)
            best = [d[0] for d in drafts]
            fb_prompts = [qq + tok("\n\nReview this answer:\n")["input_ids"] + b for qq, b in zip(q, best)]
            fbs = [f[0] for f in gen(fb_prompts, 1)]
            ref_prompts = [qq + b + tok("\n\nFeedback:\n")["input_ids"] + f for qq, b, f in zip(q, best, fbs)]
            gen(ref_prompts, args.n - half)
            sampled += len(batch) * args.n * args.new
        wall = time.perf_counter() - t0
        results["reencode_hf"] = {"wall_s": wall, "sampled_tokens": sampled, "tok_per_s": sampled / wall}
        print("reencode_hf", json.dumps(results["reencode_hf"]))

    base = results["prs_jax_shared"]["wall_s"]
    results["speedup_vs_reencode_engine"] = results["reencode_engine"]["wall_s"] / base
    if "reencode_hf" in results:
        results["speedup_vs_reencode_hf"] = results["reencode_hf"]["wall_s"] / base
    results["goal"] = ">= 3x faster than the re-encoding path"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("speedup")}))


if __name__ == "__main__":
    main()
