"""preference_adaptation: the smoke config end to end, fresh held-out prompts per kind, win rates."""

import json
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import preference_adaptation as pa
from prs_jax.experiments.protocol import Endpoint, Protocol
from prs_jax.experiments import run_experiment

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "preference_adaptation"


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
def test_configs_load(name):
    cfg = load_config(pa.Config, CONFIGS / f"{name}.yaml")
    assert cfg.n > 0 and cfg.comparisons


def test_win_rate_counts_ties_half():
    w = pa.win_rate_row([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.4, 0.7])
    assert w["win_rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and w["prompts"] == 4
    assert (w["wins"], w["ties"], w["losses"]) == (0.25, 0.5, 0.25)
    with pytest.raises(ValueError, match="paired"):
        pa.win_rate_row([1.0], [1.0, 0.0])


def test_fresh_prompts_are_held_out(smoke_world):
    groups = pa.fresh_prompts(smoke_world, pa.WORLD_KINDS, 3, seed=0)
    train = pa.training_ids(smoke_world)
    assert set(groups) == set(pa.WORLD_KINDS)
    for kind, ps in groups.items():
        assert len(ps) == 3 and len({p.id for p in ps}) == 3
        assert all(len(p.prefs) == 1 and p.prefs[0].kind == kind and p.id not in train for p in ps)
    with pytest.raises(ValueError, match="not preference kinds"):
        pa.fresh_prompts(smoke_world, ["humorous"], 1, seed=0)


def _rec(method, pid, group, gold, sat, proxy, selected=0, named=None):
    r = {"kind": "method", "method": method, "id": pid, "group": group, "gold": gold, "satisfied": sat,
         "proxy": proxy, "selected": selected}
    if named is not None or method == "PRS":
        r["feedback_named"] = named
    return r


def test_endpoint_units_and_ceilings():
    recs = [_rec("PRand", "a", "include", [0.5, 0.9], [False, True], [0.1, 0.7], 1),
            _rec("PRS", "a", "include", [0.9], [True], [0.2], named=None),
            _rec("PRand", "b", "exclude", [0.4, 0.2], [False, False], [0.3, 0.1]),
            _rec("PRS", "b", "exclude", [0.6], [True], [0.5], named=True),
            {"kind": "teacher", "id": "a", "group": "include", "gold": {"prand": 0.5, "prs": 0.9},
             "satisfied": {"prand": False, "prs": True}},
            {"kind": "teacher", "id": "b", "group": "exclude", "gold": {"prand": 0.4, "prs": 0.4},
             "satisfied": {"prand": False, "prs": False}}]
    assert list(pa.endpoint_units("win:PRS:PRand", recs)) == [0.0, 0.5]  # a tie, then a win
    assert list(pa.endpoint_units("sat:PRS:PRand@exclude", recs)) == [1.0]
    assert list(pa.endpoint_units("critique:PRS", recs)) == [1.0]  # prompt a: the best draft already satisfied
    assert list(pa.endpoint_units("proxy_gap:PRand", recs)) == pytest.approx([0.6])
    methods = (pa.Method("PRand", "prand"), pa.Method("PRS", "prs"))
    ceil = pa.teacher_ceilings(["win:PRS:PRand", "sat:PRS:PRand", "critique:PRS@include"], recs, methods, 16)
    assert ceil == {"win:PRS:PRand": pytest.approx(0.25), "sat:PRS:PRand": 0.5, "critique:PRS@include": 1.0}
    for bad in ("win:PRS", "lift:PRS:PRand", "win:PRS:Greedy"):
        with pytest.raises(ValueError, match="endpoint"):
            pa.endpoint_units(bad, recs)
    # the ceiling's PRS is n // 2 drafts then the rest: an odd budget's round(n / 2) split has no ceiling
    prs = pa.Method("PRS", "prs")
    assert pa.teacher_method(prs, 16) == "prs" and pa.teacher_method(prs, 7) is None
    with pytest.raises(ValueError, match="not one of the study's kinds"):
        pa._check(pa.Config(protocol=Protocol(endpoints=(Endpoint("win:PRS:PRand@humour"),))))


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "pa"
    run_experiment("preference_adaptation", CONFIGS / "smoke.yaml",
                   [f"source.world.root={smoke_world_root}", f"out_dir={out}"])
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in saved and saved[key] is not None, key
    res = saved["results"]
    assert set(res["groups"]) == {*pa.WORLD_KINDS, "all"}
    assert res["groups"]["all"]["prompts"] == 2 * len(pa.WORLD_KINDS)
    for group in res["groups"].values():
        for comp in ("PRS vs Rand", "PRS vs PRand", "PRand vs Rand"):
            w = group["win_rates"][comp]
            assert 0.0 <= w["win_rate"] <= 1.0 and w["wins"] + w["ties"] + w["losses"] == pytest.approx(1.0)
        for m in ("Rand", "PRand", "PRS"):
            assert 0.0 <= group["methods"][m]["satisfaction"] <= 1.0
            assert 0.0 <= group["methods"][m]["candidate_satisfaction"] <= group["methods"][m][
                "any_candidate_satisfied"] <= 1.0
        assert "feedback_names_unmet_preference" in group["methods"]["PRS"]
        assert "feedback_names_unmet_preference" not in group["methods"]["Rand"]
    assert (out / "preference_adaptation.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Win rate at N=4" in md and "Self-critique accuracy" in md and "Protocol: declared endpoints" in md
    # the declared protocol: the control and both primaries have a verdict, with the teacher ceiling beside them
    verdicts = {v["endpoint"]["name"]: v for v in res["protocol"]}
    assert set(verdicts) == {"sat:PRand:Rand", "win:PRS:PRand", "win:PRS:Rand@include"}
    assert verdicts["sat:PRand:Rand"]["verdict"] in ("control passed", "control failed")
    assert verdicts["win:PRS:PRand"]["ceiling"] is not None and verdicts["win:PRS:PRand"]["units"] == 16
    assert verdicts["win:PRS:Rand@include"]["units"] == 2
    # paired arms: PRS's first layer is PRand's first N/2 drafts
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    prand = {r["id"]: r for r in rows if r["kind"] == "method" and r["method"] == "PRand"}
    prs = [r for r in rows if r["kind"] == "method" and r["method"] == "PRS"]
    assert len(prs) == 16 and all(r["texts"][:2] == prand[r["id"]]["texts"][:2] and r["layer"][:2] == [0, 0]
                                  for r in prs)
    assert sum(r["kind"] == "teacher" for r in rows) == 16
    # report only: the same tables from the records, no models
    before = json.loads((out / "results.json").read_text())["results"]
    again = run_experiment("preference_adaptation", CONFIGS / "smoke.yaml",
                           [f"source.world.root={smoke_world_root}", f"out_dir={out}"], report_only=True)
    for key in ("groups", "protocol"):  # compared as JSON text: NaN (e.g. no prompt to critique) != NaN
        assert json.dumps(again["results"][key], sort_keys=True) == json.dumps(before[key], sort_keys=True)
    # pooling a second world seed's OUT (here: the same records relabelled as seed 1)
    other = tmp_path / "pa_seed1"
    other.mkdir()
    (other / "records.jsonl").write_text((out / "records.jsonl").read_text())
    facts = json.loads((out / "measure.json").read_text())
    (other / "measure.json").write_text(json.dumps({**facts, "world_seed": 1}))
    pooled = run_experiment("preference_adaptation", CONFIGS / "smoke.yaml",
                            [f"source.world.root={smoke_world_root}", f"out_dir={out}", f"pool_dirs=[{other}]",
                             "protocol.seeds=[0,1]"], report_only=True)["results"]
    assert pooled["world_seeds"] == [0, 1] and pooled["groups"]["all"]["prompts"] == 32
    v = {x["endpoint"]["name"]: x for x in pooled["protocol"]}["win:PRS:PRand"]
    assert set(v["per_seed"]) == {"0", "1"} and v["units"] == 32
    with pytest.raises(ValueError, match="already pooled"):
        run_experiment("preference_adaptation", CONFIGS / "smoke.yaml",
                       [f"source.world.root={smoke_world_root}", f"out_dir={out}", f"pool_dirs=[{out}]"],
                       report_only=True)


def test_real_source_groups_by_column(smoke_world, tmp_path):
    """source.kind=real: prompts grouped by `group_column`, win rates judged by the reward model."""
    rows = smoke_world.heldout()[:4]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"], "preference": r["preference"],
                                           "category": "a" if i % 2 else "b"}) + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "real"
    run_experiment("preference_adaptation", CONFIGS / "smoke.yaml", [
        "source.kind=real", f"source.real.policy={smoke_world.policy}",
        f"source.real.reward_model={smoke_world.reward_model}", "source.real.prompt_set=generic",
        f"source.real.prompts_path={prompts}", "source.real.dtype=float32", f"out_dir={out}"])
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res["groups"]) == {"a", "b", "all"} and res["judge"].startswith("reward model")
    assert res["groups"]["a"]["prompts"] == 2
    assert "satisfaction" not in res["groups"]["all"]["methods"]["PRS"]
