"""The one study environment (prs_jax.experiments.env): a world source resolves policy / proxy RM / gold / prompts,
a real source names the key it misses, and the engine factory (the studies' only one) gives the bucket floors."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from prs_jax.errors import ConfigError
from prs_jax.experiments.common import RealSpec, Source, WorldSpec
from prs_jax.experiments.env import ENGINE_FLOORS, SourceError, StudyEnv, engine_config

EXPERIMENTS = Path(__file__).resolve().parents[2] / "prs_jax" / "experiments"


def test_world_source_resolves_everything(smoke_world_root, smoke_world):
    from prs_jax.world.corpus import QUALITY_INSTRUCTION, world_templates, world_vs_templates
    from prs_jax.world.task import gold_reward

    env = StudyEnv.from_source(Source(world=WorldSpec(preset="smoke", root=str(smoke_world_root))))
    assert env.kind == "world" and env.world.root == smoke_world.root
    assert env.policy == smoke_world.policy and env.reward_model == smoke_world.reward_model
    assert env.gold is gold_reward and env.gold_scorer() is not None
    assert env.templates == world_templates() and env.vs_templates == world_vs_templates()
    assert env.quality_instruction == QUALITY_INSTRUCTION and env.dtype == "float32"
    rows = smoke_world.heldout()
    assert [it.id for it in env.heldout(3)] == [r["id"] for r in rows[:3]]
    assert env.heldout(3)[0].preference == rows[0]["preference"]
    with pytest.raises(ValueError, match="heldout_prompts"):
        env.heldout(len(rows) + 1)
    assert len(env.heldout(len(rows) + 1, strict=False)) == len(rows)
    train, held = env.split(4, 2)
    assert len(train) == 4 and [it.id for it in held] == [r["id"] for r in rows[:2]]
    assert not {it.id for it in train} & {r["id"] for r in rows}
    with pytest.raises(ValueError, match="train_prompts / heldout_prompts"):
        env.split(10 ** 6, 1)
    # the proxy RM reads its own tokenizer: in the world that is the policy's, so scores match the policy's view
    text = "Name three fruits."
    assert env.rm_tokenizer.encode(text) == env.tokenizer.encode(text)
    scores = env.proxy([held[0].prompt] * 2, ["apple, pear, plum", "x"], [held[0].preference] * 2)
    assert np.all(np.isfinite(np.asarray(scores, float)))
    assert env.proxy is env.proxy and env.proxy.include_preference  # loaded once; the world RM sees z
    assert env.param_count() > 0 and env.info["world_root"] == str(smoke_world.root)
    eng = env.engine(3)
    assert eng.model is env.model and {k: getattr(eng.config, k) for k in ENGINE_FLOORS} == ENGINE_FLOORS


def test_real_source_names_the_missing_key(tmp_path):
    with pytest.raises(SourceError, match=r"source\.real\.reward_model") as e:
        StudyEnv.from_source(Source(kind="real", real=RealSpec(policy="/ckpt/p")), study="demo")
    assert "source.real.policy" not in str(e.value) and str(e.value).startswith("demo:")
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)  # CLI exit 2; old callers' catch
    with pytest.raises(SourceError, match=r"source\.real\.policy .*; source\.real\.prompts_path"):
        StudyEnv.from_source(Source(kind="real"), require=("policy", "prompts_path"))
    env = StudyEnv.from_source(Source(kind="real", real=RealSpec(policy=str(tmp_path / "absent"), reward_model="/r")))
    assert env.kind == "real" and env.gold is None and env.gold_scorer() is None and env.dtype == "bfloat16"
    with pytest.raises(FileNotFoundError, match=r"source\.real\.policy: .*absent"):
        env.tokenizer
    with pytest.raises(SourceError, match=r"source\.real\.prompts_path"):
        env.real_prompts()
    with pytest.raises(SourceError, match="held-out prompts"):
        env.heldout(1)
    with pytest.raises(SourceError, match="labelers"):
        env.labelers()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(5)))
    real = RealSpec(policy="/p", reward_model="/r", prompt_set="generic", prompts_path=str(prompts), max_prompts=4)
    env = StudyEnv.from_source(Source(kind="real", real=real), reward_model="/other", dtype="float32")
    assert env.reward_model == Path("/other") and env.dtype == "float32"
    assert [it.prompt for it in env.real_prompts()] == ["q0", "q1", "q2", "q3"]
    train, held = env.split(2, 1)
    assert [it.prompt for it in train] == ["q0", "q1"] and [it.prompt for it in held] == ["q3"]
    with pytest.raises(ValueError, match="fewer than"):
        env.split(4, 1)


def test_engine_factory_has_the_bucket_floors(llama_dir):
    cfg = engine_config()
    assert (cfg.min_prefix_bucket, cfg.min_new_tokens_bucket, cfg.min_extend_bucket) == (64, 32, 32)
    env = StudyEnv("real", llama_dir, None, engine_options={"min_groups_bucket": 4, "min_rows_bucket": 2})
    eng = env.engine(7)
    c = eng.config
    assert (c.min_prefix_bucket, c.min_new_tokens_bucket, c.min_extend_bucket) == (64, 32, 32)
    assert (c.min_groups_bucket, c.min_rows_bucket) == (4, 2)
    other = env.load_policy()
    assert env.engine(7, model=other).model is other


def test_one_engine_factory():
    """No study builds a TreeEngine / EngineConfig or spells a bucket floor itself; the sampling studies go
    through StudyEnv.engine (directly or via policy_tools.run_chunked)."""
    for path in sorted(EXPERIMENTS.glob("*.py")):
        if path.name == "env.py":
            continue
        src = path.read_text()
        names = {n.id for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Name)}
        names |= {a.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & {"TreeEngine", "EngineConfig"}, path.name
        assert "min_prefix_bucket" not in src and "build_world_from(cfg.source" not in src, path.name
        assert "def _engine" not in src and "def _world_setting" not in src, path.name
    for name in ("reward_vs_n", "rlaif", "verbalized", "policy_tools"):
        assert "env.engine(" in (EXPERIMENTS / f"{name}.py").read_text(), name
    for name in ("offline_rl", "sr_dpo"):
        assert "run_chunked(env," in (EXPERIMENTS / f"{name}.py").read_text(), name
