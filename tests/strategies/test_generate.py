"""`prs-jax generate`: end to end with a reward-model scorer, kill-and-restart without loss or duplicates,
and two local processes under jax.distributed (CPU, loopback) with a merge."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prs_jax.cli import main

PROMPTS = Path(__file__).resolve().parents[2] / "experiments" / "data" / "tiny_prompts.jsonl"


@pytest.fixture(scope="module")
def ckpts(make_checkpoint):
    return make_checkpoint("llama", max_position_embeddings=2048), make_checkpoint("llama", task="reward")


def _args(policy, rm, out, *extra):
    return [f"policy={policy}", f"prompts={PROMPTS}", f"out={out}", f"scorer.reward_model={rm}",
            "scorer.formatter=template", "strategy.n=4", "strategy.max_new_tokens=6",
            "strategy.feedback_max_new_tokens=4", "batch_size=2", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_generate_prs_end_to_end(ckpts, tmp_path):
    policy, rm = ckpts
    out = tmp_path / "prs.jsonl"
    assert main(["generate", *_args(policy, rm, out, "with_tree=true")]) == 0
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(6)]
    for r in rows:
        assert len(r["candidates"]) == 4 and {c["layer"] for c in r["candidates"]} == {0, 1}
        assert r["reward"] == max(c["reward"] for c in r["candidates"])
        assert r["tree"][0]["children"]
    out2 = tmp_path / "rand.jsonl"
    assert main(["generate", *_args(policy, rm, out2, "strategy.name=rand")]) == 0
    assert all(len(r["candidates"]) == 4 for r in _rows(out2))
    out3 = tmp_path / "vs.jsonl"  # random weights: nothing parses, so the raw generations are the candidates
    assert main(["generate", *_args(policy, rm, out3, "strategy.name=vs", "strategy.vs_method=direct",
                                    "max_prompts=2")]) == 0
    rows = _rows(out3)
    assert len(rows) == 2 and all(len(r["candidates"]) == 4 for r in rows)


def test_kill_and_restart_loses_and_duplicates_nothing(ckpts, tmp_path):
    policy, rm = ckpts
    out = tmp_path / "run.jsonl"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "prs_jax.cli", "generate",
                             *_args(policy, rm, out, "batch_size=1")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = _rows(out)
    assert 2 <= len(written) < 6
    with open(out, "a") as fh:  # a kill in the middle of a write leaves a torn line
        fh.write('{"id": "p5", "prompt": "torn')
    assert main(["generate", *_args(policy, rm, out, "batch_size=1")]) == 0
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(6)]
    assert rows[:len(written)] == written  # what was there is kept as it was


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_distributed_generation(ckpts, tmp_path):
    policy, rm = ckpts
    out = tmp_path / "dist.jsonl"
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "prs_jax.cli", "generate", *_args(policy, rm, out),
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    parts = sorted(tmp_path.glob("dist.part*-of-002.jsonl"))
    assert len(parts) == 2
    ids = [[r["id"] for r in _rows(p)] for p in parts]
    assert ids[0] == ["p0", "p2", "p4"] and ids[1] == ["p1", "p3", "p5"]
    assert [r["id"] for r in _rows(out)] == [f"p{i}" for i in range(6)]  # merged in prompt order
    single = tmp_path / "single.jsonl"  # the process count does not change a row (keys: prompt id and path)
    assert main(["generate", *_args(policy, rm, single)]) == 0
    assert _rows(out) == _rows(single)
