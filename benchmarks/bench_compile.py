"""Compile time and step time of a deep model's training step: layers stacked and scanned (`scan_layers=True`) vs
unrolled.

    python benchmarks/bench_compile.py --out benchmarks/results/compile.json [--quick]

Model: a random Llama with 32 layers of tiny width (hidden 64, 4 heads / 2 kv heads, MLP 128, vocab 512,
float32), built in memory (no checkpoint). Step: the Trainer's jitted `_train_step` (forward + backward of a
next-token cross-entropy over every position, gradient clipping, AdamW), batch 8 x 64 tokens.

Contenders, side by side in one run: unrolled, scanned, unrolled + remat, scanned + remat (remat: each layer
recomputed in the backward pass; with scan, the scan body is checkpointed). The scanned models store their
layers stacked (one Block with a leading layer axis) and start from the unrolled model's values, so the losses
agree. For each contender and each round:
trace + lower time (`jit(...).lower`), XLA compile time (`Lowered.compile`) and the compiled program's
temporaries (memory_analysis); then `--steps` timed steps of the compiled program after one warm-up (until the
outputs are ready). Rounds alternate the contenders; medians are reported, and the ratios scanned / unrolled.
`--sweep` adds other depths (compile time only, one round): how each contender's compile time grows with depth.
`prestacked_reference` (not a Trainer contender): the same step written by hand over a scan_layers model's stacked
parameters (plain optax over a dict, no Trainer), compile time at each depth: the floor the scanned Trainer step
should reach.
The load average is recorded: timings on a shared machine drift; compare ratios within one run.
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

os.environ.setdefault("TQDM_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from prs_jax.models import CausalLM, ModelConfig  # noqa: E402
from prs_jax.train.trainer import OptimConfig, Trainer, TrainerConfig  # noqa: E402

MODEL = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
BATCH, SEQ = 8, 64


def next_token_loss(model, batch, static):
    """Mean next-token cross-entropy over all positions; `static` is the remat flag."""
    hidden, _ = model.model(batch["ids"], attention_mask=batch["mask"], remat=bool(static))
    logits = model.unembed(hidden[:, :-1]).astype(jnp.float32)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["ids"][:, 1:, None], -1)[..., 0]
    return -jnp.mean(lp), {}


def build(layers: int, scan: bool) -> CausalLM:
    """The benchmark model; stacked (scan) models get the unrolled model's values, layer i at slice i."""
    cfg = ModelConfig(**{**MODEL, "num_hidden_layers": layers})
    plain = CausalLM(cfg, rngs=nnx.Rngs(0))
    if not scan:
        return plain
    model = CausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=True)
    stacked = nnx.state(model.model.layers)
    per_layer = [nnx.to_pure_dict(nnx.state(la)) for la in plain.model.layers]
    nnx.replace_by_pure_dict(stacked, jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer))
    nnx.update(model.model.layers, stacked)
    for name in ("embed_tokens", "norm"):
        nnx.update(getattr(model.model, name), nnx.state(getattr(plain.model, name)))
    nnx.update(model.lm_head, nnx.state(plain.lm_head))
    return model


def contender(name: str, scan: bool, remat: bool, out_dir: Path, layers: int = MODEL["num_hidden_layers"]) -> dict:
    model = build(layers, scan)
    tr = Trainer(model, next_token_loss, TrainerConfig(out_dir=str(out_dir / name), steps=10, batch_size=BATCH,
                                                       progress=False, tensorboard=False, async_checkpoint=False),
                 OptimConfig(lr=1e-3))
    tr.start()
    return {"name": name, "scan": scan, "remat": remat, "trainer": tr}


def one_round(c: dict, arrays: dict, steps: int) -> dict:
    tr: Trainer = c["trainer"]
    batch = tr._device_batch(arrays)
    # a fresh jit per round, so tracing and compiling are timed from scratch
    fn = jax.jit(tr._train_step_impl, static_argnames=("static",), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = fn.lower(tr._params, tr._opt_state_tree, tr._rest, tr._frozen_states, batch, static=c["remat"])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    params, opt = tr._params, tr._opt_state_tree
    times = []
    for i in range(steps + 1):
        s = time.perf_counter()
        params, opt, metrics = compiled(params, opt, tr._rest, tr._frozen_states, batch)
        jax.block_until_ready((params, opt, metrics))
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - s)
    tr._params, tr._opt_state_tree = params, opt
    return {"trace_lower_s": t1 - t0, "compile_s": t2 - t1, "steps_s": times, "loss": float(metrics["loss"]),
            "temp_mib": getattr(mem, "temp_size_in_bytes", 0) / 2**20, "load_avg": os.getloadavg()[0]}


def prestacked_compile(layers: int, arrays: dict) -> dict:
    """Reference point, not a Trainer contender: the same loss, clipping and AdamW written by hand over a
    scan_layers model's stacked layer parameters ([L, ...] leaves) and scanned. Compile time only."""
    import optax

    from prs_jax.models.layers import AttnContext, rope_cos_sin, rope_inv_freq
    from prs_jax.models.transformer import default_positions

    cfg = ModelConfig(**{**MODEL, "num_hidden_layers": layers})
    m = build(layers, scan=True)
    layer_def, stacked = nnx.split(m.model.layers)
    params = {"layers": stacked,
              "embed": m.model.embed_tokens.embedding[...], "norm": m.model.norm.weight[...],
              "head": m.lm_head.kernel[...]}
    ids, mask = jnp.asarray(arrays["ids"]), jnp.asarray(arrays["mask"])

    def loss(p):
        x = jnp.take(p["embed"], ids, axis=0)
        cos, sin = rope_cos_sin(default_positions(mask), rope_inv_freq(cfg.rope, cfg.rotary_dim))
        ctx = AttnContext(cos=cos, sin=sin, mask_bts=m.model._mask(jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ)),
                                                                    mask), write_index=None)
        h, _ = jax.lax.scan(lambda h, st: (nnx.merge(layer_def, st)(h, ctx, None)[0], None), x, p["layers"])
        h = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + cfg.norm_eps) * p["norm"]
        lp = jnp.take_along_axis(jax.nn.log_softmax(h[:, :-1] @ p["head"], -1), ids[:, 1:, None], -1)[..., 0]
        return -jnp.mean(lp)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))

    def step(p, st):
        u, st = tx.update(jax.grad(loss)(p), st, p)
        return optax.apply_updates(p, u), st

    t0 = time.perf_counter()
    lowered = jax.jit(step).lower(params, tx.init(params))
    t1 = time.perf_counter()
    lowered.compile()
    return {"layers": layers, "trace_lower_s": round(t1 - t0, 3), "compile_s": round(time.perf_counter() - t1, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compile.json"))
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of all contenders")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender per round (after 1 warm-up)")
    ap.add_argument("--sweep", default="8,64", help="other depths: compile times only (one round, no remat)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 steps, no depth sweep")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps, args.sweep = 1, 2, ""
    rng = np.random.default_rng(0)
    arrays = {"ids": rng.integers(3, MODEL["vocab_size"], (BATCH, SEQ)).astype(np.int32),
              "mask": np.ones((BATCH, SEQ), bool)}
    tmp = Path(tempfile.mkdtemp(prefix="prs_bench_compile_"))
    contenders = [contender("unrolled", False, False, tmp), contender("scanned", True, False, tmp),
                  contender("unrolled_remat", False, True, tmp), contender("scanned_remat", True, True, tmp)]
    rows: dict[str, list[dict]] = {c["name"]: [] for c in contenders}
    t_run = time.perf_counter()
    for r in range(args.rounds):
        for c in contenders:
            row = one_round(c, arrays, args.steps)
            rows[c["name"]].append(row)
            print(f"round {r} {c['name']}: trace+lower {row['trace_lower_s']:.2f} s, compile {row['compile_s']:.2f} s, "
                  f"step {statistics.median(row['steps_s']) * 1e3:.1f} ms, temp {row['temp_mib']:.1f} MiB", flush=True)
    for c in contenders:
        c["trainer"].close()
    sweep = {}
    for depth in [int(x) for x in args.sweep.split(",") if x.strip()]:
        for scan in (False, True):
            c = contender(f"{'scanned' if scan else 'unrolled'}_L{depth}", scan, False, tmp, layers=depth)
            row = one_round(c, arrays, 1)
            c["trainer"].close()
            sweep[c["name"]] = {"layers": depth, "trace_lower_s": round(row["trace_lower_s"], 3),
                                "compile_s": round(row["compile_s"], 3), "step_ms": round(row["steps_s"][0] * 1e3, 2)}
            print(f"sweep {c['name']}: {json.dumps(sweep[c['name']])}", flush=True)
    prestacked = {}
    if not args.quick:
        for depth in sorted({MODEL["num_hidden_layers"], *[int(x) for x in args.sweep.split(",") if x.strip()]}):
            prestacked[f"L{depth}"] = prestacked_compile(depth, arrays)
            print(f"prestacked L{depth}: {json.dumps(prestacked[f'L{depth}'])}", flush=True)

    def med(name: str, key: str) -> float:
        vals = [x for row in rows[name] for x in (row[key] if isinstance(row[key], list) else [row[key]])]
        return statistics.median(vals)

    summary = {}
    for c in contenders:
        n = c["name"]
        summary[n] = {"trace_lower_s": round(med(n, "trace_lower_s"), 3), "compile_s": round(med(n, "compile_s"), 3),
                      "step_ms": round(med(n, "steps_s") * 1e3, 2), "temp_mib": round(med(n, "temp_mib"), 2)}
        summary[n]["trace_lower_compile_s"] = round(summary[n]["trace_lower_s"] + summary[n]["compile_s"], 3)
    ratios = {}
    for scanned, unrolled in (("scanned", "unrolled"), ("scanned_remat", "unrolled_remat")):
        s, u = summary[scanned], summary[unrolled]
        ratios[f"{scanned}/{unrolled}"] = {
            "trace_lower_compile": round(s["trace_lower_compile_s"] / u["trace_lower_compile_s"], 3),
            "compile": round(s["compile_s"] / u["compile_s"], 3),
            "step": round(s["step_ms"] / u["step_ms"], 3),
        }
    losses = {n: [row["loss"] for row in rows[n]] for n in rows}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, jax {jax.__version__} ({jax.default_backend()})",
        "model": {**MODEL, "dtype": "float32", "init": "random (nnx.Rngs(0))"},
        "step": f"Trainer._train_step: next-token CE over all positions, batch {BATCH} x {SEQ}, grad clip 1.0, AdamW",
        "protocol": {"rounds": args.rounds, "timed_steps_per_round": args.steps, "warmup_steps_per_round": 1,
                     "quick": args.quick, "timing": "fresh jax.jit per round: .lower() timed (trace + lower), "
                     ".compile() timed (XLA); steps: compiled program until outputs ready; medians"},
        "summary": summary,
        "ratios": ratios,
        "depth_sweep": sweep,
        "prestacked_reference": prestacked,
        "loss_last_step_per_round": losses,
        "rounds": rows,
        "wall_s": round(time.perf_counter() - t_run, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print("summary", json.dumps(summary), "\nratios", json.dumps(ratios), f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
