"""Typed YAML configs with dotted overrides: unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

from prs_jax.config import apply_overrides, load_config, to_dict
from prs_jax.errors import ConfigError
from prs_jax.models import MeshConfig


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-5
    schedule: Literal["cosine", "linear"] = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass(frozen=True)
class Run:
    model: Path
    steps: int = 10
    optim: Optim = Optim()
    mesh: MeshConfig = MeshConfig()
    tags: list[str] = dataclasses.field(default_factory=list)
    eval_every: int | None = None


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: /ckpt\noptim:\n  lr: 3e-4\n  betas: [0.8, 0.9]\nmesh: {fsdp: 4, tensor: 2}\n")
    cfg = load_config(Run, f, ["steps=25", "optim.schedule=linear", "tags=[a, b]", "eval_every=5"])
    assert cfg.model == Path("/ckpt") and cfg.steps == 25 and cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.schedule == "linear"
    assert cfg.mesh == MeshConfig(data=1, fsdp=4, tensor=2) and cfg.tags == ["a", "b"] and cfg.eval_every == 5
    assert to_dict(cfg)["model"] == "/ckpt"


def test_defaults_then_file_then_overrides(tmp_path):
    """A preset's dict is the base, the YAML file merges over it section by section, overrides come last."""
    f = tmp_path / "run.yaml"
    f.write_text("steps: 7\noptim:\n  schedule: linear\n")
    base = to_dict(Run(model=Path("/preset"), steps=3, optim=Optim(lr=0.5, schedule="cosine")))
    cfg = load_config(Run, f, [], defaults=base)
    assert cfg.model == Path("/preset") and cfg.steps == 7
    assert cfg.optim == Optim(lr=0.5, schedule="linear")  # the file's section did not drop the preset's lr
    assert load_config(Run, f, ["optim.lr=0.25"], defaults=base).optim == Optim(lr=0.25, schedule="linear")
    assert load_config(Run, None, [], defaults=base).steps == 3


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: /ckpt\noptim:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key\(s\) optim.learning_rate for Optim"):
        load_config(Run, f)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) stepz"):
        load_config(Run, None, ["model=/x", "stepz=3"])


@pytest.mark.parametrize("override,msg", [
    ("steps=ten", r"steps: expected an integer"),
    ("optim.lr=fast", r"optim.lr: expected a number"),
    ("optim.schedule=step", r"optim.schedule: 'step' is not one of"),
    ("optim.betas=[1, 2, 3]", r"optim.betas: expected 2 items"),
    ("optim=3", r"optim: expected a mapping"),
    ("steps", r"expected key=value"),
])
def test_wrong_types(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(Run, None, ["model=/x", override])


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key\(s\) model"):
        load_config(Run, None, [])
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(Run, f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "nope.yaml")


def test_override_into_scalar_is_error():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])
