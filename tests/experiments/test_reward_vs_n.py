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
    assert {(r["method"], r["n_run"]) for r in records} >= {("Rand", 4), ("PRS (N/2,N/2)", 2)}
    assert all(len(r["texts"]) == len(r["proxy"]) == len(r["gold"]) for r in records)
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
    with pytest.raises(ValueError, match="no separate report step"):
        run_experiment("offline_rl", Path(__file__).parents[2] / "experiments" / "configs" / "offline_rl" /
                       "smoke.yaml", [f"out_dir={out}"], report_only=True)


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
        "methods=[{name: Rand, kind: rand}, {name: PRS, kind: prs}]"])
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["source"] == "real" and res["prompts"] == 2
    row = res["methods"]["PRS"]["2"]
    assert "gold" not in row and np.isfinite(row["proxy"])
    outputs = json.loads((out / "outputs" / "PRS-N2.json").read_text())
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in smoke_world.heldout()[:2]]
    assert "no gold reward" in (out / "results.md").read_text()
