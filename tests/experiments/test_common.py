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
