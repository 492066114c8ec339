"""Record metadata: a result says whether it came from a tree with uncommitted changes."""

import subprocess

from prs_jax.experiments.common import git_dirty


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_git_dirty_ignores_the_study_output(tmp_path):
    repo = tmp_path / "repo"
    (repo / "results" / "study").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "results" / "study" / "results.md").write_text("old\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    assert git_dirty(repo=repo) is False
    (repo / "results" / "study" / "results.md").write_text("new\n")  # the study rewrote its own output
    assert git_dirty(exclude=repo / "results" / "study", repo=repo) is False
    assert git_dirty(repo=repo) is True
    (repo / "code.py").write_text("x = 2\n")  # the code changed: the commit no longer describes the run
    assert git_dirty(exclude=repo / "results" / "study", repo=repo) is True
    (repo / "untracked.txt").write_text("scratch\n")
    _git(repo, "checkout", "-q", "code.py")
    assert git_dirty(exclude=repo / "results" / "study", repo=repo) is False  # untracked files do not count
    _git(repo, "checkout", "-q", "results")
    assert git_dirty(exclude=tmp_path / "elsewhere", repo=repo) is False  # an output dir outside the tree
    (repo / "code.py").write_text("x = 3\n")
    assert git_dirty(exclude=tmp_path / "elsewhere", repo=repo) is True
    assert git_dirty(repo=tmp_path / "not-a-repo") is None


def test_pool_measured_matches_configs_and_pools_one_out_per_seed(tmp_path):
    import json

    import pytest

    from prs_jax.experiments.common import pool_measured

    def measured(d, seed, work="w0", lr=0.1):
        d.mkdir()
        cfg = {"source": {"world": {"seed": seed}}, "sub": {"work_dir": work, "lr": lr}}
        (d / "measure.json").write_text(json.dumps({"config": cfg, "world_seed": seed}))
        (d / "records.jsonl").write_text(json.dumps({"id": seed}) + "\n")
        return cfg

    cfg0 = measured(tmp_path / "s0", 0)
    measured(tmp_path / "s1", 1, work="w1")
    facts, recs = pool_measured(tmp_path / "s0", [str(tmp_path / "s1")], cfg0, "x",
                                pool_free=("source.world.seed", "sub.work_dir"))
    assert list(facts) == [0, 1] and recs[1] == [{"id": 1}]
    # the report's own config must match out_dir's measurement, apart from `ignore` (e.g. a cache directory)
    other_work = {**cfg0, "sub": {"work_dir": "elsewhere", "lr": 0.1}}
    with pytest.raises(ValueError, match="keys sub differ"):
        pool_measured(tmp_path / "s0", [], other_work, "x")
    assert list(pool_measured(tmp_path / "s0", [], other_work, "x", ignore=("sub.work_dir",))[0]) == [0]
    measured(tmp_path / "s2", 2, lr=0.2)  # a setting that decides the records
    with pytest.raises(ValueError, match="another study config"):
        pool_measured(tmp_path / "s0", [str(tmp_path / "s2")], cfg0, "x", pool_free=("source.world.seed",
                                                                                      "sub.work_dir"))
    with pytest.raises(ValueError, match="already pooled"):
        pool_measured(tmp_path / "s0", [str(tmp_path / "s1"), str(tmp_path / "s1")], cfg0, "x",
                      pool_free=("source.world.seed", "sub.work_dir"))
