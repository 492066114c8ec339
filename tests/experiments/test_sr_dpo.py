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
    pairs = res["pairs"]["sets"]["0.35"]
    assert pairs["pairs"] + pairs["ties_skipped"] == res["pairs"]["sampled_pairs"] > 0
    run = res["runs"]["sr_dpo-lam0.5@0.35"]
    for key in ("win_rate", "average_marginal", "accuracy", "prompt_augmented_accuracy", "pearson", "spearman"):
        assert np.isfinite(run[key]), key
    assert 0.0 <= run["win_rate"] <= 1.0 and run["vs_base"]["base"] == "DPO"
    # the trainer's own held-out metrics agree with the study's per-pair computation
    assert run["trainer_eval"]["margin"] == pytest.approx(run["average_marginal"], abs=2e-3)
    assert run["trainer_eval"]["prompt_augmented_accuracy"] == pytest.approx(run["prompt_augmented_accuracy"])
    c = res["controls"]["sr_dpo-lam0.5@0.35"]
    assert c["step"] == 2 and c["pairs"] == pairs["pairs"] and c["flipped"] == pairs["flipped"]
    assert c["partial_corr"] != c["partial_corr_refx"]  # the ablation's Delta is another quantity
    assert set(res["overhead"]) == {"sigmoid", "sr_dpo"} and res["overhead"]["sr_dpo"]["seconds_per_step"] > 0
    verdicts = {v["endpoint"]["name"]: v["verdict"] for v in res["protocol"]}
    assert set(verdicts) == {"partial_corr:sr_dpo-lam0.5@0.35", "flipped_delta_neg:sr_dpo-lam0.5@0.35",
                             "win:sr_dpo-lam0.5@0.35:sigmoid@0.35"}
    assert verdicts["win:sr_dpo-lam0.5@0.35:sigmoid@0.35"] in ("reproduced", "not reproduced", "untestable here")
    md = (out / "results.md").read_text()
    assert "Protocol: declared endpoints" in md and "| verdict |" in md and "Sr-DPO λ=0.5" in md
    assert (out / "win_rate_vs_flip_rate.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"pair", "win", "train_pair", "heldout_pair"}
    assert all("gold_gap" in r and "flipped" in r for r in records if r["kind"] == "pair")
    # the report is remade from the records alone, identically
    again = run_experiment("sr_dpo", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", f"work_dir={tmp_path / 'work'}"],
        report_only=True)
    assert again["results"]["protocol"] == res["protocol"] and again["results"]["controls"] == res["controls"]
    # pooling a second seed's directory: here a copy relabelled as world seed 1
    other = tmp_path / "seed1"
    other.mkdir()
    facts = json.loads((out / "measure.json").read_text())
    facts["world_seed"] = 1
    (other / "measure.json").write_text(json.dumps(facts))
    (other / "records.jsonl").write_text((out / "records.jsonl").read_text())
    pooled = run_experiment("sr_dpo", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", f"work_dir={tmp_path / 'work'}",
        f"pool_dirs=[{other}]", "protocol.seeds=[0,1]"], report_only=True)
    assert pooled["results"]["world_seeds"] == [0, 1]
    assert set(pooled["results"]["protocol"][0]["per_seed"]) == {"0", "1"}


def test_configs_load():
    for name in ("smoke", "cpu", "full"):
        cfg = load_config(sr_dpo.Config, CONFIGS / f"{name}.yaml")
        sr_dpo.validate(cfg)
        assert cfg.runs and cfg.protocol.endpoints and any(e.control for e in cfg.protocol.endpoints)
        # every declared endpoint names runs the config trains
        keys = {sr_dpo.run_key(r.tag, f) for r, f in cfg.plan()} | {"sft"}
        for e in cfg.protocol.endpoints:
            assert set(e.name.split(":", 1)[1].split(":")) <= keys, e.name
    cpu = load_config(sr_dpo.Config, CONFIGS / "cpu.yaml")
    assert cpu.pairs.flip_rates == (0.0, 0.2, 0.35) and cpu.protocol.seeds == (0, 1, 2)
    assert cpu.pairs.train_prompts >= 1000 and cpu.mid == cpu.trainer.steps // 2
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


def test_bt_flip_labels_are_keyed_by_prompt_id_and_hit_the_rate():
    rng = np.random.default_rng(0)
    base = [{"id": f"p{i}", "prompt": [], "a": "A", "b": "B", "rank": [float(x), float(y)], "gold": [float(x), float(y)],
             "proxy": [0.0, 0.0]} for i, (x, y) in enumerate(rng.normal(size=(4000, 2)))]
    rows, ties = sr_dpo.label_pairs(base, 0.35, seed=3, temperature=0.0)
    assert ties == 0 and len(rows) == 4000
    flipped = np.array([r["flipped"] for r in rows])
    assert abs(flipped.mean() - 0.35) < 3 * np.sqrt(0.35 * 0.65 / 4000)
    # a flipped label is against the gold reward, an unflipped one agrees (temperature 0)
    assert all((r["gold_gap"] < 0) == r["flipped"] for r in rows)
    # the labels depend on the prompt id, not on the order of the pairs
    back, _ = sr_dpo.label_pairs(base[::-1], 0.35, seed=3, temperature=0.0)
    assert {r["id"]: (r["chosen"], r["flipped"]) for r in back} == {r["id"]: (r["chosen"], r["flipped"]) for r in rows}
    assert sr_dpo.bt_label(1.0, 0.0, "p7", 0.35, 3) == sr_dpo.bt_label(1.0, 0.0, "p7", 0.35, 3)
    # nested across flip rates: common random numbers
    low, _ = sr_dpo.label_pairs(base, 0.2, seed=3, temperature=0.0)
    assert all(r["flipped"] for lo, r in zip(low, rows) if lo["flipped"])
    clean, _ = sr_dpo.label_pairs(base, 0.0, seed=3, temperature=0.0)
    assert not any(r["flipped"] for r in clean)
    # a tie is skipped at temperature 0; a Bradley-Terry temperature makes the clean label itself a draw
    assert sr_dpo.bt_label(0.5, 0.5, "t", 0.0, 0) is None
    soft, _ = sr_dpo.label_pairs(base, 0.0, seed=3, temperature=1.0)
    agree = np.mean([r["gold_gap"] > 0 for r in soft])
    assert 0.6 < agree < 0.9
    with pytest.raises(ValueError, match="flip rate"):
        sr_dpo.bt_label(1.0, 0.0, "p", 0.5, 0)


def test_controls_on_synthetic_inputs_equal_hand_computed_values():
    x = np.array([1.0, 2.0, 0.0, 4.0, 3.0, -1.0])
    y = np.array([0.5, 2.5, -1.0, 3.0, 2.0, 0.0])
    z = np.array([0.0, 1.0, 0.5, 2.0, 1.0, -0.5])
    r = np.corrcoef([x, y, z])
    want = (r[0, 1] - r[0, 2] * r[1, 2]) / np.sqrt((1 - r[0, 2] ** 2) * (1 - r[1, 2] ** 2))
    assert sr_dpo.partial_corr(x, y, z) == pytest.approx(want, abs=1e-12)
    assert sr_dpo.partial_corr_units(x, y, z).mean() == pytest.approx(want, abs=1e-12)
    # given a z that explains nothing, the partial correlation is the plain one
    assert sr_dpo.partial_corr(x, y, np.zeros(6)) == pytest.approx(r[0, 1], abs=1e-12)
    neg = sr_dpo.flipped_delta_negative([-0.1, 0.2, -0.3, 0.0, -0.5], [True, True, False, True, True])
    np.testing.assert_array_equal(neg, [1.0, 0.0, 0.0, 1.0])  # Delta = 0 is not < 0
    assert neg.mean() == 0.5
    # the endpoint units from records: the same numbers
    recs = [{"kind": "train_pair", "run": "s@0.35", "step": 1, "id": i, "gold_gap": float(b), "flipped": bool(f),
             "beta_h": float(c), "delta": float(a), "delta_refx": float(a) + 1.0}
            for i, (a, b, c, f) in enumerate(zip(x, y, z, [1, 0, 1, 0, 0, 1]))]
    assert sr_dpo.endpoint_units("partial_corr:s@0.35", recs).mean() == pytest.approx(want, abs=1e-12)
    np.testing.assert_array_equal(sr_dpo.endpoint_units("flipped_delta_neg:s@0.35", recs), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(sr_dpo.endpoint_units("flipped_delta_neg_refx:s@0.35", recs), [0.0, 0.0, 0.0])
    wins = [{"kind": "win", "run": "a", "id": 1, "scores": [1.0, 0.2]}, {"kind": "win", "run": "b", "id": 1,
                                                                         "scores": [0.5, 0.2]}]
    np.testing.assert_allclose(sr_dpo.endpoint_units("win:a:b", wins), [0.25])
    with pytest.raises(ValueError, match="KIND"):
        sr_dpo.endpoint_units("margin:a", wins)
    with pytest.raises(KeyError, match="measured"):
        sr_dpo.endpoint_units("win:a:c", wins)


def test_delta_reference_on_x_ablation_differs_from_the_papers_delta():
    pol = {"ref_chosen": np.array([-5.0, -6.0]), "ref_rejected": np.array([-7.0, -6.5]),
           "ref_chosen_aug": np.array([-4.0, -6.2]), "ref_rejected_aug": np.array([-7.5, -6.0])}
    ref = {"ref_chosen": np.array([-5.5, -6.1]), "ref_rejected": np.array([-6.8, -6.4]),
           "ref_chosen_aug": np.array([-4.6, -6.0]), "ref_rejected_aug": np.array([-7.2, -6.3])}
    bh, d, dx = sr_dpo.delta_terms(pol, ref, 0.1)
    np.testing.assert_allclose(bh, 0.1 * np.array([(-5 + 5.5) - (-7 + 6.8), (-6 + 6.1) - (-6.5 + 6.4)]))
    np.testing.assert_allclose(d, 0.1 * np.array([(-4 + 4.6) - (-7.5 + 7.2), (-6.2 + 6.0) - (-6.0 + 6.3)]))
    np.testing.assert_allclose(dx, 0.1 * np.array([(-4 + 5.5) - (-7.5 + 6.8), (-6.2 + 6.1) - (-6.0 + 6.4)]))
    assert not np.allclose(d, dx)
    # the paper's Delta is 0 where the policy is the reference; the ablation carries the reference's own p-effect
    _, d0, dx0 = sr_dpo.delta_terms(ref, ref, 0.1)
    np.testing.assert_array_equal(d0, 0.0)
    assert np.all(dx0 != 0.0)
    # the trainer's loss uses the same two definitions (objectives.PreferenceLoss.delta_reference)
    from prs_jax.train.objectives import PreferenceLoss

    assert PreferenceLoss("sr_dpo").delta_reference == "augmented"
    with pytest.raises(ValueError, match="delta_reference"):
        PreferenceLoss("sr_dpo", delta_reference="x")
    assert sr_dpo.RunSpec("sr_dpo", 0.5, delta_reference="plain").tag == "sr_dpo-lam0.5-refx"
    assert "ablation" in sr_dpo.RunSpec("sr_dpo", 0.5, delta_reference="plain").label
