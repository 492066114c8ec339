"""The Sr-DPO study: the smoke config end to end on the shared smoke world, the configs, the pure metrics."""

import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.eval.stats import win_rate
from prs_jax.experiments import run_experiment, sr_dpo
from prs_jax.experiments.common import RealSpec, Source
from prs_jax.experiments.env import StudyEnv
from prs_jax.experiments.policy_tools import pearson, spearman

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs" / "sr_dpo"


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "out"
    run_experiment("sr_dpo", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", f"work_dir={tmp_path / 'work'}"])
    record = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in record, key
    assert record["config"]["pairs"]["ranker"] == "gold" and record["seed"] == 0
    res = record["results"]
    assert res["pairs"]["train_pairs"] > 0 and res["pairs"]["train_label_agrees_with_gold"] == 1.0
    run = res["runs"]["sr_dpo-lam0.5"]
    for key in ("win_rate", "average_marginal", "accuracy", "prompt_augmented_accuracy", "pearson", "spearman"):
        assert np.isfinite(run[key]), key
    assert 0.0 <= run["win_rate"] <= 1.0
    # the trainer's own held-out metrics agree with the study's per-pair computation
    assert run["trainer_eval"]["margin"] == pytest.approx(run["average_marginal"], abs=2e-3)
    assert run["trainer_eval"]["prompt_augmented_accuracy"] == pytest.approx(run["prompt_augmented_accuracy"])
    assert set(res["overhead"]) == {"sigmoid", "sr_dpo"} and res["overhead"]["sr_dpo"]["seconds_per_step"] > 0
    for png in ("win_rate_vs_lambda.png", "margin_vs_gold.png"):
        assert (out / png).stat().st_size > 0
    assert "Sr-DPO λ=0.5" in (out / "results.md").read_text()


def test_configs_load():
    for name in ("smoke", "cpu", "full"):
        cfg = load_config(sr_dpo.Config, CONFIGS / f"{name}.yaml")
        assert cfg.runs
    full = load_config(sr_dpo.Config, CONFIGS / "full.yaml")
    assert full.source.kind == "real" and full.trainer.mesh is not None and full.optim.lr == 5e-7


def test_real_source_checks(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(6)))
    real = RealSpec(policy="/ckpt/p", reward_model="/ckpt/rm", prompt_set="generic", prompts_path=str(prompts))
    env = StudyEnv.from_source(Source(kind="real", real=real), require=("policy", "prompts_path", "reward_model"))
    _, held = env.split(4, 2)
    assert env.gold is None and [i.prompt for i in held] == ["question 4?", "question 5?"]
    with pytest.raises(ValueError, match="reward_model"):
        StudyEnv.from_source(Source(kind="real", real=RealSpec(policy="/p", prompts_path=str(prompts))))
    cfg = load_config(sr_dpo.Config, None, ["source.kind=real", "pairs.ranker=gold"])
    with pytest.raises(ValueError, match="gold"):
        sr_dpo.run(cfg)


def test_metrics():
    assert win_rate([1, 0, 0.5], [0, 1, 0.5]).win_rate == pytest.approx(0.5)
    assert (win_rate([2, 2], [1, 1]).win_rate, win_rate([2, 2], [1, 1]).se) == (1.0, 0.0)
    assert sr_dpo.head_to_head([1, 0, 0.5, 2], [0, 1, 0.5, 2]) == {"win": 0.25, "tie": 0.5, "lose": 0.25,
                                                                   "win_rate": 0.5, "win_rate_se": pytest.approx(
                                                                       np.std([1, 0, .5, .5], ddof=1) / 2)}
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(pearson([1, 2, 3, 4], [1, 2.5, 2.5, 4]))
    assert np.isnan(pearson([1, 1], [2, 3]))
    pol = {"ref_chosen": np.array([-1.0, -2.0]), "ref_rejected": np.array([-3.0, -1.0]),
           "ref_chosen_aug": np.array([-1.0, -1.0]), "ref_rejected_aug": np.array([-2.0, -2.0])}
    ref = {k: np.full(2, -2.0) for k in pol}
    h, h_aug = sr_dpo.log_ratio_margins(pol, ref)
    np.testing.assert_allclose(h, [2.0, -1.0])
    m = sr_dpo.pair_metrics(h, h_aug, 0.1, np.array([0.5, 0.1]))
    assert m["average_marginal"] == pytest.approx(0.5) and m["accuracy"] == 0.5
    assert m["prompt_augmented_accuracy"] == 1.0 and m["pearson"] == pytest.approx(1.0)
    assert sr_dpo.head_to_head([1, 1, 0, 0.5], [0, 1, 1, 0.2]) == pytest.approx(
        {"win": 0.5, "tie": 0.25, "lose": 0.25, "win_rate": 0.625, "win_rate_se": 0.2394}, abs=1e-4)
    row = sr_dpo.trl_pair({"prompt": "q", "chosen": [{"role": "user", "content": "q"}], "rejected": [], "x": 1})
    assert "prompt" not in row and "x" not in row
