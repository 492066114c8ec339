"""scaling: the smoke config end to end (two tiny policy sizes, the second being the smoke world itself)."""

import json
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import run_experiment, scaling

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "scaling"


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
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
    assert "Paired gold gain over Rand" in (out / "results.md").read_text()
