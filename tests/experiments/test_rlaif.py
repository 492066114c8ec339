"""The RLAIF study: smoke config end to end on the smoke world (the world's separate labelers, variants, soft-label
vs gold RM, the four A2C arms, the protocol), the report re-made from the records, the real-source path, configs
that load, and the pure per-unit helpers the endpoints are computed from."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.errors import ConfigError
from prs_jax.experiments import run_experiment
from prs_jax.experiments.protocol import Endpoint, Protocol
from prs_jax.experiments.rlaif import (
    Config,
    LabelerVariant,
    Pair,
    align_units,
    endpoint_units,
    make_pairs,
    rm_credit,
)
from prs_jax.feedback.metrics import alignment_credit
from prs_jax.strategies.base import PromptItem

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "rlaif"


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
def test_configs_load(name):
    cfg = load_config(Config, CONFIGS / f"{name}.yaml")
    assert cfg.rm.label_variant in {v.name for v in cfg.variants}
    if name == "cpu":
        assert cfg.protocol.seeds == (0, 1, 2) and cfg.align_pairs >= 600 and cfg.protocol.controls
        assert {v.labeler for v in cfg.variants} == {"small", "medium", "large"}
    if name == "full":
        assert cfg.source.kind == "real" and cfg.real.labeler and cfg.mesh is not None


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="rm.label_variant"):
        Config(variants=(LabelerVariant("a"),))
    with pytest.raises(ValueError, match="self_consistency"):
        LabelerVariant("x", self_consistency=4)
    with pytest.raises(ValueError, match="no ':'"):
        LabelerVariant("a:b")
    with pytest.raises(ValueError, match="align:nope"):
        Config(protocol=Protocol(endpoints=(Endpoint("align:nope"),)))
    with pytest.raises(ValueError, match="expected one of"):
        Config(protocol=Protocol(endpoints=(Endpoint("gold:sft"),)))
    with pytest.raises(ValueError, match="oracle"):  # the A2C arms were switched off
        Config(a2c_enabled=False, protocol=Protocol(endpoints=(Endpoint("gold:oracle:sft"),)))
    with pytest.raises(ValueError, match="rlaif"):  # no RMs trained: no RLAIF arm
        Config(rm=dataclasses.replace(Config().rm, steps=0), protocol=Protocol(endpoints=(Endpoint("gold:rlaif:sft"),)))
    with pytest.raises(ValueError, match="human"):  # the world's labels are gold
        Config(protocol=Protocol(endpoints=(Endpoint("rm:human"),)))
    with pytest.raises(ConfigError, match="a2c.eval_samples"):
        load_config(Config, CONFIGS / "smoke.yaml", ["a2c.eval_samples=0"])


def test_labeler_context_is_the_request_text():
    from prs_jax.experiments.rlaif import labeler_context

    assert labeler_context([{"role": "user", "content": "Name three fruits."}]) == "Name three fruits."
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user",
                                                                                          "content": "more"}]
    assert labeler_context(convo) is convo and labeler_context("text") == "text"


def test_pairs_skip_ties_and_per_pair_values():
    item = PromptItem("p", "Name three fruits.", "Please leave out apple.")
    good, bad = "pear, plum, lemon.", "apple, pear, plum."
    pairs = make_pairs([item], [[good, bad, bad, bad]], lambda x, y, z: float("apple" not in y), "train")
    assert len(pairs) == 1 and pairs[0].human == 0 and pairs[0].split == "train" and pairs[0].id == "p/0"
    assert pairs[0].unit == "p"  # the prompt: its pairs share samples
    assert alignment_credit([0.9, 0.1, 0.5], [0, 0, 1]).tolist() == [1.0, 0.0, 0.5]
    # a labeler that always picks position 1: 1/2 after debiasing (ties), position bias 1, single orders 1/2
    u = align_units({"human": [0, 1], "p_a": [0.5, 0.5], "q_ab": [0.9, 0.9], "q_ba": [0.9, 0.9]})
    assert u["debiased"].tolist() == [0.5, 0.5] and u["bias"].tolist() == [1.0, 1.0]
    assert u["a_first"].tolist() == [1.0, 0.0] and u["b_first"].tolist() == [0.0, 1.0]
    assert u["no_debias"].tolist() == [0.5, 0.5]
    assert rm_credit({"a": [1.0, 0.0, 2.0], "b": [0.0, 1.0, 2.0], "human": [0, 0, 1]}).tolist() == [1.0, 0.0, 0.5]


def test_endpoint_units_pair_by_unit():
    ids, units = ["p/0", "p/1", "q/0"], ["p", "p", "q"]
    human = [0, 1, 0]
    records = [
        {"kind": "align", "variant": "big", "ids": ids, "units": units, "human": human, "p_a": [0.8, 0.2, 0.7],
         "q_ab": [0.8, 0.3, 0.9], "q_ba": [0.2, 0.6, 0.6]},
        # the small labeler's records in another order: paired by unit, not by position
        {"kind": "align", "variant": "small", "ids": ids[::-1], "units": units[::-1], "human": human[::-1],
         "p_a": [0.3, 0.5, 0.9], "q_ab": [0.9, 0.9, 0.9], "q_ba": [0.9, 0.9, 0.9]},
        {"kind": "rm", "rm": "ai", "ids": ids, "units": units, "human": human, "a": [1.0, 0.0, 0.0],
         "b": [0.0, 1.0, 1.0]},
        {"kind": "policy", "policy": "sft", "ids": ["x", "y"], "gold": [[0.2, 0.4], [0.5, 0.5]]},
        {"kind": "policy", "policy": "rlaif", "ids": ["x", "y"], "gold": [[0.3, 0.4], [0.1, 0.5]]},
    ]
    # one value per unit (prompt p averages its two pairs), units in the first record's order
    assert endpoint_units("align:big", records).tolist() == [0.5, 0.5]
    # small: q/0 -> wrong (0.3 picks B, human A), p/1 -> tie, p/0 -> right; p = (1 + 0.5) / 2
    assert endpoint_units("align:big:small", records).tolist() == [0.25, 1.0]
    np.testing.assert_allclose(endpoint_units("debias:big", records), [0.0, 0.5])
    assert endpoint_units("bias:small", records).tolist() == [1.0, 1.0]
    np.testing.assert_allclose(endpoint_units("bias:big:small", records), [-1.0, 0.0])
    np.testing.assert_allclose(endpoint_units("rm:ai", records), [0.5, -0.5])
    np.testing.assert_allclose(endpoint_units("gold:rlaif:sft", records), [0.05, -0.2])
    np.testing.assert_allclose(endpoint_units("win:rlaif:sft", records), [0.25, -0.25])
    with pytest.raises(ValueError, match="no align record"):
        endpoint_units("align:medium", records)


def test_rm_rows_keep_the_prompt_format():
    """Text pairs (e.g. TL;DR comparisons) stay text; conversations get message responses: the RM trainer's
    pair parser refuses a mix."""
    from prs_jax.data.pairs import parse_pair
    from prs_jax.experiments.rlaif import _rm_rows

    text = Pair("t", "Summarise: the cat sat.", "A cat sat.", "Dogs.", 1, "train", "t")
    chat = Pair("c", [{"role": "user", "content": "hi"}], "hello", "bye", 0, "train", "c")
    for rows in (_rm_rows([text, chat], None), _rm_rows([text, chat], np.array([0.3, 0.8]))):
        assert rows[0]["chosen"] in ("A cat sat.", "Dogs.") and isinstance(rows[1]["chosen"], list)
        for r in rows:
            parse_pair(r)
    assert _rm_rows([text], None)[0]["chosen"] == "Dogs."  # human prefers B


def test_rewards_load_by_name(smoke_world):
    from prs_jax.strategies.base import join_preference
    from prs_jax.train.a2c import RewardConfig
    from prs_jax.world.task import gold_reward

    assert RewardConfig(callable="prs_jax.experiments.rlaif:zero_reward").build()(["x", "y"], ["a", "b"]) == [0.0, 0.0]
    rows = smoke_world.heldout()[:3]
    prompts = [join_preference(r["prompt"], r["preference"]) for r in rows]
    answers = ["one, two, three.", "", "Sure! apple, pear."]
    # the oracle arm's reward: A2C prompts are x, a blank line, z
    got = RewardConfig(callable="prs_jax.world.task:gold_reward", interface="pair").build()(prompts, answers)
    assert got == [gold_reward(r["prompt"], y, r["preference"]) for r, y in zip(rows, answers)]


def test_smoke_end_to_end_and_report(smoke_world_root, tmp_path):
    out = tmp_path / "rlaif"
    args = [f"source.world.root={smoke_world_root}", f"out_dir={out}", f"work_dir={tmp_path / 'work'}",
            "progress=false"]
    rec = run_experiment("rlaif", CONFIGS / "smoke.yaml", args)
    data = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in data
    res = data["results"]
    for name, row in res["alignment"].items():
        assert 0.0 <= row["debiased"][0] <= 1.0 and 0.0 <= row["bias"][0] <= 1.0, name
    # the labelers are the world's separate models, not the policy
    facts = json.loads((out / "measure.json").read_text())
    assert {Path(v["labeler_path"]).name for v in facts["variants"].values()} == {"small", "large"}
    assert facts["variants"]["small"]["params"] < facts["variants"]["large"]["params"] != facts["policy_params"]
    assert facts["variants"]["large_cot_sc2"]["example_rationale"] is not None
    assert {g["gate"] for g in facts["labeler_gates"]["rows"]} >= {"labeler_teacher_accuracy"}
    assert {"ai", "gold", "untrained", "proxy"} <= set(res["reward_models"])
    assert set(res["rl"]) == {"sft", "rlaif", "rlhf", "oracle", "constant"}
    assert all(0.0 <= r["win_vs_sft"][0] <= 1.0 for p, r in res["rl"].items() if p != "sft")
    assert [v["endpoint"]["name"] for v in res["protocol"]][0] == "align:large"
    assert {v["verdict"] for v in res["protocol"]} <= {"control passed", "control failed", "reproduced",
                                                       "not reproduced", "untestable here"}
    assert (out / "alignment.png").stat().st_size > 0 and (out / "rl.png").stat().st_size > 0
    assert "Protocol" in (out / "results.md").read_text()
    assert set(rec["results"]) == set(res)
    # the report alone, from the records, gives the same tables and verdicts
    run_experiment("rlaif", CONFIGS / "smoke.yaml", args, report_only=True)
    again = json.loads((out / "results.json").read_text())["results"]
    for key in ("protocol", "alignment", "reward_models", "rl"):
        assert again[key] == res[key], key
    # a re-run reuses the trained RMs and policies (same settings and data) and measures the same
    run_experiment("rlaif", CONFIGS / "smoke.yaml", [*args[:1], f"out_dir={tmp_path / 'again'}", *args[2:]])
    rerun = json.loads((tmp_path / "again" / "results.json").read_text())["results"]
    assert rerun["rl"] == res["rl"] and rerun["reward_models"] == res["reward_models"]


def test_real_source_path(smoke_world, tmp_path):
    """source.kind=real on the smoke world's checkpoints and its RM pairs (human label = chosen)."""
    out = tmp_path / "rlaif-real"
    rec = run_experiment("rlaif", CONFIGS / "smoke.yaml", [
        "source.kind=real", f"source.real.policy={smoke_world.policy}", f"out_dir={out}",
        f"work_dir={tmp_path / 'work'}", "progress=false", f"real.pairs={smoke_world.data / 'rm_eval.jsonl'}",
        "real.max_pairs=8", "align_pairs=8", "variants=[{name: policy}]", "rm.label_variant=policy", "rm.steps=1",
        "a2c_enabled=false", "protocol.endpoints=[]"])
    res = rec["results"]
    facts = json.loads((out / "measure.json").read_text())
    assert facts["pairs"]["total"] == 8 and 0 < facts["pairs"]["share_a_preferred"] < 1  # shown in random order
    assert facts["variants"]["policy"]["labeler_path"] == str(smoke_world.policy)
    assert set(res["reward_models"]) == {"ai", "human", "untrained"} and res["rm_train_label_agreement"]
    assert res["labels"] == "human" and not res["rl"]
