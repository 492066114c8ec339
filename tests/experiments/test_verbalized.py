"""The verbalized-sampling study: smoke config end to end on the smoke world (methods, k and tau sweeps, DPO
sharpening), the real-source path, configs that load, and the coverage helpers."""

import json
import math
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import run_experiment
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
    assert set(res["dpo"]["methods"]) == {"direct", "vs_standard"} and res["dpo"]["summary"]["pairs"] >= 0
    assert {"vs_standard/k=2", "vs_standard/k=4"} == set(res["k_sweep"]) and set(res["tau_sweep"]) == {"0", "0.3"}
    for png in ("diversity_vs_quality.png", "before_after_dpo.png", "sweeps.png"):
        assert (out / png).stat().st_size > 0
    assert "VS-Standard" in (out / "results.md").read_text()
    assert set(rec["results"]) == set(res)


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
