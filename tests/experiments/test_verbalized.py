"""The verbalized-sampling study: smoke config end to end on the smoke world (methods, k and tau sweeps, DPO
sharpening), the real-source path, configs that load, and the coverage helpers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from prs_jax.config import load_config
from prs_jax.experiments import run_experiment
from prs_jax.experiments import verbalized as v
from prs_jax.experiments.verbalized import Config, optimal_set_count, prompt_metrics
from prs_jax.strategies.base import PromptItem

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "verbalized"


@pytest.mark.parametrize("name", ["smoke", "cpu", "full"])
def test_configs_load(name):
    cfg = load_config(Config, CONFIGS / f"{name}.yaml")
    assert cfg.n >= 2
    if name == "full":
        assert cfg.source.kind == "real" and cfg.source.real.reward_model


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="methods"):
        Config(methods=("direct", "vs_magic"))


def test_coverage_definition():
    assert optimal_set_count("Name three fruits.", None) == math.comb(10, 3)
    assert optimal_set_count("Name four fruits.", "Please include pear. I do not want apple.") == math.comb(8, 3)
    item = PromptItem("p", "Name three fruits.", "Please leave out apple.")
    texts = ["pear, plum, lemon.", "plum, pear, lemon.", "apple, pear, plum."]
    m = prompt_metrics(texts, [1.0, 1.0, 0.5], item, gold=True, n=3)
    assert m["distinct_sets"] == pytest.approx(2 / 3)  # the first two name the same set
    assert m["coverage"] == pytest.approx(1 / 3) and m["optimal_share"] == pytest.approx(2 / 3)
    # items named: pear x3, plum x3, lemon x2, apple x1 out of 10 fruits
    p = [3 / 9, 3 / 9, 2 / 9, 1 / 9]
    assert m["item_entropy"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(10))


def test_base_distribution_helpers():
    base = {"lemon": 0.5, "melon": 0.3, "plum": 0.2}
    assert v.list_distribution("- lemon (60%)\n- plum (40%)", base, 2) == [("lemon", 0.6), ("plum", 0.4)]
    for bad in ("- lemon (60%)\n- lemon (40%)",  # repeated item
                "- lemon (830%)\n- plum (20%)",  # not a probability
                "- lemon (50%)\n- wolf (50%)",  # not in the category
                "- lemon (30%)\n- plum (30%)",  # does not sum to 1
                "- lemon (100%)",  # a collapsed list: one answer where two were asked for
                "lemon and plum"):
        assert v.list_distribution(bad, base, 2) is None, bad
    assert v.single_item("plum.", base) == "plum" and v.single_item("plum, lemon.", base) is None
    # KL over the usable answers: exact p_base frequencies give 0 whatever the unusable ones; none usable: NaN
    exact = ["lemon"] * 5 + ["melon"] * 3 + ["plum"] * 2
    assert v.kl_to_base(exact, base) == pytest.approx(0.0, abs=1e-12)
    assert v.kl_to_base(exact + [None] * 7, base) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(v.kl_to_base([None], base))
    assert v.norm_entropy(["lemon", "melon", "plum"], base) == pytest.approx(1.0)
    # a VS draw is keyed by (seed, request, k, list index), never by order
    lst = [("lemon", 0.5), ("plum", 0.5)]
    draws = [v.vs_draw(lst, 0, "fruit/0", 2, j) for j in range(40)]
    assert draws == [v.vs_draw(lst, 0, "fruit/0", 2, j) for j in range(40)] and set(draws) == {"lemon", "plum"}
    assert v.vs_draw(None, 0, "fruit/0", 2, 0) is None


def test_typicality_labels_prefer_the_typical_item():
    base = {"lemon": 0.6, "melon": 0.3, "plum": 0.1}
    labels = [v.typicality_label("plum.", "lemon.", base, 5.0, 0, "fruit/0", j) for j in range(200)]
    assert all(lab is not None for lab in labels)
    typical = np.mean([lab[2] for lab in labels])
    expect = 1 / (1 + math.exp(-5.0 * math.log(0.6 / 0.1)))
    assert abs(typical - expect) < 0.05 and all(lab[0] == ("lemon." if lab[2] else "plum.") for lab in labels)
    assert labels == [v.typicality_label("plum.", "lemon.", base, 5.0, 0, "fruit/0", j) for j in range(200)]
    # alpha 0: no bias, about half; unusable or equal answers give no pair
    flat = np.mean([v.typicality_label("plum.", "lemon.", base, 0.0, 0, "fruit/0", j)[2] for j in range(400)])
    assert 0.4 < flat < 0.6
    assert v.typicality_label("plum.", "plum!", base, 5.0, 0, "r", 0) is None
    assert v.typicality_label("wolf.", "plum.", base, 5.0, 0, "r", 0) is None


def test_endpoint_units_on_synthetic_records():
    p_base = {"fruit": {"lemon": 0.5, "melon": 0.3, "plum": 0.2}}
    exact = ["lemon"] * 5 + ["melon"] * 3 + ["plum"] * 2

    def dist(phase, method, items):
        return {"kind": "dist", "phase": phase, "method": method, "request": "fruit/0", "category": "fruit",
                "items": items}

    recs = [dist("sft", "direct", exact), dist("sft", "vs", exact), dist("dpo", "direct", ["lemon"] * 10),
            dist("dpo", "vs", exact),
            {"kind": "lists", "phase": "sft", "request": "fruit/0", "category": "fruit",
             "lists": [{"k": 2, "items": [("lemon", 0.6), ("plum", 0.4)]}, {"k": 2, "items": [("melon", 0.55),
                                                                                          ("plum", 0.45)]},
                       {"k": 2, "items": None}]}]
    collapse = math.log(1 / 0.5)  # all "lemon": KL = log(1 / p_base(lemon))
    assert v.endpoint_units("kl_shift:direct", recs, p_base) == pytest.approx([collapse])
    assert v.endpoint_units("kl_gap:dpo", recs, p_base) == pytest.approx([collapse])
    assert v.endpoint_units("shift_gap", recs, p_base) == pytest.approx([collapse])
    assert v.endpoint_units("entropy_gap:dpo", recs, p_base)[0] > 0.9
    assert v.endpoint_units("calib:sft", recs, p_base)[0] > 0.9
    # every arm of a request is compared on the same number of usable answers (the smallest usable count)
    short = recs[:3] + [dist("dpo", "vs", ["lemon", None, "plum"])]
    t = v.request_table(short, p_base)
    assert {t[(ph, m)]["fruit/0"]["usable_compared"] for ph in ("sft", "dpo") for m in ("direct", "vs")} == {2}
    # a request with no usable answer in some arm is no unit of any endpoint (not a NaN unit)
    empty = recs[:3] + [dist("dpo", "vs", [None] * 4)]
    for name in ("kl_gap:dpo", "kl_shift:vs", "shift_gap", "entropy_gap:dpo"):
        assert v.endpoint_units(name, empty, p_base).size == 0, name
    for bad in ("kl_gap:rlhf", "kl_shift:sequence", "calibration:sft"):
        with pytest.raises(ValueError, match="endpoint"):
            v.endpoint_units(bad, recs, p_base)
    with pytest.raises(KeyError, match="phase 'dpo'"):
        v.endpoint_units("calib:dpo", recs, p_base)


def test_distribution_settings_are_checked():
    with pytest.raises(ValueError, match="list_ks"):
        Config(distribution=v.DistributionSettings(samples=7, list_ks=(3, 4)))


def test_smoke_end_to_end(smoke_world_root, tmp_path):
    out = tmp_path / "verbalized"
    rec = run_experiment("verbalized", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", "progress=false"])
    data = json.loads((out / "results.json").read_text())
    for key in ("config", "git_commit", "seed", "versions", "wall_seconds"):
        assert key in data
    res = data["results"]
    assert set(res["methods"]) == {"direct", "sequence", "multi_turn", "vs_standard", "vs_multi"}
    for m, r in res["methods"].items():
        assert 0.0 <= r["quality"] <= 1.0 and 0.0 <= r["parse_rate"] <= 1.0, m
        assert "coverage" in r and "semantic" in r and "item_entropy" in r
    assert set(res["dpo"]["methods"]) == {"direct", "vs_standard"} and res["dpo"]["summary"]["pairs"] >= 1
    assert res["dpo"]["summary"]["labels"] == "gold"
    assert {"vs_standard/k=2", "vs_standard/k=4"} == set(res["k_sweep"]) and set(res["tau_sweep"]) == {"0", "0.3"}
    for png in ("diversity_vs_quality.png", "before_after_dpo.png", "sweeps.png", "base_distribution.png"):
        assert (out / png).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "VS-Standard" in md and "known base distribution" in md and "Protocol: declared endpoints" in md
    assert set(rec["results"]) == set(res)
    # the base distribution: both phases, both methods, on the 16 single-item requests
    for key in ("sft/direct", "sft/vs", "dpo/direct", "dpo/vs"):
        kl = res["distribution"][key]["kl"]  # NaN when no request has usable answers in every arm (smoke policy)
        assert (math.isnan(kl) or kl >= 0) and 0 <= res["distribution"][key]["valid"] <= 1
    rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    dist = [r for r in rows if r["kind"] == "dist"]
    assert len(dist) == 2 * 2 * 16 and all(len(r["items"]) == 6 for r in dist)
    verdicts = {v["endpoint"]["name"]: v for v in res["protocol"]}
    assert set(verdicts) == {"kl_shift:direct", "kl_gap:dpo", "shift_gap"}
    # the smoke policy names few single items, so requests may lack usable answers: then too few units, no crash
    assert all(v["units"] <= 16 for v in verdicts.values())
    assert all(v["units"] == 16 or v["verdict"] in ("control failed", "untestable here") for v in verdicts.values())
    # report only: the same numbers from the records (no models)
    again = run_experiment("verbalized", CONFIGS / "smoke.yaml", [
        f"source.world.root={smoke_world_root}", f"out_dir={out}", "progress=false"], report_only=True)["results"]
    for key in ("methods", "distribution", "protocol", "tau_sweep"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(res[key], sort_keys=True), key


def test_real_source_path(smoke_world, tmp_path):
    """source.kind=real: quality by the RM, no coverage."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n"
                               for r in smoke_world.heldout()[:2]))
    rec = run_experiment("verbalized", CONFIGS / "smoke.yaml", [
        "source.kind=real", f"source.real.policy={smoke_world.policy}",
        f"source.real.reward_model={smoke_world.reward_model}", "source.real.prompt_set=generic",
        f"source.real.prompts_path={prompts}", "source.real.dtype=float32", "prompts=2", f"out_dir={tmp_path / 'o'}",
        "progress=false", "methods=[direct, vs_standard]", "k_sweep=[]", "taus=[]", "dpo.enabled=false"])
    r = rec["results"]["methods"]["vs_standard"]
    assert "coverage" not in r and math.isfinite(r["quality"])
    assert any("real source" in n for n in rec["notes"])
