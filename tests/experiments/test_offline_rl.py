"""The offline-RL study: the smoke config end to end on the shared smoke world and the configs."""

import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.experiments import offline_rl, run_experiment

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "offline_rl"


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "out"
    run_experiment("offline_rl", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", f"work_dir={tmp_path / 'work'}"])
    record = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in record, key
    res = record["results"]
    iters = record["config"]["iterations"]
    assert res["world_seeds"] == [0] and res["metrics"] == ["greedy", "prs_bo4"]
    for metric in res["metrics"]:
        assert set(res["curves"][metric]) == {"prs-dpo_best_worst", "prs-sft_best_refine"}
        for row in res["curves"][metric].values():
            assert len(row) == iters + 1
            assert all(0.0 <= lo <= m <= hi <= 1.0 for m, lo, hi in row)
    arms = res["arms"]["0"]
    for arm in arms.values():
        assert [it["iteration"] for it in arm["iterations"]] == list(range(1, iters + 1))
        for it in arm["iterations"]:
            assert it["data"]["rows"] > 0 and Path(it["policy"], "config.json").is_file()
    # refinement conversations were added to the SFT data on top of the best responses
    refine = arms["prs-sft_best_refine"]["iterations"][0]["data"]
    assert refine["rows"] == refine["prompts_kept"] + refine["improving_pairs"]
    # checkpoints live under work_dir/<world key>
    assert all(str(tmp_path / "work") in it["policy"] for a in arms.values() for it in a["iterations"])
    # per-prompt records: iteration 0 once (the starting policy), then every arm and iteration
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {(r["arm"], r["iteration"]) for r in evals if r["iteration"] == 0} == {("start", 0)}
    assert all(len(r["ids"]) == len(r["values"]) == 8 for r in evals)
    # the protocol: the iteration-1-vs-start control is the per-prompt difference of the two eval rows
    v = {x["endpoint"]["name"]: x for x in res["protocol"]}
    one = next(r for r in evals if r["arm"] == "prs-sft_best_refine" and r["iteration"] == 1
               and r["metric"] == "greedy")
    start = next(r for r in evals if r["arm"] == "start" and r["metric"] == "greedy")
    want = np.mean(np.subtract(one["values"], start["values"]))
    assert v["greedy:prs-sft_best_refine@1:prs-sft_best_refine@0"]["pooled"]["mean"] == pytest.approx(want)
    assert len(v) == 4 and all(x["verdict"] for x in v.values())
    assert (out / "offline_rl.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "by iteration" in md and "Protocol" in md
    # the report alone remakes the results from the records (no models)
    (out / "results.md").unlink()
    again = run_experiment("offline_rl", CONFIGS / "smoke.yaml", [f"source.world.root={smoke_world_root}",
                                                                  f"out_dir={out}"], report_only=True)
    saved = json.loads((out / "results.json").read_text())["results"]
    assert again["results"]["protocol"] and saved["curves"] == res["curves"] and saved["protocol"] == res["protocol"]


def test_endpoint_names():
    assert offline_rl.parse_endpoint("greedy:prs-sft_best@3:rand-sft_best@3") == (
        "greedy", ("prs-sft_best", 3), ("rand-sft_best", 3))
    for bad in ("greedy:prs-sft_best@3", "greedy:prs@x:rand@1", "greedy:@1:rand@1"):
        with pytest.raises(ValueError, match="METRIC:ARM@I:ARM@J"):
            offline_rl.parse_endpoint(bad)
    recs = [{"kind": "eval", "arm": "start", "iteration": 0, "metric": "greedy", "ids": ["a", "b"],
             "values": [0.5, 0.25]},
            {"kind": "eval", "arm": "prs-sft_best", "iteration": 1, "metric": "greedy", "ids": ["b", "a"],
             "values": [0.5, 1.0]},
            {"kind": "data", "arm": "prs-sft_best", "iteration": 1, "ids": ["a"], "proxy": [1.0], "gold": [0.75]},
            {"kind": "data", "arm": "rand-sft_best", "iteration": 1, "ids": ["a"], "proxy": [2.0], "gold": [0.5]}]
    assert offline_rl.endpoint_units("greedy:prs-sft_best@1:prs-sft_best@0", recs).tolist() == [0.25, 0.5]
    assert offline_rl.endpoint_units("data:prs-sft_best@1:rand-sft_best@1", recs).tolist() == [0.25]
    with pytest.raises(ValueError, match="no greedy records"):
        offline_rl.endpoint_units("greedy:prs-sft_best@2:prs-sft_best@0", recs)


def test_configs_load_and_checks():
    for name in ("smoke", "cpu", "full"):
        cfg = load_config(offline_rl.Config, CONFIGS / f"{name}.yaml")
        assert cfg.arms and cfg.iterations >= 1
    full = load_config(offline_rl.Config, CONFIGS / "full.yaml")
    assert full.source.kind == "real" and full.trainer.mesh is not None
    bad = load_config(offline_rl.Config, None, ["arms=[{sampler: rand, data: sft_best_refine}]"])
    with pytest.raises(ValueError, match="sft_best_refine"):
        offline_rl.run(bad)
    for endpoint, match in (("prs_bo8:prs-sft_best@1:prs-sft_best@0", "is not measured"),
                            ("greedy:prs-sft_best@4:prs-sft_best@0", "not a measured arm"),
                            ("data:prs-sft_best@0:rand-sft_best@1", "not a measured arm")):
        bad = load_config(offline_rl.Config, CONFIGS / "cpu.yaml", [f"protocol.endpoints=[{{name: '{endpoint}'}}]"])
        with pytest.raises(ValueError, match=match):
            offline_rl._check(bad)  # what measure_study and report_study check first
