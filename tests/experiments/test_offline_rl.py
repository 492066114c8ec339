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
    assert set(res["arms"]) == {"prs-dpo_best_worst", "prs-sft_best_refine"}
    for arm in res["arms"].values():
        assert [it["iteration"] for it in arm["iterations"]] == list(range(iters + 1))
        for it in arm["iterations"]:
            for metric in res["metrics"]:
                mean, se = it["eval"][metric]
                assert 0.0 <= mean <= 1.0 and np.isfinite(se)
        for it in arm["iterations"][1:]:
            assert it["data"]["rows"] > 0 and Path(it["policy"], "config.json").is_file()
    # refinement conversations were added to the SFT data on top of the best responses
    refine = res["arms"]["prs-sft_best_refine"]["iterations"][1]["data"]
    assert refine["rows"] == refine["prompts_kept"] + refine["improving_pairs"]
    assert (out / "offline_rl.png").stat().st_size > 0
    assert "by iteration" in (out / "results.md").read_text()


def test_configs_load_and_checks():
    for name in ("smoke", "cpu", "full"):
        cfg = load_config(offline_rl.Config, CONFIGS / f"{name}.yaml")
        assert cfg.arms and cfg.iterations >= 1
    full = load_config(offline_rl.Config, CONFIGS / "full.yaml")
    assert full.source.kind == "real" and full.trainer.mesh is not None
    bad = load_config(offline_rl.Config, None, ["arms=[{sampler: rand, data: sft_best_refine}]"])
    with pytest.raises(ValueError, match="sft_best_refine"):
        offline_rl.run(bad)
