"""Diagnostic (2026-12-08; usage: python longer_sft.py [STEPS] [LR]): what would more SFT buy the critique?

Continues SFT of the built v6 seed-0 policy on the SAME corpus it was trained on (its data/sft.jsonl, i.e. more
epochs; a fresh warmup + cosine schedule at LR, default 1e-3), then measures every skill gate of the world with
the continued policy in place of the built one (prs_jax.world.gates.measure_gates; the proxy RM is the built one,
so the rm_* rows are not the point here). Writes OUT/gates_STEPS.json and prints the gate rows beside the build's.
This approximates `sft_steps = 2800 + STEPS` without rebuilding (the schedule restarts instead of continuing)."""
import dataclasses, json, os, sys, time
from pathlib import Path

from rich.console import Console

from prs_jax.world.build import BuiltWorld, WorldConfig, _sft
from prs_jax.world.gates import measure_gates

W = Path(os.environ.get("PRS_JAX_PROBE_WORLD", "runs/world/world-9b8bf9fc8a6d"))  # v6 seed 0
OUT = Path(os.environ.get("PRS_JAX_PROBE_OUT", "runs/probes/longer_sft"))
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 1400
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 1e-3
console = Console()
base = json.loads((W / "report.json").read_text())
cfg = WorldConfig(seed=base["config"]["seed"])
d = OUT / f"steps{STEPS}_lr{LR:g}"
d.mkdir(parents=True, exist_ok=True)
t0 = time.time()
if not (d / "policy" / "model.safetensors").is_file():
    metrics = _sft(dataclasses.replace(cfg, sft_lr=LR), W / "policy", W / "data" / "sft.jsonl",
                   W / "data" / "sft_eval.jsonl", d / "run", d / "policy", STEPS, console, False)
    (d / "sft_metrics.json").write_text(json.dumps(metrics, indent=1))
sft_s = time.time() - t0
# a world directory whose policy is the continued one; everything else is the built world's
wd = d / "world"
wd.mkdir(exist_ok=True)
for name in ("data", "tokenizer", "rm"):
    if not (wd / name).exists():
        (wd / name).symlink_to((W / name).resolve())
if not (wd / "policy").exists():
    (wd / "policy").symlink_to((d / "policy").resolve())
t1 = time.time()
gates = measure_gates(BuiltWorld(wd, cfg, {"key": base["key"]}), cfg.gates, console=console)
before = {r["gate"]: r["value"] for r in base["gates"]["rows"]}
rows = [{"gate": r["gate"], "built": before.get(r["gate"]), "continued": r["value"], "target": r["target"]}
        for r in gates["rows"]]
out = {"world": str(W), "key": base["key"], "extra_steps": STEPS, "lr": LR, "sft_s": sft_s,
       "gates_s": time.time() - t1, "rows": rows,
       "critique_teacher_by_kind": gates["policy"]["critique_teacher_by_kind"],
       "critique_own_by_kind": gates["policy"]["critique_own_by_kind"]}
(d / f"gates_{STEPS}.json").write_text(json.dumps(out, indent=1))
for r in rows:
    print(f"{r['gate']:22s} {r['built']} -> {r['continued']}  (target {r['target']})")
