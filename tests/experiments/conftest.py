"""A smoke-size synthetic world, built once per test session and shared by every study's smoke test."""

from pathlib import Path

import pytest

from prs_jax.experiments.common import WorldSpec, build_world_from


@pytest.fixture(scope="session")
def smoke_world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root directory holding the built smoke world; pass it as `source.world.root` with preset "smoke"."""
    root = tmp_path_factory.mktemp("worlds")
    build_world_from(WorldSpec(preset="smoke", root=str(root)))
    return root


@pytest.fixture(scope="session")
def smoke_world(smoke_world_root: Path):
    """The BuiltWorld of the smoke preset (policy, reward model, tokenizer, held-out prompts)."""
    return build_world_from(WorldSpec(preset="smoke", root=str(smoke_world_root)))
