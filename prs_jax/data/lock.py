"""Exclusive locks on restartable outputs and run directories, so two runs never write the same rows.

    with output_lock(out):       # out: an output file, or a run directory
        ...append rows...

The lock is an `fcntl.flock` on a sidecar file (`OUT.lock` next to a file, `DIR/.lock` inside a directory) that
holds the writer's pid. The kernel releases it when the holder exits, even on a kill, so a stale lock file never
blocks a later run; a second writer fails at once with "another run is writing OUT (pid N)".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from prs_jax.errors import DataError, LockError

__all__ = ["OutputLock", "output_lock", "lock_path", "check_output_file"]


def lock_path(target: str | Path) -> Path:
    """The sidecar lock file of an output file or run directory."""
    target = Path(target)
    return target / ".lock" if target.is_dir() else target.with_name(target.name + ".lock")


def check_output_file(path: str | Path) -> Path:
    """Check that `path` can be an output file (not a directory; its directory creatable and writable)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; the output must be a file path (e.g. {path / 'out.jsonl'}).")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DataError(f"{parent}: is a file, not a directory; choose an output path in a directory.") from None
    except OSError as e:
        raise DataError(f"{parent}: cannot create the output directory ({e.strerror}); choose another path.") \
            from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"{parent}: the output directory is not writable; choose another path or fix its "
                        "permissions.")
    if path.exists() and not os.access(path, os.W_OK):
        raise DataError(f"{path}: the output file is not writable; choose another path or fix its permissions.")
    return path


class OutputLock:
    """An exclusive, non-blocking flock on `target`'s sidecar lock file; `acquire` / `release` or `with`."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> OutputLock:
        """Take the lock or raise LockError naming the holder's pid."""
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"{self.path}: cannot create the lock file of {self.target} ({e.strerror}); check "
                            "that its directory exists and is writable.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise LockError(f"another run is writing {self.target} (pid {pid}); wait for it to finish, stop it, "
                            "or write to another output.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the lock file stays: removing it could let two runs lock different files)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


@contextlib.contextmanager
def output_lock(target: str | Path) -> Iterator[OutputLock]:
    """Hold the exclusive lock of an output file or run directory for the `with` block."""
    lock = OutputLock(target).acquire()
    try:
        yield lock
    finally:
        lock.release()
