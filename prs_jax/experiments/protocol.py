"""The studies' statistical protocol: endpoints declared before the run, effects over seeds, verdicts.

A study declares its endpoints in its config (a `Protocol`): each is a paired effect (arm A minus arm B on the
same units, e.g. prompts, with common random numbers), the direction the claim predicts and the margin it must
clear. Positive controls are endpoints too (`control=True`): a mechanism the world must show for the study's
claims to be testable at all (e.g. "refinement after the true critique beats no refinement").

`evaluate` turns the measured per-unit differences of every seed into, per endpoint:
- the mean with a percentile bootstrap 95% interval per seed, and pooled over seeds (units resampled within
  each seed, so every seed keeps its weight);
- a one-sided sign-flip permutation p-value of "no effect beyond the margin" on the pooled units, Holm-adjusted
  over the primary (non-control) endpoints;
- the effect as a fraction of its teacher ceiling, when the study gives one;
- a verdict: "reproduced" (adjusted p <= alpha and the pooled interval clears the margin), "not reproduced", or
  "untestable here" when a positive control it depends on (every control, unless the endpoint names its own in
  `requires`) did not clear its margin (the evidence names it) or the endpoint
  itself has fewer units than promised (e.g. a mechanism measured on the prompts where it can act, and the
  policy left too few of them). A control with too few units fails.

Everything is a pure function of the inputs and the protocol's seed, so `report` re-runs give the same table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from prs_jax.eval.stats import holm, paired_permutation_p

Verdict = Literal["reproduced", "not reproduced", "untestable here"]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One declared paired effect: `name` keys the measured differences; the claim predicts the effect is
    above `margin` (direction "greater") or below it ("less")."""

    name: str
    claim: str = ""
    direction: Literal["greater", "less"] = "greater"
    margin: float = 0.0
    control: bool = False  # a positive control: must hold for the primary claims to be testable
    # units per seed this endpoint promises, when it differs from the protocol's (e.g. a control measured on
    # the subset of prompts where a mechanism can act); None: Protocol.units
    units: int | None = None
    # the positive controls this claim depends on (their names); None: every control of the protocol. A study
    # with independent parts (e.g. scaling's reward-vs-N and Sr-DPO parts) scopes each claim to its own controls.
    requires: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("protocol endpoint: name must be non-empty")
        if self.direction not in ("greater", "less"):
            raise ValueError(f"protocol endpoint {self.name!r}: direction must be 'greater' or 'less', "
                             f"got {self.direction!r}")
        if self.units is not None and self.units < 1:
            raise ValueError(f"protocol endpoint {self.name!r}: units must be >= 1 or null, got {self.units}")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Seeds, units per seed, the error rate and the declared endpoints of one study."""

    seeds: tuple[int, ...] = (0, 1, 2)
    units: int = 256  # units (prompts, pairs) per seed the study promises; fewer measured cannot pass (see evaluate)
    alpha: float = 0.05
    n_boot: int = 2000
    n_perm: int = 10000
    seed: int = 0  # of the bootstrap and permutation draws
    endpoints: tuple[Endpoint, ...] = ()

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("protocol: seeds must name at least one world seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"protocol: seeds must be distinct, got {self.seeds}")
        if self.units < 1 or self.n_boot < 1 or self.n_perm < 1:
            raise ValueError(f"protocol: units, n_boot and n_perm must be >= 1 (got {self.units}, {self.n_boot}, "
                             f"{self.n_perm})")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"protocol: alpha must lie in (0, 1), got {self.alpha}")
        names = [e.name for e in self.endpoints]
        if len(set(names)) != len(names):
            raise ValueError(f"protocol: endpoint names must be unique, got {names}")
        controls = {e.name for e in self.endpoints if e.control}
        for e in self.endpoints:
            unknown = [r for r in (e.requires or ()) if r not in controls]
            if unknown:
                raise ValueError(f"protocol endpoint {e.name!r}: requires {unknown}, which are not control endpoints "
                                 f"of this protocol (controls: {sorted(controls)})")

    @property
    def primary(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if not e.control)

    @property
    def controls(self) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.endpoints if e.control)


@dataclasses.dataclass(frozen=True)
class EffectResult:
    """One endpoint's measured effect, interval, test and verdict."""

    endpoint: Endpoint
    per_seed: dict[int, tuple[float, float, float]]  # seed -> (mean, low, high)
    pooled: tuple[float, float, float]
    units: int
    p: float  # one-sided, pooled units
    p_holm: float  # adjusted over the primary endpoints (controls: unadjusted)
    ceiling: float | None
    verdict: Verdict | Literal["control passed", "control failed"]
    evidence: str

    @property
    def fraction_of_ceiling(self) -> float | None:
        if self.ceiling is None or self.ceiling == 0:
            return None
        return self.pooled[0] / self.ceiling

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": dataclasses.asdict(self.endpoint),
                "per_seed": {str(s): dict(zip(("mean", "low", "high"), v)) for s, v in self.per_seed.items()},
                "pooled": dict(zip(("mean", "low", "high"), self.pooled)), "units": self.units, "p": self.p,
                "p_holm": self.p_holm, "ceiling": self.ceiling, "fraction_of_ceiling": self.fraction_of_ceiling,
                "verdict": self.verdict, "evidence": self.evidence}


def draw_key(protocol_seed: int, name: str, *tag: int) -> list[int]:
    """The generator key of one resampling: the protocol's seed, the CRC-32 of a stable name (an endpoint's,
    a table cell's) and integer tags (a world seed), so a CI does not move when endpoints or cells are added,
    removed or reordered."""
    return [int(protocol_seed), zlib.crc32(name.encode()), *map(int, tag)]


def stratified_bootstrap_ci(groups: Sequence[np.ndarray], n_boot: int, alpha: float,
                            seed: int | Sequence[int]) -> tuple[float, float, float]:
    """(mean, low, high) of the pooled units of `groups`, resampling units within each group (each group keeps
    its size, so each seed keeps its weight in the pooled mean). `seed` is anything np.random.default_rng takes
    (an int or a key from `draw_key`)."""
    groups = [np.asarray(g, dtype=float) for g in groups]
    pooled = np.concatenate(groups)
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for g in groups:
        total += g[rng.integers(0, g.size, size=(n_boot, g.size))].sum(axis=1)
    means = total / pooled.size
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(pooled.mean()), float(lo), float(hi)


def _one_sided_p(d: np.ndarray, direction: str, n_perm: int, seed: Sequence[int]) -> float:
    """p of "the mean of d is not on the claimed side of 0" from the two-sided sign-flip test."""
    if not np.any(d):
        return 1.0
    p2 = paired_permutation_p(d, np.zeros_like(d), n_perm=n_perm, seed=seed)
    on_side = d.mean() > 0 if direction == "greater" else d.mean() < 0
    return float(min(1.0, p2 / 2)) if on_side else float(min(1.0, 1 - p2 / 2))


def evaluate(protocol: Protocol, diffs: Mapping[str, Mapping[int, Sequence[float] | np.ndarray]],
             ceilings: Mapping[str, float] | None = None) -> list[EffectResult]:
    """Per-endpoint effects and verdicts from `diffs[endpoint][seed]` = per-unit paired differences (A - B)."""
    ceilings = ceilings or {}
    measured: dict[str, dict[int, np.ndarray]] = {}
    short: dict[str, list[str]] = {}  # endpoints with fewer units than promised: they cannot pass
    for e in protocol.endpoints:
        if e.name not in diffs:
            raise KeyError(f"protocol: endpoint {e.name!r} was declared but not measured; measured: {sorted(diffs)}")
        per = diffs[e.name]
        missing = [s for s in protocol.seeds if s not in per]
        if missing:
            raise KeyError(f"protocol: endpoint {e.name!r} has no measurement for seed(s) {missing}; the protocol "
                           f"declares seeds {list(protocol.seeds)}")
        arrays = {s: np.asarray(per[s], dtype=float).ravel() for s in protocol.seeds}
        need = protocol.units if e.units is None else e.units
        for s, a in arrays.items():
            if a.size < need:
                short.setdefault(e.name, []).append(f"seed {s}: {a.size} units measured, {need} promised")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"protocol: endpoint {e.name!r}, seed {s}: non-finite differences")
        measured[e.name] = arrays

    def stats(e: Endpoint) -> tuple[dict[int, tuple[float, float, float]], tuple[float, float, float], float]:
        arrays = measured[e.name]
        if any(a.size == 0 for a in arrays.values()):
            nan3 = (math.nan, math.nan, math.nan)
            return {s: nan3 for s in protocol.seeds}, nan3, 1.0
        per_seed = {}
        # draws keyed by the endpoint's name and the world seeds, never by position: a one-seed "pooled" interval
        # is that seed's own
        for s in protocol.seeds:
            per_seed[s] = stratified_bootstrap_ci([arrays[s]], protocol.n_boot, protocol.alpha,
                                                  draw_key(protocol.seed, e.name, s))
        pooled = stratified_bootstrap_ci([arrays[s] for s in protocol.seeds], protocol.n_boot, protocol.alpha,
                                         draw_key(protocol.seed, e.name, *protocol.seeds))
        shifted = np.concatenate([arrays[s] for s in protocol.seeds]) - e.margin
        return per_seed, pooled, _one_sided_p(shifted, e.direction, protocol.n_perm,
                                              draw_key(protocol.seed, e.name + "/permutation", *protocol.seeds))

    def clears(e: Endpoint, ci: tuple[float, float, float]) -> bool:
        if e.name in short:
            return False
        return ci[1] > e.margin if e.direction == "greater" else ci[2] < e.margin

    rows = {e.name: stats(e) for e in protocol.endpoints}
    failed_controls = [e for e in protocol.controls if not clears(e, rows[e.name][1])]
    adjusted = dict(zip([e.name for e in protocol.primary],
                        holm([rows[e.name][2] for e in protocol.primary]) if protocol.primary else []))
    sign = {"greater": ">", "less": "<"}
    out = []
    for e in protocol.endpoints:
        per_seed, pooled, p = rows[e.name]
        units = sum(measured[e.name][s].size for s in protocol.seeds)
        ci = f"{pooled[0]:+.3f} [{pooled[1]:+.3f}, {pooled[2]:+.3f}]"
        few = f"too few units ({'; '.join(short[e.name])}); " if e.name in short else ""
        if e.control:
            ok = clears(e, pooled)
            verdict = "control passed" if ok else "control failed"
            evidence = few + f"pooled {ci} vs margin {sign[e.direction]} {e.margin:+.3f}, p {p:.3g}"
            out.append(EffectResult(e, per_seed, pooled, units, p, p, ceilings.get(e.name), verdict, evidence))
            continue
        p_adj = float(adjusted[e.name])
        blocking = [c for c in failed_controls if e.requires is None or c.name in e.requires]
        if blocking:
            verdict: Verdict = "untestable here"
            evidence = ("positive control(s) failed: " + ", ".join(
                f"{c.name} {rows[c.name][1][0]:+.3f} [{rows[c.name][1][1]:+.3f}, {rows[c.name][1][2]:+.3f}]"
                for c in blocking) + f"; measured {ci}")
        elif e.name in short:
            verdict = "untestable here"
            evidence = few + f"measured {ci}"
        elif p_adj <= protocol.alpha and clears(e, pooled):
            verdict = "reproduced"
            evidence = f"pooled {ci} {sign[e.direction]} {e.margin:+.3f}, Holm p {p_adj:.3g} <= {protocol.alpha}"
        else:
            verdict = "not reproduced"
            evidence = (f"pooled {ci}, margin {sign[e.direction]} {e.margin:+.3f}, Holm p {p_adj:.3g} "
                        f"(alpha {protocol.alpha})")
        out.append(EffectResult(e, per_seed, pooled, units, p, p_adj, ceilings.get(e.name), verdict, evidence))
    return out


def verdict_table(results: Sequence[EffectResult]) -> str:
    """A markdown table: endpoint, claim, per-seed and pooled effects with 95% CIs, fraction of the ceiling,
    Holm p and the verdict."""
    if not results:
        return ""
    seeds = list(results[0].per_seed)
    head = (["endpoint", "claim"] + [f"seed {s}" for s in seeds]
            + ["pooled [95% CI]", "of ceiling", "Holm p", "verdict"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        frac = r.fraction_of_ceiling
        cells = [r.endpoint.name + (" (control)" if r.endpoint.control else ""), r.endpoint.claim]
        cells += [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in (r.per_seed[s] for s in seeds)]
        cells += [f"{r.pooled[0]:+.3f} [{r.pooled[1]:+.3f}, {r.pooled[2]:+.3f}]",
                  "" if frac is None else f"{frac:.0%}", f"{r.p_holm:.3g}", r.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluated_seeds(protocol: Protocol, measured: Mapping[int, Any]) -> tuple[int, ...]:
    """The seeds `apply_protocol` evaluates: the declared seeds that were measured, else every measured seed."""
    return tuple(s for s in protocol.seeds if s in measured) or tuple(sorted(measured))


def pooled_ci(groups: Sequence[Sequence[float]], n_boot: int, key: str, alpha: float = 0.05
              ) -> tuple[float, float, float]:
    """stratified_bootstrap_ci over the finite values of each group (groups left empty are dropped); NaNs when
    nothing is left. `key` names the quantity (e.g. "gold:PRS:Rand@16"): the draws are keyed by it, so a table
    cell's interval does not depend on which other cells the table has."""
    arrays = [np.asarray([x for x in g if math.isfinite(x)], float) for g in groups]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return math.nan, math.nan, math.nan
    return stratified_bootstrap_ci(arrays, n_boot, alpha, draw_key(0, key))


def apply_protocol(protocol: Protocol, by_seed: Mapping[int, Any], units: Any,
                   ceilings: Mapping[str, float] | None = None) -> tuple[list[EffectResult], str]:
    """Evaluate `protocol` on the measured seeds: `by_seed[seed]` is whatever one seed measured (e.g. its
    records) and `units(endpoint_name, by_seed[seed])` its per-unit paired differences. Declared seeds that were
    not measured are left out of the pooled column (the title says so); when none of them was measured, the
    measured seeds are used. Returns the results and a title for the verdict table."""
    used = evaluated_seeds(protocol, by_seed)
    missing = [s for s in protocol.seeds if s not in by_seed]
    diffs = {e.name: {s: units(e.name, by_seed[s]) for s in used} for e in protocol.endpoints}
    results = evaluate(dataclasses.replace(protocol, seeds=used), diffs, ceilings)
    title = (f"Protocol: declared endpoints, world seeds {list(used)} (per seed and pooled, bootstrap 95% CIs, "
             "Holm over the primary endpoints)")
    if missing:
        title += f"; declared seeds {missing} not measured: the pooled column covers {list(used)} only"
    return results, title


def declared_note(protocol: Protocol, facts_by_seed: Mapping[int, Mapping[str, Any]], facts_name: str
                  ) -> str | None:
    """A report note when the protocol being applied differs from the one each seed's measurement recorded
    (`protocol_declared` in its facts), naming the seeds; None when they agree."""
    from prs_jax.config import to_dict

    now = json.loads(json.dumps(to_dict(protocol)))

    def recorded(f: Mapping[str, Any]) -> Any:
        # measured before endpoints could name the controls they require: the same as requiring all of them
        d = json.loads(json.dumps(f.get("protocol_declared")))
        for e in (d or {}).get("endpoints", []):
            e.setdefault("requires", None)
        return d

    differ = [s for s, f in facts_by_seed.items() if recorded(f) != now]
    if not differ:
        return None
    return (f"The protocol of this report differs from the one declared when world seed(s) {differ} were measured "
            f"({facts_name}: protocol_declared).")


def report_protocol(rec: Any, protocol: Protocol, by_seed: Mapping[int, Any], units: Any,
                    facts_by_seed: Mapping[int, Mapping[str, Any]], facts_name: str,
                    ceilings: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """apply_protocol, then add its verdict table (and declared_note, when the protocol changed since measuring)
    to a study's Record `rec`; returns the verdicts as JSON rows."""
    results, title = apply_protocol(protocol, by_seed, units, ceilings)
    rec.tables.append((title, verdict_table(results)))
    note = declared_note(protocol, facts_by_seed, facts_name)
    if note:
        rec.notes.append(note)
    return [r.to_dict() for r in results]
