"""reward_vs_n: the smoke config end to end on the session's smoke world, the typed configs, the pure helpers."""

import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.experiments import reward_vs_n as rvn
from prs_jax.experiments import run_experiment

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "reward_vs_n"


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
def test_configs_load(name):
    cfg = load_config(rvn.Config, CONFIGS / f"{name}.yaml")
    assert cfg.methods and cfg.budgets
    if name == "full":
        assert cfg.source.kind == "real" and cfg.generation.mesh is not None


def test_unknown_key_is_an_error():
    with pytest.raises(Exception, match="unknown key"):
        load_config(rvn.Config, CONFIGS / "smoke.yaml", ["generation.temprature=0.5"])


def test_method_widths():
    assert rvn.Method("a", "prs", split=0.25).widths(16) == (4, 12)
    assert rvn.Method("a", "prs", split=0.75).widths(16) == (12, 4)
    assert rvn.Method("a", "prs", split=1 / 3, depth=3).widths(64) == (21, 22, 21)
    assert rvn.Method("a", "prs", depth=3).widths(2) is None  # too small a budget for three layers
    assert rvn.Method("a", "rand").widths(16) is None


def test_paired_gain_and_histogram():
    m, se = rvn.paired_gain([1.0, 0.5, 0.75], [0.5, 0.5, 0.25])
    assert m == pytest.approx(1 / 3) and se == pytest.approx(np.std([0.5, 0.0, 0.5], ddof=1) / np.sqrt(3))
    h = rvn.histogram([0.0, 0.5, 1.0, 1.0], bins=4)
    assert h["counts"] == [1, 0, 1, 2] and len(h["edges"]) == 5


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "rvn"
    rec = run_experiment("reward_vs_n", CONFIGS / "smoke.yaml",
                         [f"source.world.root={smoke_world_root}", f"out_dir={out}"])
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in saved and saved[key] is not None, key
    assert saved["config"]["budgets"] == [2, 4] and saved["seed"] == 0
    res = saved["results"]
    cfg = load_config(rvn.Config, CONFIGS / "smoke.yaml")
    assert set(res["methods"]) == {m.name for m in cfg.methods}
    for name, rows in res["methods"].items():
        expect = {"2", "4"} if name != "PRS depth 3" else {"4"}  # depth 3 needs N >= 3
        assert set(rows) == expect, name
        for row in rows.values():
            assert 0.0 <= row["gold"] <= row["oracle_gold"] <= 1.0
            assert len(row["per_prompt_gold"]) == res["prompts"] == 4
            assert np.isfinite(row["proxy"])
    assert res["skipped"] == ["PRS depth 3 at N=2 (needs N >= depth = 3)"]
    dist = res["distribution_at_max_n"]["Rand"]
    assert sum(dist["candidates_gold"]["counts"]) == 4 * 4 and sum(dist["selected_gold"]["counts"]) == 4
    for png in ("reward_vs_n.png", "reward_distribution.png"):
        assert (out / png).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Gold reward of the response selected" in md and "Oracle" in md
    assert rec["results"]["policy_parameters"] > 0
    # measure wrote the raw records; the report alone remakes the same results from them (no models)
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    policy_rows = [r for r in records if r["method"] != "teacher"]
    assert {(r["method"], r["n_run"]) for r in policy_rows} >= {("Rand", 4), ("PRS (N/2,N/2)", 2)}
    assert all(len(r["texts"]) == len(r["proxy"]) == len(r["gold"]) for r in policy_rows)
    # paired: every PRS variant's first layer at N is PRand's first drafts (same texts, same order)
    prand = {r["id"]: r["texts"] for r in policy_rows if r["method"] == "PRand"}
    for r in policy_rows:
        if r["method"].startswith("PRS") and r["method"] != "PRS depth 3":
            first = [t for t, layer in zip(r["texts"], r["layer"]) if layer == 0]
            assert first == prand[r["id"]][:len(first)], (r["method"], r["n_run"])
    # the teacher ceiling: one row per prompt, every two-layer method at every budget it runs; none for depth 3
    teacher = [r for r in records if r["method"] == "teacher"]
    assert len(teacher) == 4 and "PRS depth 3" not in teacher[0]["gold"]
    assert set(teacher[0]["gold"]["PRS (N/2,N/2)"]) == {"2", "4"}
    assert all(0.0 <= row["teacher_gold"] <= 1.0 for row in res["methods"]["PRand"].values())
    # effects with CIs and the declared protocol (smoke.yaml), evaluated from the records
    eff = {(e["a"], e["b"], e["n"]): e for e in res["effects"]}
    assert ("PRS (N/2,N/2)", "PRand", 4) in eff and ("PRand", "Rand", 2) in eff
    assert all(e["low"] <= e["effect"] <= e["high"] for e in eff.values())
    want = np.mean([res["methods"]["PRS (N/2,N/2)"]["4"]["per_prompt_gold"][i]
                    - res["methods"]["PRand"]["4"]["per_prompt_gold"][i] for i in range(4)])
    assert eff[("PRS (N/2,N/2)", "PRand", 4)]["effect"] == pytest.approx(want)
    verdicts = {v["endpoint"]["name"]: v for v in res["protocol"]}
    assert verdicts["teacher:PRS (N/2,N/2):PRand@4"]["verdict"] in ("control passed", "control failed")
    assert verdicts["gold:PRS (N/2,N/2):PRand@4"]["pooled"]["mean"] == pytest.approx(want)
    assert (out / "effects.png").stat().st_size > 0 and "Teacher ceiling" in md
    (out / "results.md").unlink()
    again = run_experiment("reward_vs_n", CONFIGS / "smoke.yaml",
                           [f"source.world.root={smoke_world_root}", f"out_dir={out}"], report_only=True)
    assert json.loads((out / "results.json").read_text())["results"] == res and again["results"]["methods"]
    assert "Oracle" in (out / "results.md").read_text()
    with pytest.raises(ValueError, match="keys seed differ"):
        run_experiment("reward_vs_n", CONFIGS / "smoke.yaml",
                       [f"source.world.root={smoke_world_root}", f"out_dir={out}", "seed=1"], report_only=True)
    with pytest.raises(FileNotFoundError, match="measure first"):
        run_experiment("reward_vs_n", CONFIGS / "smoke.yaml", [f"out_dir={out / 'nothing'}"], report_only=True)


def test_endpoint_names_and_units():
    assert rvn.parse_endpoint("gold:PRS (N/2,N/2):PRand@16") == ("gold", "PRS (N/2,N/2)", "PRand", 16)
    assert rvn.parse_endpoint("teacher:PRS:Rand@4") == ("teacher", "PRS", "Rand", 4)
    for bad in ("gold:PRS:PRand", "oracle:PRS:PRand@4", "gold:PRS@4", "gold:A:B@x"):
        with pytest.raises(ValueError, match="expected gold:A:B@N"):
            rvn.parse_endpoint(bad)
    methods = (rvn.Method("Rand", "rand"), rvn.Method("PRS", "prs"))
    rows = [{"method": "Rand", "kind": "rand", "n_run": 4, "id": i, "texts": ["a"] * 4, "layer": [0] * 4,
             "proxy": [0.1, 0.9, 0.5, 0.2], "gold": [0.0, 0.25, 0.5, 1.0]} for i in ("p", "q")]
    rows += [{"method": "PRS", "kind": "prs", "n_run": n, "id": i, "texts": ["a"] * n, "layer": [0] * n,
              "proxy": [0.0] * (n - 1) + [1.0], "gold": [0.0] * (n - 1) + [0.75]} for n in (2, 4) for i in ("p", "q")]
    rows += [{"method": "teacher", "kind": "teacher", "id": i, "gold": {"Rand": {"2": 0.5, "4": 0.5},
                                                                        "PRS": {"2": 1.0, "4": 0.75}}}
             for i in ("p", "q")]
    # Rand at N=2 selects candidate 1 (gold 0.25) from the N=4 stream; PRS selects its last candidate (0.75)
    assert rvn.endpoint_units("gold:PRS:Rand@2", rows, methods, (2, 4)).tolist() == [0.5, 0.5]
    assert rvn.endpoint_units("gold:PRS:Rand@4", rows, methods, (2, 4)).tolist() == [0.5, 0.5]
    assert rvn.endpoint_units("teacher:PRS:Rand@2", rows, methods, (2, 4)).tolist() == [0.5, 0.5]
    assert rvn.teacher_ceilings(["gold:PRS:Rand@4", "teacher:PRS:Rand@4"], rows, (2, 4)) == {"gold:PRS:Rand@4": 0.25}
    with pytest.raises(ValueError, match="no selection"):
        rvn.endpoint_units("gold:PRS:PRand@4", rows, methods, (2, 4))


def test_config_checks_endpoints():
    with pytest.raises(ValueError, match="methods must be among"):
        load_config(rvn.Config, CONFIGS / "smoke.yaml", ["protocol.endpoints=[{name: 'gold:PRS:Rand@4'}]"])
    with pytest.raises(ValueError, match="N among the budgets"):
        load_config(rvn.Config, CONFIGS / "smoke.yaml", ["protocol.endpoints=[{name: 'gold:PRand:Rand@16'}]"])
    with pytest.raises(ValueError, match="teacher counterpart"):
        load_config(rvn.Config, CONFIGS / "smoke.yaml",
                    ["protocol.endpoints=[{name: 'teacher:PRS depth 3:Rand@4'}]"])
    with pytest.raises(ValueError, match="free of ':'"):
        load_config(rvn.Config, CONFIGS / "smoke.yaml", ["methods=[{name: 'a:b', kind: rand}]"])


def test_real_source_reports_the_rm_only(smoke_world, tmp_path):
    """source.kind=real (here the smoke world's checkpoints as if they were HF downloads): no gold reward; the RM
    score is reported and the selections are written as AlpacaEval outputs files."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "preference": r["preference"]}) + "\n"
                               for r in smoke_world.heldout()[:2]))
    out = tmp_path / "real"
    run_experiment("reward_vs_n", CONFIGS / "smoke.yaml", [
        "source.kind=real", f"source.real.policy={smoke_world.policy}",
        f"source.real.reward_model={smoke_world.reward_model}", "source.real.prompt_set=generic",
        f"source.real.prompts_path={prompts}", "source.real.dtype=float32", f"out_dir={out}", "budgets=[2]",
        "methods=[{name: Rand, kind: rand}, {name: PRS, kind: prs}]", "protocol.endpoints=[]"])
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["source"] == "real" and res["prompts"] == 2
    row = res["methods"]["PRS"]["2"]
    assert "gold" not in row and np.isfinite(row["proxy"])
    outputs = json.loads((out / "outputs" / "PRS-N2.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in smoke_world.heldout()[:2]]
    assert "no gold reward" in (out / "results.md").read_text()
