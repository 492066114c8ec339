"""Logical-axis rules in MeshConfig: defaults, config-file overrides merged per name, errors naming the key, and
the rules scoped to a MeshContext (nothing leaks out of it, even on an exception)."""

from __future__ import annotations

import jax
import pytest

from prs_jax.config import apply_overrides, from_dict
from prs_jax.errors import ConfigError
from prs_jax.models.sharding import DEFAULT_RULES, MeshConfig, MeshContext, current_rules, frozen_rules, use_rules
from prs_jax.train.trainer import TrainerConfig


def test_rules_default_and_config_override():
    assert MeshConfig().rules == DEFAULT_RULES
    cfg = from_dict(TrainerConfig, apply_overrides({}, ["mesh.rules.batch=[data]", "mesh.rules.mlp=[]",
                                                        "mesh.tensor=1"]))
    rules = cfg.mesh.rules
    assert rules["batch"] == ("data",) and rules["mlp"] == ()
    assert rules["embed"] == DEFAULT_RULES["embed"] and rules["vocab"] == DEFAULT_RULES["vocab"]  # others kept
    assert hash(cfg.mesh) == hash(MeshConfig(tensor=1))  # still hashable (rules do not enter the hash)
    assert cfg.mesh != MeshConfig(tensor=1)


def test_rules_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"mesh\.rules\.batch: unknown mesh axis 'dp'"):
        MeshConfig(rules={"batch": ["dp"]})
    with pytest.raises(ConfigError, match=r"mesh\.rules\.mlp: .* repeat"):
        MeshConfig(rules={"mlp": ["tensor", "tensor"]})


def test_rules_scoped_to_the_context():
    assert current_rules() == DEFAULT_RULES
    ctx = MeshContext(MeshConfig(fsdp=1).make_mesh(jax.devices()[:1]), MeshConfig(rules={"batch": ["data"]}).rules)
    with ctx.activate():
        assert current_rules()["batch"] == ("data",)
        assert not jax.sharding.get_abstract_mesh().empty
        with use_rules(frozen_rules({"batch": ()})):
            assert current_rules() == {"batch": ()}
        assert current_rules()["batch"] == ("data",)
    assert current_rules() == DEFAULT_RULES and jax.sharding.get_abstract_mesh().empty
    with pytest.raises(RuntimeError):
        with ctx.activate():
            raise RuntimeError("boom")
    assert current_rules() == DEFAULT_RULES and jax.sharding.get_abstract_mesh().empty
