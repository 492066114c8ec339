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
    assert isinstance(saved["git_dirty"], bool)  # a result from a dirty tree says so
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


def test_size_source_real_rm_choice():
    import dataclasses

    from prs_jax.experiments.common import RealSpec, Source

    real = Source(kind="real", real=RealSpec(policy="", reward_model="rm-fixed", prompts_path="p.jsonl"))
    sizes = (scaling.Size("a", policy="pol-a", reward_model="rm-a"), scaling.Size("b", policy="pol-b"))
    cfg = scaling.Config(source=real, sizes=sizes, rm="fixed")
    assert [scaling._size_source(cfg, s).real.reward_model for s in sizes] == ["rm-fixed", "rm-fixed"]
    assert [scaling._size_source(cfg, s).real.policy for s in sizes] == ["pol-a", "pol-b"]
    per = dataclasses.replace(cfg, rm="per_size")
    # a size without its own RM falls back to the source's
    assert [scaling._size_source(per, s).real.reward_model for s in sizes] == ["rm-a", "rm-fixed"]
    with pytest.raises(ValueError, match=r"sizes\[c\].policy"):
        scaling._size_source(cfg, scaling.Size("c"))


def test_sr_dpo_part_config_errors_come_first(tmp_path):
    from prs_jax.experiments.common import RealSpec, Source

    real = Source(kind="real", real=RealSpec(reward_model="rm", prompts_path="p.jsonl"))
    cfg = scaling.Config(source=real, sizes=(scaling.Size("a", policy="x"), scaling.Size("b", policy="y")),
                         parts=("reward_vs_n", "sr_dpo"), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ranker 'gold' needs the synthetic world"):
        scaling.run(cfg)  # before any model is loaded or any reward-vs-N sampling
    sub = scaling._sr_dpo_config(cfg, cfg.sizes[1], scaling._size_source(cfg, cfg.sizes[1]))
    assert sub.work_dir == str(tmp_path / "work" / "b") and sub.out_dir == str(tmp_path / "sr_dpo" / "b")


def test_loglog_fit():
    fit = scaling._loglog([1e3, 1e4, 1e5], [0.1, 0.01, 0.001], n_boot=200)
    assert fit["slope"] == pytest.approx(-1.0) and fit["intercept"] == pytest.approx(2.0)
    assert fit["slope_ci"] == pytest.approx([-1.0, -1.0])  # exact points: every resample gives the same line
    units = [[0.09, 0.11], [0.009, 0.011], [0.0009, 0.0011]]  # per-prompt values, means 0.1, 0.01, 0.001
    fit = scaling._loglog([1e3, 1e4, 1e5], [0.1, 0.01, 0.001], units, n_boot=200)
    assert fit["slope"] == pytest.approx(-1.0) and fit["slope_ci"][0] < -1.0 < fit["slope_ci"][1]
    # paired: each prompt's factor (0.9 or 1.1) is shared by every size, so it cancels from the slope
    fit = scaling._loglog([1e3, 1e4, 1e5], [0.1, 0.01, 0.001], units, paired=True, n_boot=200)
    assert fit["slope_ci"] == pytest.approx([-1.0, -1.0])
    assert scaling._loglog([1e3], [0.1]) is None
    assert scaling._loglog([1e3, 1e4], [0.1, 0.0]) is None  # log of 0
    assert scaling._loglog([1e3, 1e4], [0.1, float("nan")]) is None
