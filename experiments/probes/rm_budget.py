"""Diagnostic (2026-12-08; usage: python rm_budget.py SEED key=value ...): what does a larger proxy-RM budget buy
the rm_* gates? E.g. `python rm_budget.py 2 rm_pairs=16000 rm_steps=1800`.

Runs the world build itself (prs_jax.world.build.build_world) for the default config of world SEED with the
given rm_* overrides, under runs/probes/rm_budget. The new config has another world key, but every phase before
the RM (corpus, tokenizer, curriculum, SFT) depends on nothing the overrides touch, so those phases are taken
from the built default world (its .phases records, data, tokenizer and policy) and the build resumes at the
policy-sample phase (its pairs depend on rm_pairs through the shared random stream) and the RM. The gate rows
are printed beside the default build's."""
import json, shutil, sys
from pathlib import Path

from prs_jax.config import load_config, to_dict
from prs_jax.world.build import WorldConfig, build_world, preset, world_key

SEED = int(sys.argv[1])
overrides = sys.argv[2:]
base_cfg = load_config(WorldConfig, None, [f"seed={SEED}"], defaults=to_dict(preset("default")))
cfg = load_config(WorldConfig, None, [f"seed={SEED}", *overrides], defaults=to_dict(preset("default")))
base_dict = to_dict(base_cfg)
changed = {k for k, v in to_dict(cfg).items() if base_dict[k] != v}
if not changed or not all(k.startswith("rm_") for k in changed):
    raise SystemExit(f"rm_budget.py: give rm_* overrides only (the earlier phases are reused), got {sorted(changed)}")
base = Path("runs/world") / f"world-{world_key(base_cfg)}"
if not (base / "report.json").is_file():
    raise SystemExit(f"rm_budget.py: build the default world of seed {SEED} first ({base} has no report.json)")
root = Path("runs/probes/rm_budget")
out = root / f"world-{world_key(cfg)}"
if not (out / "report.json").is_file():
    (out / ".phases").mkdir(parents=True, exist_ok=True)
    for phase in ("data", "tokenizer", "curriculum", "sft"):
        shutil.copy(base / ".phases" / f"{phase}.json", out / ".phases" / f"{phase}.json")
    if not (out / "data").exists():
        shutil.copytree(base / "data", out / "data")  # a copy: the policy-sample phase rewrites rm_*.jsonl
    for name in ("tokenizer", "policy"):
        if not (out / name).exists():
            (out / name).symlink_to((base / name).resolve())
built = build_world(cfg, root=root, allow_weak=True)
before = {r["gate"]: r["value"] for r in json.loads((base / "report.json").read_text())["gates"]["rows"]}
print(json.dumps({"seed": SEED, "overrides": overrides, "key": built.report["key"],
                  "rm_s": built.report["timings"]["rm_s"], "rm_heldout_accuracy": built.report["rm_heldout_accuracy"],
                  "rm_pairs": built.report["rm_pairs"]}, indent=1))
for r in built.report["gates"]["rows"]:
    if r["gate"].startswith("rm_"):
        print(f"{r['gate']:20s} {before.get(r['gate'])} -> {r['value']}  (target {r['target']})")
