"""One training run per output folder: an exclusive lock on ``OUT/.lock`` held for the run's life.

The lock is an OS file lock (``fcntl.flock``): the kernel releases it when the process ends, even
killed with SIGKILL, so a lock file left by a dead run is taken over (with a message naming the
dead process) and never blocks anyone; a clean exit leaves the file empty. The file holds the owner's pid and host for that message
and for the error a second run gets. Where ``fcntl`` does not exist (Windows) the pid alone is
checked, which is racy but still catches the common case.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """``with RunLock(out):`` holds OUT/.lock; raises RunLocked naming the owner if another run has it.
    ``took_over`` is the pid of a dead run whose lock file was left behind (None otherwise)."""

    def __init__(self, folder: str | Path, name: str = LOCK_NAME, what: str = "training run"):
        self.path = Path(folder) / name
        self.what = what
        self.fd: Optional[int] = None
        self.took_over: Optional[str] = None

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = self._owner()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif previous and _alive(int(previous.split()[0])) and int(previous.split()[0]) != os.getpid():
                raise BlockingIOError
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(f"{self.path.parent} is in use by another {self.what} (process "
                            f"{previous or '?'}); wait for it to finish, or choose another --out") from None
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        if previous and previous.split()[0] != str(os.getpid()):
            self.took_over = previous
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # emptied, not deleted: deleting would let a run that opened the old file and one that
            # creates a new one both hold "the" lock. An empty file means a clean release.
            os.ftruncate(self.fd, 0)
        finally:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def stale_message(lock: RunLock) -> Optional[str]:
    """The note printed when a dead run's lock was taken over (None when there was none)."""
    if lock.took_over is None:
        return None
    return (f"note: took over the lock of an earlier run in {lock.path.parent} (process {lock.took_over}, "
            "no longer running)")


def print_stale(lock: RunLock) -> None:
    msg = stale_message(lock)
    if msg:
        print(msg, file=sys.stderr)
