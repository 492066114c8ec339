"""Output locks (a second writer fails at once naming the holder's pid; a killed holder frees the lock), config
stamps (a resume with another row-determining config is refused naming the keys) and the restartable-JSONL
readers (torn last line cut, a broken line inside named by file and line, non-UTF-8 bytes by their line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prs_jax.data.io import done_ids, iter_rows
from prs_jax.data.lock import OutputLock, check_output_file, lock_path, output_lock
from prs_jax.data.stamp import check_stamp, config_hash, diff_keys, read_stamp, stamp_path
from prs_jax.errors import DataError, LockError, StampError


def test_second_writer_fails_at_once_and_release_frees(tmp_path):
    out = tmp_path / "out.jsonl"
    with output_lock(out) as lock:
        assert lock.held and lock_path(out).read_text().strip() == str(os.getpid())
        start = time.perf_counter()
        with pytest.raises(LockError, match=rf"another run is writing {out} \(pid {os.getpid()}\)"):
            OutputLock(out).acquire()
        assert time.perf_counter() - start < 1.0  # fails at once, does not wait
    OutputLock(out).acquire().release()  # released on exit


def test_directory_lock_lives_inside_the_directory(tmp_path):
    (tmp_path / "run").mkdir()
    assert lock_path(tmp_path / "run") == tmp_path / "run" / ".lock"
    with output_lock(tmp_path / "run"):
        with pytest.raises(LockError):
            OutputLock(tmp_path / "run").acquire()


def test_lock_of_a_killed_process_is_free(tmp_path):
    out = tmp_path / "out.jsonl"
    code = ("import sys, time; from prs_jax.data.lock import OutputLock; lock = OutputLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=rf"\(pid {proc.pid}\)"):
            OutputLock(out).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    OutputLock(out).acquire().release()  # the kernel released the dead holder's lock


def test_check_output_file(tmp_path):
    assert check_output_file(tmp_path / "new" / "dir" / "o.jsonl").parent.is_dir()
    with pytest.raises(DataError, match="is a directory"):
        check_output_file(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="is a file, not a directory"):
        check_output_file(tmp_path / "f" / "o.jsonl")


def test_stamp_refuses_another_config_naming_keys(tmp_path):
    out = tmp_path / "o.jsonl"
    cfg = {"policy": "p", "seed": 0, "strategy": {"name": "prs", "n": 4}, "scorer": {"reward_model": "rm"}}
    check_stamp(stamp_path(out), cfg, resuming=False, what=str(out))  # fresh: written
    assert read_stamp(stamp_path(out))["stamp"] == config_hash(cfg)
    check_stamp(stamp_path(out), dict(cfg), resuming=True, what=str(out))  # same config: resumes
    other = {**cfg, "seed": 1, "strategy": {"name": "rand", "n": 2}}
    with pytest.raises(StampError, match=r"differing keys: seed, strategy.n, strategy.name \(seed: 0 -> 1"):
        check_stamp(stamp_path(out), other, resuming=True, what=str(out))
    assert read_stamp(stamp_path(out))["config"] == cfg  # the refused run did not overwrite the stamp
    check_stamp(stamp_path(out), other, resuming=False, what=str(out))  # no rows yet: a fresh start restamps
    assert read_stamp(stamp_path(out))["config"] == other


def test_output_without_stamp_is_stamped_on_resume(tmp_path):
    out = tmp_path / "old.jsonl"
    check_stamp(stamp_path(out), {"a": 1}, resuming=True, what=str(out))
    assert read_stamp(stamp_path(out))["config"] == {"a": 1}


def test_diff_keys():
    assert diff_keys({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3]}}) == ["a.c"]
    assert diff_keys({"a": 1}, {"a": 1, "b": None}) == ["b"]
    assert diff_keys({"x": (1, 2)}, {"x": [1, 2]}) == []


def test_done_ids_cuts_a_torn_last_line_and_names_a_broken_one(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": 1}\n{"id": "b"}\n{"id": "c", "x": ')
    assert done_ids(out) == {"1", "b"}
    assert out.read_text() == '{"id": 1}\n{"id": "b"}\n'
    out.write_text('{"id": 1}\n\n{"id": 2, oops}\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"o.jsonl:3: invalid JSON.*written by two runs"):
        done_ids(out)
    out.write_text('{"id": 1}\n{"no_id": 2}\n')
    with pytest.raises(DataError, match="o.jsonl:2: a row of a restartable output needs an 'id'"):
        done_ids(out)


def test_non_utf8_byte_is_reported_on_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n' * 29 + b'{"prompt": "caf\xe9"}\n' + b'{"prompt": "ok"}\n' * 5)
    with pytest.raises(DataError, match=r"p.jsonl:30: not UTF-8"):
        list(iter_rows(path))
    arr = tmp_path / "a.json"
    arr.write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "\xff"}\n]\n')
    with pytest.raises(DataError, match=r"a.json:3: not UTF-8"):
        list(iter_rows(arr))
    ok = tmp_path / "u.jsonl"
    ok.write_text(json.dumps({"prompt": "café ☕"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r.data["prompt"] for r in iter_rows(ok)] == ["café ☕"]
