"""The `prs-jax` console script: --help, info on a fixture checkpoint, the quickstart (smoke size)."""

from __future__ import annotations

import json
import os
import shutil
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


def test_quickstart_smoke(smoke_world_root, tmp_path):
    """The main job at smoke size (reward_vs_n's quickstart preset) on the session's smoke world (the CLI's world
    build is tested in tests/world): compares the methods paired, writes results + records + plots; a second
    process reproduces the results exactly; --pool pools per-seed runs under the declared protocol."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "prs_jax.cli", "quickstart", "--smoke", "--out", str(out),
           "--world-root", str(smoke_world_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    for png in ("reward_vs_n.png", "effects.png"):
        assert (out / png).stat().st_size > 1000
    res = saved["results"]
    assert set(res["methods"]) == {"Rand", "PRand", "PRS"} and res["prompts"] == 4
    assert set(res["methods"]["Rand"]) == {"1", "2", "4"} and set(res["methods"]["PRS"]) == {"2", "4"}
    for rows in res["methods"].values():
        for row in rows.values():
            assert 0.0 <= row["gold"] <= row["oracle_gold"] <= 1.0 and 0.0 <= row["teacher_gold"] <= 1.0
    effects = {(e["a"], e["b"], e["n"]): e for e in res["effects"]}
    assert set(effects) >= {("PRS", "PRand", 4), ("PRS", "Rand", 2), ("PRand", "Rand", 1)}
    for e in effects.values():
        assert e["low"] <= e["effect"] <= e["high"] and "teacher" in e
    verdicts = {v["endpoint"]["name"]: v["verdict"] for v in res["protocol"]}
    assert verdicts["teacher:PRS:PRand@4"] in ("control passed", "control failed")
    assert saved["git_commit"] is None or len(saved["git_commit"]) == 40
    assert res["world"]["gates"] and {"gate", "value", "target", "passed"} <= set(res["world"]["gates"][0])
    assert "PRS - PRand" in proc.stdout and "skill gates" in proc.stdout
    world = Path(res["world"]["root"])
    assert (world / "policy" / "config.json").is_file() and (world / "rm" / "config.json").is_file()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the cached build" in proc.stdout
    again = json.loads((out / "results.json").read_text())["results"]
    for key in ("methods", "effects", "protocol", "distribution_at_max_n"):  # timings differ, the science not
        assert again[key] == res[key], key
    # the per-prompt records pool over world seeds without measuring (here one world's records relabelled as
    # three seeds): per-seed and pooled CIs, the declared controls and a verdict per claim
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sum(r["method"] == "teacher" for r in records) == 4
    facts = json.loads((out / "measure.json").read_text())
    dirs = []
    for s in (0, 1, 2):
        d = tmp_path / f"seed{s}"
        d.mkdir()
        shutil.copyfile(out / "records.jsonl", d / "records.jsonl")
        cfg = {**facts["config"], "source": {**facts["config"]["source"],
                                             "world": {**facts["config"]["source"]["world"], "seed": s}}}
        (d / "measure.json").write_text(json.dumps({**facts, "config": cfg, "world_seed": s}))
        dirs.append(str(d))
    assert main(["quickstart", "--pool", ",".join(dirs), "--out", str(tmp_path / "pooled")]) == 0
    pooled = json.loads((tmp_path / "pooled" / "results.json").read_text())["results"]
    assert pooled["world_seeds"] == [0, 1, 2] and len(pooled["protocol"]) == 4
    row = next(v for v in pooled["protocol"] if v["endpoint"]["name"] == "gold:PRS:PRand@4")
    assert set(row["per_seed"]) == {"0", "1", "2"} and row["units"] == 12
    assert set(v["verdict"] for v in pooled["protocol"]) <= {"control passed", "control failed", "reproduced",
                                                             "not reproduced", "untestable here"}
    assert "| gold:PRS:PRand@4 |" in (tmp_path / "pooled" / "results.md").read_text()
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
