"""The RLAIF study: smoke config end to end on the smoke world (labeler variants, size sweep, soft-label vs gold RM,
A2C), the real-source path on the same checkpoints, configs that load, and the pure helpers."""

import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.experiments import run_experiment
from prs_jax.experiments.rlaif import (
    Config,
    LabelerVariant,
    Labels,
    alignment_row,
    make_pairs,
)
from prs_jax.strategies.base import PromptItem

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "rlaif"


@pytest.mark.parametrize("name", ["smoke", "cpu", "cpu_sizes", "full"])
def test_configs_load(name):
    cfg = load_config(Config, CONFIGS / f"{name}.yaml")
    assert cfg.rm.label_variant in {v.name for v in cfg.variants}
    if name == "full":
        assert cfg.source.kind == "real" and cfg.real.labeler and cfg.mesh is not None


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="rm.label_variant"):
        Config(variants=(LabelerVariant("a"),))
    with pytest.raises(ValueError, match="self_consistency"):
        LabelerVariant("x", self_consistency=4)


def test_labeler_context_is_the_request_text():
    from prs_jax.experiments.rlaif import labeler_context

    assert labeler_context([{"role": "user", "content": "Name three fruits."}]) == "Name three fruits."
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user",
                                                                                          "content": "more"}]
    assert labeler_context(convo) is convo and labeler_context("text") == "text"


def test_pairs_skip_ties_and_alignment_metrics():
    item = PromptItem("p", "Name three fruits.", "Please leave out apple.")
    good, bad = "pear, plum, lemon.", "apple, pear, plum."
    pairs = make_pairs([item], [[good, bad, bad, bad]], lambda x, y, z: float("apple" not in y), set())
    assert len(pairs) == 1 and pairs[0].human == 0 and pairs[0].split == "train"
    # a labeler that always picks position 1: 0.5 after debiasing (ties), position bias 1
    labels = Labels(np.array([0.5, 0.5]), np.array([0.9, 0.9]), np.array([0.9, 0.9]), 0.0)
    row = alignment_row(labels, np.array([0, 1]))
    assert row["alignment"] == 0.5 and row["position_bias"] == 1.0 and row["alignment_no_debias"] == 0.5


def test_control_reward_loads_by_name():
    from prs_jax.train.a2c import RewardConfig

    assert RewardConfig(callable="prs_jax.experiments.rlaif:zero_reward").build()(["x", "y"], ["a", "b"]) == [0.0, 0.0]


def test_smoke_end_to_end(smoke_world_root, smoke_world, tmp_path):
    out = tmp_path / "rlaif"
    rec = run_experiment("rlaif", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", "progress=false",
        f"sizes=[{{name: same, model: {smoke_world.policy}}}]"])
    data = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in data
    assert data["config"]["seed"] == 0 and data["wall_seconds"] > 0
    res = data["results"]
    for name, row in res["variants"].items():
        assert 0.0 <= row["alignment"] <= 1.0 and 0.0 <= row["position_bias"] <= 1.0, name
    assert res["variants"]["world_cot_sc2"]["example_rationale"] is not None
    assert res["sizes"]["same"]["alignment"] == pytest.approx(res["variants"]["world"]["alignment"])
    assert {"ai", "gold", "untrained", "world_proxy"} <= set(res["reward_models"])
    assert 0.0 <= res["reward_models"]["ai"]["eval_accuracy"] <= 1.0
    contests = res["rl"]["contests"]
    assert {"ai_vs_sft", "gold_vs_sft", "ai_vs_gold"} == set(contests)
    assert all(0.0 <= c["gold_win_rate"] <= 1.0 for c in contests.values())
    assert (out / "alignment.png").stat().st_size > 0 and (out / "win_rates.png").stat().st_size > 0
    assert "alignment" in (out / "results.md").read_text()
    assert set(rec["results"]) == set(res)


def test_real_source_path(smoke_world, tmp_path):
    """source.kind=real on the smoke world's checkpoints and its RM pairs (human label = chosen)."""
    out = tmp_path / "rlaif-real"
    rec = run_experiment("rlaif", CONFIGS / "smoke.yaml", [
        "source.kind=real", f"source.real.policy={smoke_world.policy}", f"out_dir={out}", "progress=false",
        f"real.pairs={smoke_world.data / 'rm_eval.jsonl'}", "real.max_pairs=8", "align_pairs=8",
        "variants=[{name: world}]", "rm.steps=1", "a2c.enabled=false"])
    res = rec["results"]
    assert res["data"]["pairs"] == 8 and 0 < res["data"]["share_a_preferred"] < 1  # shown in random order
    assert set(res["reward_models"]) == {"ai", "human", "untrained"}  # no proxy RM given: no proxy row
    assert any("no gold reward" in n for n in rec["notes"])
