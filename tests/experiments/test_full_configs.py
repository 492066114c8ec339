"""The `full` configs (real checkpoints, accelerators): every one loads, and a run on a machine without the
checkpoints and data fails at once with every missing path named, before any model is loaded."""

import importlib
from pathlib import Path

import pytest

from prs_jax.config import load_config
from prs_jax.experiments import STUDIES, run_experiment
from prs_jax.experiments.common import missing_paths, preflight

CONFIGS = Path(__file__).parents[2] / "experiments" / "configs"


@pytest.mark.parametrize("study", STUDIES)
def test_full_config_names_every_missing_path(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative checkpoints/ and data/ paths resolve here: none exist
    cfg = load_config(importlib.import_module(f"prs_jax.experiments.{study}").Config, CONFIGS / study / "full.yaml")
    assert cfg.source.kind == "real"
    missing = missing_paths(cfg)
    assert missing, "a full config names checkpoint and data paths"
    keys = {k for k, _ in missing}
    assert any(k.endswith(("policy", "model", "labeler")) for k in keys), keys
    with pytest.raises(FileNotFoundError) as e:
        run_experiment(study, CONFIGS / study / "full.yaml")
    msg = str(e.value)
    assert f"{len(missing)} path(s)" in msg and "full.yaml" in msg
    for key, path in missing:
        assert f"{key}: {path}" in msg
    # once every path exists, the preflight passes (the study itself would then load the models)
    for _, path in missing:
        p = tmp_path / path
        if p.suffix in (".json", ".jsonl"):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("")
        else:
            p.mkdir(parents=True, exist_ok=True)
    assert missing_paths(cfg) == []
    preflight(cfg)


def test_world_configs_skip_the_preflight(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for study in STUDIES:
        cfg = load_config(importlib.import_module(f"prs_jax.experiments.{study}").Config,
                          CONFIGS / study / "smoke.yaml")
        preflight(cfg)  # world sources build their own files: nothing to check


def test_data_set_names_are_not_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from prs_jax.experiments import sr_dpo

    cfg = load_config(sr_dpo.Config, CONFIGS / "sr_dpo" / "full.yaml",
                      ["pairs.train_file=HuggingFaceH4/ultrafeedback_binarized", "pairs.eval_file=data/test.parquet"])
    keys = dict(missing_paths(cfg))
    assert "pairs.train_file" not in keys  # a data set name that `datasets` resolves (offline cache)
    assert keys["pairs.eval_file"] == "data/test.parquet"  # a file suffix: a local file
    assert keys["source.real.policy"] == "checkpoints/Meta-Llama-3-8B-Instruct"  # checkpoints are always local
