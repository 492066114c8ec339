"""scaling: the smoke config end to end (two tiny policy sizes, the second being the smoke world itself)."""

import json
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import run_experiment, scaling

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "scaling"


@pytest.mark.parametrize("name", ["smoke", "cpu", "cpu_sr_dpo", "full"])
def test_configs_load(name):
    cfg = load_config(scaling.Config, CONFIGS / f"{name}.yaml")
    assert len(cfg.sizes) >= 2


def test_needs_two_sizes(tmp_path):
    cfg = load_config(scaling.Config, CONFIGS / "smoke.yaml", [f"out_dir={tmp_path}"])
    import dataclasses

    with pytest.raises(ValueError, match="at least two"):
        scaling.run(dataclasses.replace(cfg, sizes=cfg.sizes[:1]))


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "scaling"
    run_experiment("scaling", CONFIGS / "smoke.yaml", [f"source.world.root={smoke_world_root}", f"out_dir={out}"])
    saved = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in saved and saved[key] is not None, key
    sizes = saved["results"]["sizes"]
    assert set(sizes) == {"h32-l1", "h64-l2"}
    assert sizes["h32-l1"]["parameters"] < sizes["h64-l2"]["parameters"]
    assert sizes["h32-l1"]["rm_dir"] == sizes["h64-l2"]["rm_dir"]  # rm: fixed (the smoke world's RM)
    for s in sizes.values():
        for rows in s["methods"].values():
            assert 0.0 <= rows["4"]["gold"] <= 1.0
    assert (out / "scaling.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "Paired gold gain over Rand" in md
    # the Sr-DPO part: per size, DPO and Sr-DPO trained from that size's SFT policy, judged by gold
    part = saved["results"]["sr_dpo"]["sizes"]
    assert set(part) == {"h32-l1", "h64-l2"}
    assert part["h32-l1"]["parameters"] == sizes["h32-l1"]["parameters"]
    for name, s in part.items():
        assert s["rm_dir"] == sizes[name]["rm_dir"]  # the fixed RM reaches the Sr-DPO part too
        assert set(s["runs"]) == {"sigmoid", "sr_dpo-lam0.5"}
        assert 0.0 <= s["starting_policy"]["judge_mean"] <= 1.0
        for r in s["runs"].values():
            assert 0.0 <= r["win_rate"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert s["runs"]["sr_dpo-lam0.5"]["vs_base"]["base"] == "DPO"
        assert (out / "sr_dpo" / name / "results.json").exists()
    assert set(saved["results"]["sr_dpo"]["loglog_fits"]) >= {"SFT", "DPO"}
    assert (out / "scaling_sr_dpo.png").stat().st_size > 0
    assert "Sr-DPO part: win rate vs the SFT policy" in md


def test_unknown_part_is_an_error(tmp_path):
    with pytest.raises(Exception, match="parts"):
        load_config(scaling.Config, CONFIGS / "smoke.yaml", [f"out_dir={tmp_path}", "parts=[reward_vs_n,dpo]"])
