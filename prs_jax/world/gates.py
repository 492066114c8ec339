"""Skill gates: does the built world's policy really follow preferences, critique, refine and verbalise, and does
its proxy reward model rank the policy's own answers? Measured on held-out prompts at the end of every build,
each beside the same quantity with the teacher programs as the policy (the ceiling).

Gates (targets from the world-v2 design; `GateConfig` holds them, they are not lowered silently):
  lift:<kind>          P(preference met | x+z) - P(met | x), policy / teacher          >= 0.7
  critique_teacher     exact-set match of the critique of a teacher draft                 >= 0.9
  critique_own         the same on the policy's own drafts                                >= 0.8
  refine_true          gold gain of refinements after the TRUE critique, policy / teacher >= 0.7
  refine_self          the same after the policy's OWN critique, policy / teacher        >= 0.5
  critique_vs_none     gain after own critique minus gain without a critique (gold)       >= 0.05
  rm_auc:<kind>        proxy RM ranks a minimal pair (one fix of that kind) correctly     >= 0.8
  rm_own_accuracy      proxy RM accuracy on gold-ranked pairs of the policy's samples     >= 0.8
  vs_pearson           Pearson(verbalised probability, true renormalised p_base)         >= 0.8
  vs_kl                KL(direct answers || p_base), mean over categories (nats)         <= 0.05
Labeler gates are measured where the separate labelers are built (not part of a policy build).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from prs_jax.world.behaviour import World
from prs_jax.world.ceiling import prompt_rng
from prs_jax.world.corpus import (
    FEEDBACK_TURN,
    REFINE_TURN,
    REFINE_TURN_NO_FEEDBACK,
    VS_SUFFIX,
    feedback_text,
    minimal_pair,
    parse_feedback,
    query,
    sample_pairs,
    single_requests,
)
from prs_jax.world.task import KINDS, Prompt, answer_items, gold_reward, parse_preference, parse_prompt, satisfied, \
    violations


class GateError(RuntimeError):
    """A built world misses one or more skill gates."""


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How the gates are measured and their targets."""

    prompts: int = 256  # held-out prompts (the first ones); 128 left the per-kind lifts +-0.1 noisy
    samples: int = 8  # samples per prompt and condition (lift, refinements)
    vs_samples: int = 200  # direct single-item answers per request (8 categories x 2 wordings); the plug-in
    # KL of n samples from p_base itself is about 9 / (2 n), so 400 per category keeps that floor near 0.01
    vs_lists: int = 4  # verbalised lists per request and k in (3, 4, 5)
    max_new_tokens: int = 40
    critique_max_new_tokens: int = 40
    enforce: bool = True  # a failed gate fails the build (unless --allow-weak)
    lift: float = 0.7
    critique_teacher: float = 0.9
    critique_own: float = 0.8
    refine_true: float = 0.7
    refine_self: float = 0.5
    critique_vs_none: float = 0.05
    rm_auc: float = 0.8
    rm_own_accuracy: float = 0.8
    vs_pearson: float = 0.8
    vs_kl: float = 0.05


def _prompt_of(row: dict[str, Any]) -> Prompt:
    cat, n, form = parse_prompt(row["prompt"])
    return Prompt(cat, n, parse_preference(row["preference"]), form)


def _engine(policy_dir: Path | str, seed: int):
    from prs_jax.models import load_causal_lm, load_tokenizer
    from prs_jax.tree.engine import TreeEngine, study_engine_config

    tok = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir)
    return TreeEngine(model, tok, seed=seed, config=study_engine_config(min_rows_bucket=8)), tok


def answered_prompt(tok: Any, user_text: str, answer: str) -> list[int]:
    """Token ids of a user turn and an assistant answer left open, as if the policy had written the answer: the
    feedback turn appended on top (strategies.templates.require_turn_text) then renders exactly the trained
    conversation. (Rendering [user, assistant] as a prompt instead adds a generation prompt after the closed
    answer, i.e. an empty assistant turn before the critique request: the gate measured that until v5.)"""
    from prs_jax.models.tokenizer import encode_chat

    return encode_chat(tok, _user(user_text)) + list(tok(answer, add_special_tokens=False)["input_ids"])


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def policy_pairs(policy_dir: Path | str, world: World, prompts: Sequence[Prompt], samples: int, per_prompt: int,
                 seed: int) -> list[dict[str, Any]]:
    """Gold-ranked RM pairs among the policy's own x+z samples (`per_prompt` per prompt).

    These pairs train the proxy RM, yet gates.py is outside the world key's source digest (build._BUILD_SOURCES):
    an edit that changes what this function returns must bump build.WORLD_VERSION."""
    if not prompts or samples < 2 or per_prompt <= 0:
        return []
    from prs_jax.tree.sampling import SamplingParams

    engine, _ = _engine(policy_dir, seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start:start + 128]
        roots = engine.add_prompts([_user(query(p)) for p in chunk])
        kids = engine.expand(roots, samples, SamplingParams(temperature=1.0), max_new_tokens=40)
        for p, ks in zip(chunk, kids):
            rows += sample_pairs(p, [k.text for k in ks], prompt_rng(seed, p.id, 7), per_prompt)
        engine.release_tree(roots)
    return rows


def _auc_pairs(better: Sequence[float], worse: Sequence[float]) -> float:
    b, w = np.asarray(better), np.asarray(worse)
    return float(np.mean((b > w) + 0.5 * (b == w))) if len(b) else float("nan")


def _row(gate: str, value: float, target: float, teacher: float | None = None, *, upper: bool = False,
         note: str = "") -> dict[str, Any]:
    # an unmeasurable gate (nothing parsed, no teacher effect) is None in report.json: JSON has no NaN
    if value is None or not math.isfinite(value):
        return {"gate": gate, "value": None, "target": target, "direction": "<=" if upper else ">=",
                "teacher": teacher, "passed": None, "note": note}
    passed = value <= target if upper else value >= target
    return {"gate": gate, "value": value, "target": target, "direction": "<=" if upper else ">=",
            "teacher": teacher, "passed": passed, "note": note}


def _ratio(policy: float, teacher: float) -> float:
    return policy / teacher if teacher > 1e-9 else float("nan")


def critique_breakdown(true: Sequence[Sequence[str]], got: Sequence[Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per issue kind (the part of an issue name before ':'): recall of the true issues, false alarms (named but
    not true, counted per critique) and wrong items (the right kind named with another item): where an exact-set
    miss comes from."""
    out: dict[str, dict[str, float]] = {}
    for t_list, g_list in zip(true, got):
        t_set, g_set = set(t_list), set(g_list)
        for issue in t_set:
            kind = issue.split(":")[0]
            row = out.setdefault(kind, {"true": 0, "found": 0, "false_alarms": 0, "wrong_item": 0})
            row["true"] += 1
            row["found"] += issue in g_set
            row["wrong_item"] += issue not in g_set and ":" in issue and any(
                g.split(":")[0] == kind for g in g_set - t_set)
        for issue in g_set - t_set:
            out.setdefault(issue.split(":")[0], {"true": 0, "found": 0, "false_alarms": 0, "wrong_item": 0})[
                "false_alarms"] += 1
    for row in out.values():
        row["recall"] = row["found"] / row["true"] if row["true"] else float("nan")
    return out


def _worst(breakdown: dict[str, dict[str, float]], k: int = 4) -> str:
    ranked = sorted((v["recall"], kind) for kind, v in breakdown.items() if v["true"])
    return "recall " + ", ".join(f"{kind} {r:.2f}" for r, kind in ranked[:k])


def measure_gates(built: Any, cfg: GateConfig, console: Console | None = None) -> dict[str, Any]:
    """Measure every policy / RM gate of a built world on its held-out prompts; returns {"rows", "policy",
    "teacher"} (rows as in `gate_table`)."""
    from prs_jax.models import load_reward_model
    from prs_jax.strategies.templates import require_turn_text
    from prs_jax.tree.sampling import SamplingParams
    from prs_jax.tree.scoring import RewardScorer

    console = console or Console()
    world: World = built.world()
    seed = built.config.seed
    prompts = [_prompt_of(r) for r in built.heldout()[: cfg.prompts]]
    engine, tok = _engine(built.policy, seed + 11)
    samp = SamplingParams(temperature=1.0)
    greedy = SamplingParams(greedy=True)
    S = cfg.samples
    pol: dict[str, Any] = {}
    tea: dict[str, Any] = {}

    # ---- preference lift from z: policy vs teacher, per kind
    roots_x = engine.add_prompts([_user(p.x) for p in prompts])
    roots_xz = engine.add_prompts([_user(query(p)) for p in prompts])
    kx = engine.expand(roots_x, S, samp, max_new_tokens=cfg.max_new_tokens)
    kxz = engine.expand(roots_xz, S, samp, max_new_tokens=cfg.max_new_tokens)
    sat: dict[str, dict[str, list[float]]] = {k: {"px": [], "pxz": [], "tx": [], "txz": []} for k in KINDS}
    for i, p in enumerate(prompts):
        tx = [world.draft(p, "x", prompt_rng(seed, p.id, 20, j)).text() for j in range(S)]
        txz = [world.draft(p, "xz", prompt_rng(seed, p.id, 21, j)).text() for j in range(S)]
        for pref in p.prefs:
            s = sat[pref.kind]
            s["px"] += [satisfied(pref, c.text) for c in kx[i]]
            s["pxz"] += [satisfied(pref, c.text) for c in kxz[i]]
            s["tx"] += [satisfied(pref, t) for t in tx]
            s["txz"] += [satisfied(pref, t) for t in txz]
    lift = {}
    for kind, s in sat.items():
        if s["px"]:
            lift[kind] = {"policy": float(np.mean(s["pxz"]) - np.mean(s["px"])),
                          "teacher": float(np.mean(s["txz"]) - np.mean(s["tx"])),
                          "policy_met_xz": float(np.mean(s["pxz"])), "teacher_met_xz": float(np.mean(s["txz"]))}
    pol["gold_x"] = float(np.mean([gold_reward(p.x, c.text, p.z) for p, ks in zip(prompts, kx) for c in ks]))
    pol["gold_xz"] = float(np.mean([gold_reward(p.x, c.text, p.z) for p, ks in zip(prompts, kxz) for c in ks]))
    engine.release_tree(roots_x)

    # ---- critiques: of teacher drafts placed in the conversation, and of the policy's own first draft
    t_drafts = [world.draft(p, "xz", prompt_rng(seed, p.id, 22)) for p in prompts]
    roots_t = engine.add_prompts([answered_prompt(tok, query(p), d.text()) for p, d in zip(prompts, t_drafts)])
    ask_t = engine.append(roots_t, [require_turn_text(tok, FEEDBACK_TURN, r) for r in roots_t])
    crit_t = [k[0].text for k in engine.expand(ask_t, 1, greedy, max_new_tokens=cfg.critique_max_new_tokens)]
    match_t = [parse_feedback(c) == (violations(p.x, p.z, d.text()), 0) for p, d, c in zip(prompts, t_drafts, crit_t)]
    by_kind_t = critique_breakdown([violations(p.x, p.z, d.text()) for p, d in zip(prompts, t_drafts)],
                                   [parse_feedback(c)[0] for c in crit_t])
    engine.release_tree(roots_t)
    drafts = [ks[0] for ks in kxz]
    engine.release([k for ks in kxz for k in ks[1:]])  # only the first draft is built on
    ask = engine.append(drafts, [require_turn_text(tok, FEEDBACK_TURN, d) for d in drafts])
    own = [k[0] for k in engine.expand(ask, 1, greedy, max_new_tokens=cfg.critique_max_new_tokens)]
    match_own = [parse_feedback(c.text) == (violations(p.x, p.z, d.text), 0) for p, d, c in zip(prompts, drafts, own)]
    by_kind_own = critique_breakdown([violations(p.x, p.z, d.text) for p, d in zip(prompts, drafts)],
                                     [parse_feedback(c.text)[0] for c in own])
    pol["critique_examples"] = [{"draft": d.text, "critique": c.text, "true": violations(p.x, p.z, d.text)}
                                for p, d, c in list(zip(prompts, drafts, own))[:3]]

    # ---- refinements of the policy's own first draft: after the true critique, its own critique, none
    true_fb = [feedback_text(p, violations(p.x, p.z, d.text)) for p, d in zip(prompts, drafts)]
    with_true = engine.append(ask, [f + require_turn_text(tok, REFINE_TURN) for f in true_fb])
    with_self = engine.append(own, [require_turn_text(tok, REFINE_TURN, c) for c in own])
    without = engine.append(drafts, [require_turn_text(tok, REFINE_TURN_NO_FEEDBACK, d) for d in drafts])
    g_draft = np.array([gold_reward(p.x, d.text, p.z) for p, d in zip(prompts, drafts)])
    gains = {}
    for name, parents in (("true", with_true), ("self", with_self), ("none", without)):
        kids = engine.expand(parents, S, samp, max_new_tokens=cfg.max_new_tokens)
        g = np.array([[gold_reward(p.x, c.text, p.z) for c in ks] for p, ks in zip(prompts, kids)])
        gains[name] = float((g.mean(axis=1) - g_draft).mean())
        engine.release([c for ks in kids for c in ks])  # scored: their KV pages go back to the pool
    engine.release_tree(roots_xz)
    t_gain_true, t_gain_none = [], []
    for p, a in zip(prompts, t_drafts):  # the teacher refines its own drafts (its ceiling)
        named = violations(p.x, p.z, a.text())
        g0 = gold_reward(p.x, a.text(), p.z)
        t_gain_true.append(np.mean([gold_reward(p.x, world.refine(p, a, named, prompt_rng(seed, p.id, 23, j)).text(),
                                                p.z) for j in range(S)]) - g0)
        t_gain_none.append(np.mean([gold_reward(p.x, world.refine(p, a, None, prompt_rng(seed, p.id, 24, j)).text(),
                                                p.z) for j in range(S)]) - g0)
    tea["refine_gain_true"] = float(np.mean(t_gain_true)) if t_gain_true else float("nan")
    tea["refine_gain_none"] = float(np.mean(t_gain_none)) if t_gain_none else float("nan")
    pol.update({f"refine_gain_{k}": v for k, v in gains.items()})

    # ---- proxy RM: minimal pairs per kind, and gold-ranked pairs of the policy's own samples
    scorer = RewardScorer(load_reward_model(built.reward_model), tok)
    by_kind: dict[str, tuple[list[str], list[str], list[str]]] = {}
    for p in prompts:
        for j in range(6):
            row = minimal_pair(world, p, prompt_rng(seed, p.id, 25, j))
            if row is None:
                continue
            fixed_issue = set(violations(p.x, p.z, row["rejected"][0]["content"])) - set(
                violations(p.x, p.z, row["chosen"][0]["content"]))
            kind = next(iter(sorted(fixed_issue)), "other").split(":")[0]
            kind = kind if kind in KINDS else "validity"
            q, c, r = by_kind.setdefault(kind, ([], [], []))
            q.append(query(p))
            c.append(row["chosen"][0]["content"])
            r.append(row["rejected"][0]["content"])
    rm_auc = {}
    for kind, (q, c, r) in sorted(by_kind.items()):
        sc = scorer.score_pairs(list(zip(q, c)))
        sr = scorer.score_pairs(list(zip(q, r)))
        rm_auc[kind] = (_auc_pairs(sc, sr), len(q))
    own_rows = []
    for p, ks in zip(prompts, kxz):
        own_rows += sample_pairs(p, [k.text for k in ks], prompt_rng(seed, p.id, 26), 2)
    sc = scorer.score_pairs([(r["prompt"][0]["content"], r["chosen"][0]["content"]) for r in own_rows])
    sr = scorer.score_pairs([(r["prompt"][0]["content"], r["rejected"][0]["content"]) for r in own_rows])
    rm_own = float(np.mean(np.asarray(sc) > np.asarray(sr))) if own_rows else float("nan")

    # ---- verbalized sampling: direct single-item answers vs p_base, verbalised lists vs renormalised p_base
    singles = single_requests()
    r_single = engine.add_prompts([_user(s.x) for s in singles])
    direct = engine.expand(r_single, cfg.vs_samples, samp, max_new_tokens=8)
    kls = []
    for cat in sorted({s.category for s in singles}):
        base = world.p_base(cat)
        counts = {i: 0.0 for i in base}
        other = 0.0
        for s, ks in zip(singles, direct):
            if s.category != cat:
                continue
            for k in ks:
                items = answer_items(k.text)
                if len(items) == 1 and items[0] in counts:
                    counts[items[0]] += 1
                else:
                    other += 1
        total = sum(counts.values()) + other
        q = np.array([counts[i] for i in base] + [other]) / max(total, 1)
        pb = np.array([base[i] for i in base] + [0.0])
        eps = 1e-3  # an answer outside the category costs log(q / eps): it is not in p_base's support
        nz = q > 0
        kls.append(float(np.sum(q[nz] * np.log(q[nz] / np.maximum(pb[nz], eps)))))
    vs_roots = engine.add_prompts([_user(s.x + VS_SUFFIX.format(k=k)) for s in singles for k in (3, 4, 5)])
    vs_out = engine.expand(vs_roots, cfg.vs_lists, samp, max_new_tokens=48)
    verb, true = [], []
    parsed = not_dist = 0
    for (s, k), ks in zip([(s, k) for s in singles for k in (3, 4, 5)], vs_out):
        base = world.p_base(s.category)
        for c in ks:
            lst = _parse_vs(c.text)
            if not lst or any(i not in base for i, _ in lst) or len({i for i, _ in lst}) != len(lst):
                continue
            if not _is_distribution([v for _, v in lst]):
                not_dist += 1  # e.g. "- wolf. (830%)": a garbled number, not a verbalised probability
                continue
            parsed += 1
            z = sum(base[i] for i, _ in lst)
            verb += [v for _, v in lst]
            true += [base[i] / z for i, _ in lst]
    vs_pearson = float(np.corrcoef(verb, true)[0, 1]) if len(verb) > 2 and np.std(verb) > 0 else float("nan")
    engine.release_tree(r_single)
    engine.release_tree(vs_roots)

    rows = []
    for kind, v in lift.items():
        rows.append(_row(f"lift:{kind}", _ratio(v["policy"], v["teacher"]), cfg.lift, 1.0,
                         note=f"policy lift {v['policy']:+.2f}, teacher {v['teacher']:+.2f}; met with z "
                              f"{v['policy_met_xz']:.2f} vs {v['teacher_met_xz']:.2f}"))
    rows.append(_row("critique_teacher", float(np.mean(match_t)), cfg.critique_teacher, 1.0,
                     note=_worst(by_kind_t)))
    rows.append(_row("critique_own", float(np.mean(match_own)), cfg.critique_own, 1.0, note=_worst(by_kind_own)))
    rows.append(_row("refine_true", _ratio(gains["true"], tea["refine_gain_true"]), cfg.refine_true, 1.0,
                     note=f"gain {gains['true']:+.3f} vs teacher {tea['refine_gain_true']:+.3f}"))
    rows.append(_row("refine_self", _ratio(gains["self"], tea["refine_gain_true"]), cfg.refine_self, 1.0,
                     note=f"gain {gains['self']:+.3f}"))
    rows.append(_row("critique_vs_none", gains["self"] - gains["none"], cfg.critique_vs_none,
                     tea["refine_gain_true"] - tea["refine_gain_none"],
                     note=f"no-critique gain {gains['none']:+.3f} (teacher {tea['refine_gain_none']:+.3f})"))
    for kind, (auc, n) in rm_auc.items():
        rows.append(_row(f"rm_auc:{kind}", auc, cfg.rm_auc, 1.0, note=f"{n} minimal pairs"))
    rows.append(_row("rm_own_accuracy", rm_own, cfg.rm_own_accuracy, 1.0, note=f"{len(own_rows)} pairs"))
    rows.append(_row("vs_pearson", vs_pearson, cfg.vs_pearson, 1.0,
                     note=f"{parsed} of {len(vs_out) * cfg.vs_lists} lists parsed, {not_dist} not a distribution"))
    rows.append(_row("vs_kl", float(np.mean(kls)), cfg.vs_kl, 0.0, upper=True,
                     note=f"{cfg.vs_samples * 2} direct answers per category"))
    pol.update({"lift": lift, "critique_teacher_match": float(np.mean(match_t)),
                "critique_own_match": float(np.mean(match_own)), "critique_teacher_by_kind": by_kind_t,
                "critique_own_by_kind": by_kind_own, "rm_auc": {k: v[0] for k, v in rm_auc.items()},
                "rm_own_accuracy": rm_own, "vs_pearson": vs_pearson, "vs_kl_per_category": kls})
    return _finite({"rows": rows, "policy": pol, "teacher": tea, "prompts": len(prompts), "samples": S})


def _finite(obj: Any) -> Any:
    """NaN and infinities as None, so the gates round-trip through report.json."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


_VS_LINE = re.compile(r"^-\s*(.+?)\s*\((\d+)%\)\s*$")


def _is_distribution(probs: Sequence[float], tol: float = 0.1) -> bool:
    """Whether verbalised probabilities can be one distribution: each in (0, 1], summing to 1 within `tol`
    (whole-percent rounding moves the sum by a few percent)."""
    return all(0.0 < p <= 1.0 for p in probs) and abs(sum(probs) - 1.0) <= tol


def _parse_vs(text: str) -> list[tuple[str, float]]:
    """(item, probability) per line of a single-item verbalised list; [] when a line does not parse."""
    out = []
    for line in (s.strip() for s in text.strip().splitlines() if s.strip()):
        m = _VS_LINE.match(line)
        items = answer_items(m.group(1)) if m else []
        if not m or len(items) != 1:
            return []
        out.append((items[0], int(m.group(2)) / 100))
    return out


def gate_table(gates: dict[str, Any], title: str) -> Table:
    """The gate rows as a rich table (value, target, teacher ceiling, pass/fail)."""
    t = Table(title=title)
    for col in ("gate", "value", "target", "teacher", "pass", "note"):
        t.add_column(col, justify="right" if col in ("value", "target", "teacher") else "left")
    for g in gates.get("rows", []):
        mark = {True: "[green]yes[/]", False: "[red]NO[/]", None: "n/a"}[g["passed"]]
        teacher = "" if g.get("teacher") is None else f"{g['teacher']:.3f}"
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        t.add_row(g["gate"], value, f"{g['direction']} {g['target']}", teacher, mark, g.get("note", ""))
    return t
