"""One torpord per directory: an exclusive lock on `<dir>/torpord.lock`, held for the daemon's
life (issue 12, "One daemon per host").

Two torpords on one state directory would serve one catalog and one chunk store; two on one
runtime directory would stop each other's workers and take each other's sockets. So
torpord's start-up (`Daemon._start`) takes both locks before it touches anything else, and a
second daemon is refused with the running one's pid, which the holder writes into the lock
file.

`flock` rather than a pid file: the kernel drops the lock when its holder exits, however it
exits (kill -9 included), so a crash never leaves a stale lock behind, and nothing has to
guess whether a recorded pid is still the daemon. The file itself is never removed: a
process that unlinked it could let a third daemon lock a new file while a second still holds
the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from torpor.errors import FailedPrecondition

LOCK_NAME = "torpord.lock"


class InstanceLock:
    """The exclusive lock of one directory; `acquire` once, `release` at shutdown."""

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what  # "state directory", "runtime directory": for the refusal
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Lock, then write our pid; FailedPrecondition ALREADY_RUNNING if another holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this process")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:  # another user's directory, a directory in the lock's place
            raise FailedPrecondition(
                f"cannot lock the {self.what} {self.path.parent}: {exc.strerror} ({self.path})",
                reason="LOCK_FAILED",
                metadata={"lock": self.path},
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise self._refusal() from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Unlock (idempotent). The pid is cleared first, so a reader never sees ours."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the only descriptor drops the flock

    def _refusal(self) -> FailedPrecondition:
        pid = holder_pid(self.path)
        who = f"pid {pid}" if pid is not None else "pid unknown"
        return FailedPrecondition(
            f"another torpord is already running on the {self.what} {self.path.parent} "
            f"({who}, lock {self.path}); stop it first, or give this one its own state "
            "directory (--state-dir) and runtime directory (TORPOR_DAEMON_RUNTIME_DIR)",
            reason="ALREADY_RUNNING",
            metadata={"pid": pid or "", "lock": self.path},
        )


def holder_pid(path: Path) -> int | None:
    """The pid written in a lock file, or None (unreadable, empty: the holder is starting)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_directories(*dirs: tuple[Path, str]) -> list[InstanceLock]:
    """Lock each distinct directory (`(path, what)`), in order; on a refusal the ones taken
    are released again before it is raised."""
    locks: list[InstanceLock] = []
    seen: set[tuple[int, int]] = set()
    try:
        for directory, what in dirs:
            key = _identity(Path(directory), what)
            if key in seen:  # one directory for both: a second flock would refuse ourselves
                continue
            seen.add(key)
            lock = InstanceLock(directory, what)
            lock.acquire()
            locks.append(lock)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _identity(directory: Path, what: str) -> tuple[int, int]:
    """The directory's (device, inode), made first if need be: two names of one directory
    are one identity."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot lock the {what} {directory}: {exc.strerror}",
            reason="LOCK_FAILED",
            metadata={"lock": directory / LOCK_NAME},
        ) from exc
    return info.st_dev, info.st_ino
