"""Diagnostic (2026-12-07; usage: python repeat_supervision.py base|treat|drill [STEPS]): is the repeat check learnable by the v5 policy with more repeat supervision?
Continue SFT of the seed-0 v5 policy for STEPS steps on (a) the default mixture [control] and (b) a mixture whose
critique drills are repeat-rich [treatment]; measure critique recall of repeats on teacher drafts that contain one,
and exact-set match on ordinary teacher drafts."""
import dataclasses, json, os, sys, time
from pathlib import Path
import numpy as np
from rich.console import Console
import prs_jax.world.corpus as corpus
from prs_jax.data.io import write_jsonl
from prs_jax.world.behaviour import World
from prs_jax.world.build import WorldConfig, _sft
from prs_jax.world.corpus import FEEDBACK_TURN, Mixture, parse_feedback, query, sft_corpus, split_prompts
from prs_jax.world.gates import _engine, answered_prompt
from prs_jax.world.ceiling import prompt_rng
from prs_jax.world.task import violations
from prs_jax.tree.sampling import SamplingParams
from prs_jax.strategies.templates import require_turn_text

W = Path(os.environ.get("PRS_JAX_PROBE_WORLD", "runs/world/world-1975574748a6"))  # v5 seed 0
OUT = Path(os.environ.get("PRS_JAX_PROBE_OUT", "runs/probes/repeat"))
OUT.mkdir(parents=True, exist_ok=True)
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 400
cfg = WorldConfig(seed=0)
world = World(cfg.behaviour, seed=0)
train_p, held_p = split_prompts(world, cfg.train_prompts, cfg.heldout_prompts, 0)
console = Console()


def measure(policy: Path, n: int = 200) -> dict:
    engine, tok = _engine(policy, 11)
    greedy = SamplingParams(greedy=True)
    prompts = held_p[:n]
    rep_rates = dataclasses.replace(world.b, repeat=1.0, repeat_quality=1.0)
    res = {}
    for name, rates in (("forced_repeat", rep_rates), ("teacher_xz", None)):
        drafts = [world.draft(p, "xz", prompt_rng(0, p.id, 22 if rates is None else 99), rates) for p in prompts]
        roots = engine.add_prompts([answered_prompt(tok, query(p), d.text()) for p, d in zip(prompts, drafts)])
        ask = engine.append(roots, [require_turn_text(tok, FEEDBACK_TURN, r) for r in roots])
        crit = [k[0].text for k in engine.expand(ask, 1, greedy, max_new_tokens=40)]
        true = [violations(p.x, p.z, d.text()) for p, d in zip(prompts, drafts)]
        got = [parse_feedback(c)[0] for c in crit]
        reps = [(t, g) for t, g in zip(true, got) if any(i.startswith("repeat:") for i in t)]
        recall = np.mean([any(i.startswith("repeat:") and i in g for i in t) for t, g in reps]) if reps else float("nan")
        fa = sum(1 for t, g in zip(true, got) for i in g if i.startswith("repeat:") and i not in t)
        exact = np.mean([parse_feedback(c) == (t, 0) for c, t in zip(crit, true)])
        res[name] = {"n_with_repeat": len(reps), "repeat_recall": float(recall), "repeat_false_alarms": fa,
                     "exact_set": float(exact)}
        engine.release_tree(roots)
    return res


def continue_sft(name: str, mixture: Mixture, rates_repeat: float | None) -> Path:
    if rates_repeat is not None:
        base = corpus.drill_rates
        corpus.drill_rates = lambda b: dataclasses.replace(base(b), repeat=rates_repeat, repeat_quality=rates_repeat)
    rng = np.random.default_rng([0, 77])
    rows = list(sft_corpus(world, train_p, STEPS * 48 * 2, rng, mixture))
    ev = list(sft_corpus(world, held_p, 200, rng, mixture))
    share = np.mean([any("named twice" in m["content"] for m in r["messages"] if m["role"] == "assistant") for r in rows])
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "eval.jsonl", ev)
    c = dataclasses.replace(cfg, sft_lr=1e-3)
    t0 = time.time()
    _sft(c, W / "policy", d / "train.jsonl", d / "eval.jsonl", d / "run", d / "policy", STEPS, console, False)
    print(name, "repeat share", share, "sft s", time.time() - t0, flush=True)
    return d / "policy"


which = sys.argv[1]
results = {}
if which == "base":
    results["base"] = measure(W / "policy")
elif which == "control":
    results["control"] = measure(continue_sft("control", Mixture(), None))
elif which == "drill":  # critique drills only, repeat-rich: is the check learnable at all by this policy?
    fields = {f.name: 0.0 for f in dataclasses.fields(Mixture)}
    m = Mixture(**{**fields, "critique_drill": 1.0})
    results["drill"] = measure(continue_sft("drill", m, 0.6))
elif which == "treat":
    m = dataclasses.replace(Mixture(), critique_drill=0.30)
    results["treat"] = measure(continue_sft("treat", m, 0.6))
print(json.dumps(results, indent=1), flush=True)
with open(OUT / f"result_{which}_{STEPS}.json", "w") as f:
    json.dump(results, f, indent=1)
