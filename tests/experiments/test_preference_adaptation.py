"""preference_adaptation: the smoke config end to end, fresh held-out prompts per kind, win rates."""

import json
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import preference_adaptation as pa
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
    assert "Win rate at N=4" in (out / "results.md").read_text()


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
