"""`prs-jax train sft|rm|dpo CONFIG overrides`: end to end on a tiny checkpoint and the example data files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prs_jax.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "experiments"


def _config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("loss", ["sr_dpo", "ipo"])
def test_train_dpo_from_config_with_cached_reference(llama_dir, tmp_path, loss, hf_ref):
    cfg = EXAMPLES / "configs" / "train_dpo_tiny.yaml"
    args = ["train", "dpo", str(cfg), f"model={llama_dir}", f"loss.name={loss}",
            f"data.train={EXAMPLES / 'data' / 'tiny_pairs.jsonl'}", "data.eval=null",
            f"trainer.out_dir={tmp_path / 'run'}", "trainer.steps=3", "trainer.save_every=0",
            "trainer.progress=false", "trainer.tensorboard=false", f"ref_cache_dir={tmp_path / 'cache'}",
            f"export_dir={tmp_path / 'export'}"]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    if loss == "sr_dpo":
        assert "prompt_augmented_accuracy" in rows[0]
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 1
    # the exported policy loads in transformers
    model = hf_ref.causal_lm(tmp_path / "export")
    assert model.config.model_type == "llama"


def test_train_sft_and_rm(llama_dir, tmp_path):
    assert main(["train", "sft", str(EXAMPLES / "configs" / "train_sft_tiny.yaml"), f"model={llama_dir}",
                 f"data.train={EXAMPLES / 'data' / 'tiny_sft.jsonl'}", f"trainer.out_dir={tmp_path / 'sft'}",
                 "trainer.steps=2", "trainer.progress=false", "trainer.tensorboard=false"]) == 0
    assert main(["train", "rm", str(EXAMPLES / "configs" / "train_rm_tiny.yaml"), f"model={llama_dir}",
                 f"data.train={EXAMPLES / 'data' / 'tiny_pairs.jsonl'}", f"trainer.out_dir={tmp_path / 'rm'}",
                 "trainer.steps=2", "trainer.progress=false", "trainer.tensorboard=false",
                 f"export_dir={tmp_path / 'rm_export'}"]) == 0
    cfg = json.loads((tmp_path / "rm_export" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]


def test_train_config_errors(tmp_path, capsys):
    bad = _config(tmp_path, "bad", "model: x\nloss:\n  betta: 0.1\n")
    assert main(["train", "dpo", str(bad)]) == 2  # a usage error
    assert "unknown key(s) loss.betta" in capsys.readouterr().err
    missing = tmp_path / "pairs.jsonl"
    missing.write_text('{"prompt": "hi", "chosen": "a"}\n')
    assert main(["train", "dpo", "model=/nonexistent", f"data.train={missing}"]) == 1
    assert "/nonexistent" in capsys.readouterr().err
    assert main(["train", "dpo", f"data.train={missing}"]) == 2
    assert "`model`" in capsys.readouterr().err


def test_auto_pair_layout_picks_cascade_only_where_it_applies():
    from types import SimpleNamespace as NS

    import numpy as np

    from prs_jax.train.run import resolve_pair_layout

    full = [NS(prompt_ids=np.array([1, 2]), augmented=None, where="a:1"),
            NS(prompt_ids=np.array([3]), augmented=NS(prompt_ids=np.array([9, 3])), where="a:2")]
    empty = full + [NS(prompt_ids=np.array([], np.int32), augmented=None, where="a:3")]
    assert resolve_pair_layout("auto", "dpo", False, full)[0] == "cascade"
    layout, why = resolve_pair_layout("auto", "dpo", False, empty)
    assert layout == "packed" and "pair 2 (a:3) has an empty prompt" in why
    assert resolve_pair_layout("auto", "dpo", True, full) == ("packed", "remat is on (the cascade path keeps its "
                                                                       "activations)")
    assert resolve_pair_layout("auto", "rm", False, full)[0] == "packed"
    assert resolve_pair_layout("separate", "dpo", False, full) == ("separate", "as configured")
