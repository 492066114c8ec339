"""The studies' statistical protocol: declared endpoints, pooled CIs over seeds, Holm, controls and verdicts."""

import json

import numpy as np
import pytest

from prs_jax.experiments.protocol import (Endpoint, Protocol, apply_protocol, declared_note, evaluate,
                                         stratified_bootstrap_ci, verdict_table)


def _diffs(mean, n=256, seeds=(0, 1, 2), sd=0.2, offset=0):
    return {s: np.random.default_rng([offset, s]).normal(mean, sd, n) for s in seeds}


def _protocol(*endpoints, **kw):
    return Protocol(endpoints=tuple(endpoints), n_boot=500, n_perm=2000, **kw)


def test_verdicts_follow_the_evidence():
    proto = _protocol(Endpoint("control", "true critique helps", margin=0.05, control=True),
                      Endpoint("big", "PRS beats PRand"), Endpoint("none", "no effect claimed to exist"),
                      Endpoint("less", "fewer violations", direction="less"))
    res = {r.endpoint.name: r for r in evaluate(proto, {"control": _diffs(0.3), "big": _diffs(0.1, offset=1),
                                                         "none": _diffs(0.0, offset=2),
                                                         "less": _diffs(-0.1, offset=3)},
                                                ceilings={"big": 0.2})}
    assert res["control"].verdict == "control passed"
    assert res["big"].verdict == "reproduced" and res["less"].verdict == "reproduced"
    assert res["none"].verdict == "not reproduced"
    assert res["big"].fraction_of_ceiling == pytest.approx(res["big"].pooled[0] / 0.2)
    m, lo, hi = res["big"].pooled
    assert lo < m < hi and lo > 0 and set(res["big"].per_seed) == {0, 1, 2}
    assert res["big"].units == 768
    # Holm: the adjusted p of every primary endpoint is at least its raw p
    assert all(r.p_holm >= r.p - 1e-12 for r in res.values() if not r.endpoint.control)
    table = verdict_table(list(res.values()))
    assert "reproduced" in table and "(control)" in table and table.count("\n") == 5


def test_a_failed_positive_control_makes_every_claim_untestable():
    proto = _protocol(Endpoint("mechanism", margin=0.05, control=True), Endpoint("claim"))
    res = evaluate(proto, {"mechanism": _diffs(0.0), "claim": _diffs(0.3, offset=1)})
    by = {r.endpoint.name: r for r in res}
    assert by["mechanism"].verdict == "control failed"
    assert by["claim"].verdict == "untestable here" and "mechanism" in by["claim"].evidence


def test_a_claim_depends_only_on_the_controls_it_requires():
    proto = _protocol(Endpoint("mech_a", margin=0.05, control=True), Endpoint("mech_b", control=True),
                      Endpoint("claim_a", requires=("mech_a",)), Endpoint("claim_b", requires=("mech_b",)),
                      Endpoint("claim_all"))
    res = evaluate(proto, {"mech_a": _diffs(0.0), "mech_b": _diffs(0.3, offset=2), "claim_a": _diffs(0.3, offset=3),
                           "claim_b": _diffs(0.3, offset=4), "claim_all": _diffs(0.3, offset=5)})
    by = {r.endpoint.name: r for r in res}
    assert by["mech_a"].verdict == "control failed" and by["mech_b"].verdict == "control passed"
    assert by["claim_a"].verdict == "untestable here" and "mech_a" in by["claim_a"].evidence
    assert by["claim_b"].verdict == "reproduced"  # its own control passed; mech_a does not concern it
    assert by["claim_all"].verdict == "untestable here"  # no requires: every control
    with pytest.raises(ValueError, match="not control endpoints"):
        _protocol(Endpoint("c", requires=("nope",)))
    with pytest.raises(ValueError, match="not control endpoints"):
        _protocol(Endpoint("m"), Endpoint("c", requires=("m",)))  # m is a primary endpoint, not a control


def test_the_margin_is_tested_not_zero():
    proto = _protocol(Endpoint("small", margin=0.1))
    (r,) = evaluate(proto, {"small": _diffs(0.05, sd=0.05)})
    assert r.pooled[1] > 0 and r.verdict == "not reproduced"  # clearly above 0, clearly below the margin


def test_the_protocol_refuses_missing_or_short_measurements():
    proto = _protocol(Endpoint("a"), units=100)
    with pytest.raises(KeyError, match="declared but not measured"):
        evaluate(proto, {})
    with pytest.raises(KeyError, match=r"seed\(s\) \[2\]"):
        evaluate(proto, {"a": _diffs(0.1, n=100, seeds=(0, 1))})
    # fewer units than promised: the claim cannot pass (untestable), a control fails; none at all is no crash
    r = evaluate(proto, {"a": _diffs(0.5, n=50)})[0]
    assert r.verdict == "untestable here" and "seed 0: 50 units measured, 100 promised" in r.evidence
    ctl = _protocol(Endpoint("c", control=True), Endpoint("a"), units=100)
    rs = evaluate(ctl, {"c": {s: np.zeros(0) for s in (0, 1, 2)}, "a": _diffs(0.5, n=100)})
    assert [x.verdict for x in rs] == ["control failed", "untestable here"] and "0 units measured" in rs[0].evidence
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(proto, {"a": {s: np.full(100, np.nan) for s in (0, 1, 2)}})
    with pytest.raises(ValueError, match="unique"):
        Protocol(endpoints=(Endpoint("a"), Endpoint("a")))
    with pytest.raises(ValueError, match="direction"):
        Endpoint("a", direction="up")  # type: ignore[arg-type]
    # an endpoint measured on a subset of the units declares its own count
    sub = _protocol(Endpoint("a", units=40), units=100)
    assert evaluate(sub, {"a": _diffs(0.1, n=50)})[0].units == 150
    assert "30 units measured, 40 promised" in evaluate(sub, {"a": _diffs(0.1, n=30)})[0].evidence
    with pytest.raises(ValueError, match="units must be >= 1"):
        Endpoint("a", units=0)


def test_apply_protocol_pools_the_measured_seeds_and_names_the_missing_ones():
    proto = _protocol(Endpoint("a"), units=10)
    by_seed = {0: 0.2, 2: 0.3}  # whatever a seed measured; `units` turns it into per-unit differences
    results, title = apply_protocol(proto, by_seed, lambda name, m: np.full(20, m))
    assert set(results[0].per_seed) == {0, 2} and results[0].units == 40
    assert "declared seeds [1] not measured" in title


def test_stratified_bootstrap_keeps_each_seed_weight_and_is_deterministic():
    groups = [np.zeros(10), np.ones(30)]
    m, lo, hi = stratified_bootstrap_ci(groups, 300, 0.05, seed=0)
    assert m == pytest.approx(0.75) and lo == pytest.approx(0.75) and hi == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    g = [rng.normal(0, 1, 50), rng.normal(1, 1, 50)]
    assert stratified_bootstrap_ci(g, 300, 0.05, 7) == stratified_bootstrap_ci(g, 300, 0.05, 7)


def test_declared_note_names_the_seeds_measured_under_another_protocol():
    from prs_jax.config import to_dict

    proto = _protocol(Endpoint("a"), units=10)
    same = {"protocol_declared": json.loads(json.dumps(to_dict(proto)))}
    assert declared_note(proto, {0: same, 1: same}, "measure.json") is None
    other = {"protocol_declared": json.loads(json.dumps(to_dict(_protocol(Endpoint("b"), units=10))))}
    note = declared_note(proto, {0: same, 2: other}, "measure.json")
    assert note is not None and "[2]" in note and "measure.json" in note
    # recorded before endpoints had `requires`: the same protocol (requires None = every control)
    old = json.loads(json.dumps(to_dict(proto)))
    for e in old["endpoints"]:
        del e["requires"]
    assert declared_note(proto, {0: {"protocol_declared": old}}, "measure.json") is None


def test_intervals_are_keyed_by_endpoint_name_not_position():
    """Adding, removing or reordering endpoints does not move another endpoint's CI or p (the draws are keyed by
    the endpoint's name and the world seeds), while two endpoints with the same data get different draws."""
    a, b, c = Endpoint("a"), Endpoint("b"), Endpoint("c", direction="less")
    data = {"a": _diffs(0.05, sd=0.5), "b": _diffs(0.05, sd=0.5), "c": _diffs(-0.02, offset=3)}
    one = {r.endpoint.name: r for r in evaluate(_protocol(a, b, c), data)}
    other = {r.endpoint.name: r for r in evaluate(_protocol(c, a), data)}
    assert one["a"].per_seed == other["a"].per_seed and one["a"].pooled == other["a"].pooled
    assert one["a"].p == other["a"].p and one["c"].pooled == other["c"].pooled
    assert one["a"].pooled[0] == one["b"].pooled[0] and one["a"].pooled[1:] != one["b"].pooled[1:]
    # one seed: the pooled interval is that seed's own
    single = evaluate(_protocol(a, seeds=(1,)), {"a": {1: data["a"][1]}})[0]
    assert single.pooled == single.per_seed[1]
