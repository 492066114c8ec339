"""Critique recall of the v5 seed-0 policy on teacher drafts, by the surface form of the items: all lower-case vs
all capitalised (answers re-rendered from the same drafts), and intro vs no intro."""
import dataclasses, json, os
from prs_jax.world.behaviour import World
from prs_jax.world.build import WorldConfig
from prs_jax.world.corpus import FEEDBACK_TURN, parse_feedback, query, split_prompts
from prs_jax.world.gates import _engine, answered_prompt, critique_breakdown
from prs_jax.world.ceiling import prompt_rng
from prs_jax.world.task import violations
from prs_jax.tree.sampling import SamplingParams
from prs_jax.strategies.templates import require_turn_text
W = os.path.join(os.environ.get("PRS_JAX_PROBE_WORLD", "runs/world/world-1975574748a6"), "policy")
cfg = WorldConfig(seed=0)
world = World(cfg.behaviour, seed=0)
_, held = split_prompts(world, cfg.train_prompts, cfg.heldout_prompts, 0)
held = [p for p in held if not any(pr.kind == "capitalised" for pr in p.prefs)][:300]
engine, tok = _engine(W, 11)
rates = dataclasses.replace(world.b, repeat=0.3, repeat_quality=0.3, off_topic=0.12, off_topic_quality=0.12)
base = [world.draft(p, "xz", prompt_rng(0, p.id, 31), rates) for p in held]
out = {}
for name, f in (("lower", lambda a: dataclasses.replace(a, capitalised=False)),
                ("capitalised", lambda a: dataclasses.replace(a, capitalised=True)),
                ("lower_no_intro", lambda a: dataclasses.replace(a, capitalised=False, intro=None, numbered=False)),
                ("lower_intro", lambda a: dataclasses.replace(a, capitalised=False, intro=0, numbered=False))):
    drafts = [f(a) for a in base]
    roots = engine.add_prompts([answered_prompt(tok, query(p), d.text()) for p, d in zip(held, drafts)])
    ask = engine.append(roots, [require_turn_text(tok, FEEDBACK_TURN, r) for r in roots])
    crit = [k[0].text for k in engine.expand(ask, 1, SamplingParams(greedy=True), max_new_tokens=40)]
    true = [violations(p.x, p.z, d.text()) for p, d in zip(held, drafts)]
    got = [parse_feedback(c)[0] for c in crit]
    bk = critique_breakdown(true, got)
    out[name] = {k: (round(v["recall"], 2), v.get("false_alarms"), v["true"]) for k, v in bk.items()}
    print(name, out[name], flush=True)
    engine.release_tree(roots)
json.dump(out, open(os.environ.get("PRS_JAX_PROBE_OUT", "variants.json"), "w"), indent=1)
