"""Position-stable randomness end to end: `sample` and `generate` give byte-identical rows for batch sizes
1, 5 and 16, and a `generate` run interrupted after some rows and then resumed equals an uninterrupted run
byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prs_jax.cli import main
import prs_jax.strategies.generate as generate_mod

QUESTIONS = ["Describe a sunrise.", "How do I boil an egg?", "What is a prime number?", "Name three colours.",
             "Why is the sky blue?", "Write a haiku about rain.", "Describe a sunrise.", "Give me a tip.",
             "What is two plus two?", "Tell me about cats.", "How far is the moon?"]


@pytest.fixture(scope="module")
def ckpts(make_checkpoint):
    return make_checkpoint("llama", max_position_embeddings=2048), make_checkpoint("llama", task="reward")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    # prompt 6 repeats prompt 0's text under another id: it must still get its own samples
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, **({"preference": "Be brief."} if i % 3 == 0
                                                                        else {})}) + "\n"
                            for i, q in enumerate(QUESTIONS)))
    return path


def _generate(ckpts, prompts, out, *extra) -> int:
    policy, rm = ckpts
    return main(["generate", f"policy={policy}", f"prompts={prompts}", f"out={out}", f"scorer.reward_model={rm}",
                 "scorer.formatter=template", "strategy.n=4", "strategy.max_new_tokens=6",
                 "strategy.feedback_max_new_tokens=4", "strategy.temperature=1.5", "seed=3", *extra])


@pytest.mark.parametrize("strategy", [["with_tree=true"], ["strategy.mode=template", "strategy.depth=3"],
                                      ["strategy.name=vs", "strategy.vs_method=vs_multi", "strategy.k=2"]],
                         ids=["prs-conversation", "prs-template", "vs-multi"])
def test_generate_rows_do_not_depend_on_batch_size(ckpts, prompts, tmp_path, strategy):
    texts = {}
    for b in (1, 5, 16):
        out = tmp_path / f"b{b}.jsonl"
        assert _generate(ckpts, prompts, out, f"batch_size={b}", *strategy) == 0
        texts[b] = out.read_bytes()
    rows = [json.loads(x) for x in texts[16].decode().splitlines()]
    assert len(rows) == len(QUESTIONS)
    assert rows[0]["candidates"] != rows[6]["candidates"]  # same text, another id: other samples
    assert texts[1] == texts[5] == texts[16]


def test_generate_interrupted_and_resumed_equals_uninterrupted(ckpts, prompts, tmp_path, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    assert _generate(ckpts, prompts, whole, "batch_size=4", "with_tree=true") == 0

    out = tmp_path / "resumed.jsonl"
    real_append, calls = generate_mod.append_rows, []

    def append_then_die(path, rows):  # the process dies after its second batch is written
        real_append(path, rows)
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(generate_mod, "append_rows", append_then_die)
    assert _generate(ckpts, prompts, out, "batch_size=3", "with_tree=true") == 130  # the CLI's "interrupted"
    monkeypatch.setattr(generate_mod, "append_rows", real_append)
    assert 0 < len(out.read_text().splitlines()) < len(QUESTIONS)
    assert _generate(ckpts, prompts, out, "batch_size=5", "with_tree=true") == 0  # resumed with another batch size
    assert out.read_bytes() == whole.read_bytes()


def test_sample_rows_do_not_depend_on_batch_size(ckpts, prompts, tmp_path):
    policy, _ = ckpts
    texts = []
    for b in (1, 5, 16):
        out = tmp_path / f"s{b}.jsonl"
        assert main(["sample", str(policy), str(prompts), "--out", str(out), "--n", "3", "--max-new-tokens", "6",
                     "--temperature", "1.5", "--seed", "5", "--batch-size", str(b)]) == 0
        texts.append(out.read_bytes())
    rows = [json.loads(x) for x in texts[0].decode().splitlines()]
    assert rows[0]["completions"] != rows[6]["completions"]
    assert texts[0] == texts[1] == texts[2]
