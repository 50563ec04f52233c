"""File locks that coordinate snapshot writers, garbage collection and scrub on one host.

Chunk files are local to a host, so host-local `flock(2)` locks are enough even when the
catalog is shared. The kernel drops a lock when its holder dies, even by SIGKILL, which is
what lets scrub tell a live writer from a dead one.

- The *store lock* (`locks/store.lock`): writers hold it shared for the few milliseconds
  of one chunk (write the file, then reference it in the catalog); garbage collection,
  eviction and scrub hold it exclusive. So a chunk file is never deleted between being
  found (dedup) and being referenced, and no temp file is live while scrub removes them.
- A *writer lock* (`locks/writers/<snapshot id>.lock`): held exclusive by the process
  writing that snapshot for its whole life. If scrub can take it, the writer is dead.
- A *reader lock* (`locks/readers/<snapshot id>.lock`): held shared by every process
  restoring from that snapshot. Eviction and deletion take it exclusive, without waiting,
  before they delete a snapshot, and skip (or refuse) a snapshot that is being read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from torpor.errors import InvalidArgument
from torpor.store import private


class StoreLocks:
    """The lock files of one chunk store root."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "locks"
        self.writers_dir = self.dir / "writers"
        self.readers_dir = self.dir / "readers"
        private.make_dirs(self.writers_dir)
        private.make_dirs(self.readers_dir)
        self.store_path = self.dir / "store.lock"

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the store lock shared (a writer adding one chunk)."""
        with _flocked(self.store_path, fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store lock exclusive (GC, eviction, scrub): no chunk write is in flight."""
        with _flocked(self.store_path, fcntl.LOCK_EX):
            yield

    def writer_path(self, snapshot_id: str) -> Path:
        """The liveness lock file of the writer of `snapshot_id` (an id the store generated)."""
        return self.writers_dir / f"{check_snapshot_id(snapshot_id)}.lock"

    def reader_path(self, snapshot_id: str) -> Path:
        """The lock file that readers of `snapshot_id` hold shared."""
        return self.readers_dir / f"{check_snapshot_id(snapshot_id)}.lock"

    @contextlib.contextmanager
    def reading(self, snapshot_id: str) -> Iterator[None]:
        """Hold the reader lock of a snapshot shared (waits while it is being deleted)."""
        with _flocked(self.reader_path(snapshot_id), fcntl.LOCK_SH):
            yield

    def try_claim_for_delete(self, snapshot_id: str) -> DeleteClaim | None:
        """Take a snapshot's reader lock exclusive without waiting; None if it is being read.

        Hold the claim until the snapshot's rows are deleted and committed, then `release()`
        it: a reader that arrives meanwhile waits, then finds the snapshot gone.
        """
        path = self.reader_path(snapshot_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, private.PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return DeleteClaim(path, fd)

    def hold_writer(self, snapshot_id: str) -> WriterLock:
        """Create and take the writer lock of a new snapshot; release with `release()`."""
        path = self.writer_path(snapshot_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, private.PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return WriterLock(path, fd)

    def writer_alive(self, snapshot_id: str) -> bool:
        """Whether a live process holds the writer lock of `snapshot_id`.

        A missing lock file means no writer: the file is created before the snapshot row
        and removed only after the row left the `writing` state.
        """
        path = self.writer_path(snapshot_id)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing also drops the lock we may have taken
        return False

    def remove_writer(self, snapshot_id: str) -> None:
        """Remove a dead writer's lock file (after its snapshot row is gone)."""
        self.writer_path(snapshot_id).unlink(missing_ok=True)


def check_snapshot_id(snapshot_id: str) -> str:
    """Snapshot ids are generated by the store (hex); anything else never reaches a path."""
    if (
        not isinstance(snapshot_id, str)
        or not (0 < len(snapshot_id) <= 32)
        or not all(c in "0123456789abcdef" for c in snapshot_id)
    ):
        raise InvalidArgument(f"not a snapshot id: {snapshot_id!r}", reason="INVALID_SNAPSHOT_ID")
    return snapshot_id


class HeldLock:
    """A lock file this process holds until `release()`.

    `release(remove=True)` unlinks the file before dropping the lock, so nobody can take
    the lock of a file that is about to vanish and believe it current. Idempotent.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self, remove: bool = True) -> None:
        if self._fd is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


class WriterLock(HeldLock):
    """A writer's liveness lock; release it only after the row left the `writing` state."""


class DeleteClaim(HeldLock):
    """A reader lock held exclusive by a deleter. Release it after the deletion commits
    (`remove=True`), or with `remove=False` if the snapshot stays."""


@contextlib.contextmanager
def _flocked(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, private.PRIVATE_FILE)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)
