"""The `prs-jax` console script: --help, info on a fixture checkpoint, the quickstart (smoke size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prs_jax.cli import build_parser, main, parse_args


def test_help_lists_subcommands(capsys):
    proc = subprocess.run([sys.executable, "-m", "prs_jax.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "info" in proc.stdout and "quickstart" in proc.stdout


def test_overrides_after_options_are_overrides():
    parser = build_parser()
    args = parse_args(parser, ["world", "build", "--preset", "smoke", "sft_steps=10", "policy.hidden_size=64"])
    assert args.preset == "smoke" and args.overrides == ["sft_steps=10", "policy.hidden_size=64"]
    args = parse_args(parser, ["world", "build", "rm_steps=2", "--force", "sft_steps=3"])
    assert args.force and args.overrides == ["rm_steps=2", "sft_steps=3"]
    args = parse_args(parser, ["experiment", "scaling", "cfg.yaml", "seed=1"])
    assert args.overrides == ["seed=1"] and not args.report
    args = parse_args(parser, ["experiment", "reward_vs_n", "cfg.yaml", "--report", "seed=1", "prompts=4"])
    assert args.report and args.overrides == ["seed=1", "prompts=4"]
    with pytest.raises(SystemExit):
        parse_args(parser, ["world", "build", "--preset", "smoke", "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse_args(parser, ["info", "ckpt", "stray"])  # info takes no overrides


def test_info_on_fixture_checkpoint(llama_dir, make_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["info", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "parameters" in out and "float32" in out and "chat template: yes" in out
    rm = make_checkpoint("gpt_neox", task="reward")
    assert main(["info", str(rm)]) == 0
    assert "reward model" in capsys.readouterr().out


def test_info_error_is_reported(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_quickstart_smoke(tmp_path):
    """The main job at smoke size: builds the smoke world (tokenizer, SFT policy, proxy RM), compares the methods,
    writes results + plot; a second run reuses the cached world and reproduces the table exactly."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "prs_jax.cli", "quickstart", "--smoke", "--out", str(tmp_path / "q"),
           "--world-root", str(tmp_path / "world")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "q" / "results-smoke.json").read_text())
    assert (tmp_path / "q" / "reward_vs_n-smoke.png").stat().st_size > 1000
    assert set(result["rows"]) == {"1", "2", "4"}
    for row in result["rows"].values():
        for m in ("rand", "prand", "prs"):
            assert 0.0 <= row[m]["gold"] <= 1.0 and 0.0 <= row[m]["teacher"] <= 1.0
            assert row[m]["ci"][0] <= row[m]["gold"] <= row[m]["ci"][1]
        for eff in ("prs-prand", "prs-rand"):
            assert row[eff]["ci"][0] <= row[eff]["effect"] <= row[eff]["ci"][1] and "teacher" in row[eff]
    assert result["rows"]["1"]["prs-prand"]["effect"] == 0.0  # N = 1: PRS is PRand's first sample (paired)
    assert result["git_commit"] is None or len(result["git_commit"]) == 40
    assert result["world"]["gates"] and {"gate", "value", "target", "passed"} <= set(result["world"]["gates"][0])
    assert "PRS - PRand" in proc.stdout and "skill gates" in proc.stdout
    world = Path(result["world"]["root"])
    assert (world / "policy" / "config.json").is_file() and (world / "rm" / "config.json").is_file()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the cached build" in proc.stdout
    again = json.loads((tmp_path / "q" / "results-smoke.json").read_text())
    assert again["rows"] == result["rows"]
    # the per-prompt records pool over world seeds without measuring (here one world's records relabelled as
    # three seeds): per-seed and pooled CIs, the declared control and a verdict per claim
    records = json.loads((tmp_path / "q" / "records-smoke.json").read_text())
    assert len(records["prompt_ids"]) == len(records["policy"]["prs"]["4"]["proxy"])
    dirs = []
    for s in (0, 1, 2):
        d = tmp_path / f"seed{s}"
        d.mkdir()
        (d / "records.json").write_text(json.dumps({**records, "world": {**records["world"], "seed": s}}))
        dirs.append(str(d))
    assert main(["quickstart", "--pool", ",".join(dirs), "--out", str(tmp_path / "pooled")]) == 0
    pooled = json.loads((tmp_path / "pooled" / "pooled.json").read_text())
    assert pooled["seeds"] == [0, 1, 2] and len(pooled["results"]) == 4
    verdicts = {r["endpoint"]["name"]: r["verdict"] for r in pooled["results"]}
    assert verdicts["teacher prs-prand@4"] in ("control passed", "control failed")
    assert set(verdicts.values()) <= {"control passed", "control failed", "reproduced", "not reproduced",
                                      "untestable here"}
    assert "| prs-prand@4 |" in (tmp_path / "pooled" / "pooled.md").read_text()
    assert main(["quickstart", "--pool", ",".join(dirs[:1] * 2), "--out", str(tmp_path / "p2")]) == 1  # one seed twice


def test_sample_command_writes_jsonl(llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there", "id": 1}\n\n{"messages": [{"role": "user", "content": "Hi"}]}\n'
                       '{"prompt": "Third"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["sample", str(llama_dir), str(prompts), "--out", str(out), "--n", "3", "--max-new-tokens", "5",
                 "--top-p", "0.9", "--batch-size", "2", "--seed", "7"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["id"] == 1
    assert all(len(r["completions"]) == 3 for r in rows)
    assert all(1 <= c["num_tokens"] <= 5 and c["finish_reason"] in ("eos", "length", "stop")
               for r in rows for c in r["completions"])


def test_sample_yaml_overrides_and_flags_are_one_config(llama_dir, tmp_path):
    """`sample` takes a YAML run config plus dotted overrides like every command; its flags and the CKPT PROMPTS
    positionals are shortcuts for the same keys, so the three spellings write the same bytes."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello there", "id": 1}\n{"prompt": "Third"}\n')
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"checkpoint: {llama_dir}\nprompts: {prompts}\nn: 2\nmax_new_tokens: 4\nseed: 3\n"
                   "sampling:\n  top_p: 0.5\n  temperature: 2.0\n")
    outs = [tmp_path / f"o{i}.jsonl" for i in range(3)]
    assert main(["sample", str(cfg), f"out={outs[0]}", "sampling.temperature=0.7", "stop=[zz]"]) == 0
    assert main(["sample", str(llama_dir), str(prompts), "--out", str(outs[1]), "--n", "2", "--max-new-tokens",
                 "4", "--seed", "3", "--top-p", "0.5", "--temperature", "0.7", "--stop", "zz"]) == 0
    # flags override the YAML file's keys (the file says temperature 2.0)
    assert main(["sample", str(cfg), "--out", str(outs[2]), "--temperature", "0.7", "--stop", "zz"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    written = json.loads(outs[0].with_name("o0.jsonl.config.json").read_text())
    assert written["sampling"] == {**written["sampling"], "temperature": 0.7, "top_p": 0.5}
    assert written["n"] == 2 and written["stop"] == ["zz"] and written["chat"] is True


def test_sample_command_bad_file(llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    assert main(["sample", str(llama_dir), str(bad), "--out", str(tmp_path / "o.jsonl")]) == 1
    assert "bad.jsonl:2: each row needs a 'prompt'" in capsys.readouterr().err
