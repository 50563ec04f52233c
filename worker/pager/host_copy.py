"""The weights' retained host copy, made in the background after a load or a disk resume so
that a host-level suspend only unmaps (never copies on the eviction path).

torpord decides whether a runtime keeps one (`keep_host_copy` of Load and Resume: the copy
counts against its host budget). A runtime without one that is suspended to HOST has it made
then, on the eviction path (`make`), and a prefetch from disk fills a new one straight from
the snapshot (`adopt`).

Making it pins as many bytes as the weights (16 GB for an 8B model; seconds of work), and
pinning takes a driver lock that a request's kernel launches would queue behind. So the copy
gives way: before each pinned piece, and before the copy itself, it waits while the runtime
serves (`busy`). A disk-level suspend does not need it and cancels it.

A deep suspend unlocks the copy's pages (`unpin`: the driver's checkpoint costs about 25 ms per
page-locked GB each way) and a deep resume locks them again in the background (`repin`),
giving way the same way.

With a keeper (keeper.py), the copy is made in a memfd and, once made, handed to the keeper,
which keeps it locked in its own process (`kept`); a deep resume then has the keeper `fill`
the arena at DMA speed instead of going through staging buffers. Handing it over runs in the
background and never holds up a suspend; if the keeper is lost, the next `keep` (after a
resume) hands it over again.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from torpor.errors import FailedPrecondition, TorporError
from torpor.log import get_logger
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.host import HostBuffer
from torpor.worker.pager.keeper_client import KeeperClient

GIVE_WAY_POLL_S = 0.005

log = get_logger("pager.host_copy")


class _Cancelled(Exception):
    """Raised inside the background copy when a disk suspend no longer needs it."""


class HostCopy:
    """One runtime's host copy: start it, make it now, adopt one, wait for it, cancel it,
    release it. Thread-safe for one owner (the runtime, under its lock) and the background
    thread it starts."""

    def __init__(self, busy: Callable[[], bool], keeper: KeeperClient | None = None) -> None:
        self.keeper = keeper
        self._names = itertools.count()
        self._kept: tuple[HostBuffer, str] | None = None  # the copy the keeper holds, by name
        self._keep_lock = threading.Lock()
        self._keeping: threading.Thread | None = None
        self.buffer: HostBuffer | None = None
        self._busy = busy
        self._asked = False  # a copy was started, made or adopted, and not released since
        self._done = threading.Event()  # set: no copy under way
        self._done.set()
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._repin_thread: threading.Thread | None = None
        self._repin_stop = threading.Event()

    @property
    def nbytes(self) -> int:
        """Bytes the copy holds (less what an exchange gave back or has not taken yet)."""
        return self.buffer.held_bytes if self.buffer is not None else 0

    def start(self, arena: Arena, nbytes: int) -> None:
        """Pin and fill the first `nbytes` of `arena` in the background."""
        self._begin()
        threading.Thread(
            target=self._make, args=(arena, nbytes), name="host-copy", daemon=True
        ).start()

    def make(self, arena: Arena, nbytes: int) -> HostBuffer | None:
        """Pin and fill the copy now, on this thread (a suspend to HOST of a runtime that
        kept none: the slow pin on the eviction path that torpord prices). The runtime is
        parked, so nothing waits for it to give way."""
        self._begin()
        self._make(arena, nbytes)
        return self.wait()

    def adopt(self, buffer: HostBuffer) -> None:
        """Take `buffer`, already filled, as the copy (a prefetch from disk read the snapshot
        into it); with a keeper, hand it over in the background."""
        self.release()
        self._asked = True
        self.buffer = buffer
        self.keep()

    def partial(self, buffer: HostBuffer) -> None:
        """Take `buffer` as the copy while an exchange fills it (or empties it); it is handed
        to the keeper only once whole (`keep`)."""
        self.release()
        self._asked = True
        self.buffer = buffer

    def unkeep(self) -> None:
        """Have the keeper let go of the copy now (an exchange is about to free its pages,
        which the keeper's lock would otherwise keep in RAM)."""
        with self._keep_lock:
            kept, self._kept = self._kept, None
        if self._keeping is not None:
            self._keeping.join()  # a hand-over under way ends first (then is dropped)
        with self._keep_lock:
            kept, self._kept = self._kept or kept, None
        if kept is not None:
            self._drop(kept[1])

    def _begin(self) -> None:
        self._asked = True
        self._done.clear()
        self._cancel.clear()
        self._error = None

    def _make(self, arena: Arena, nbytes: int) -> None:
        buffer: HostBuffer | None = None
        try:
            buffer = HostBuffer.for_arena(
                arena, nbytes, before_piece=self._give_way, shared=self.keeper is not None
            )
            self._give_way()
            buffer.copy_from(arena)
            self.buffer = buffer
        except _Cancelled:  # a disk suspend does not need it: nothing to report
            if buffer is not None:
                buffer.close()
            self._error = FailedPrecondition(
                "the host copy was cancelled by a disk-level suspend", reason="HOST_COPY_CANCELLED"
            )
        except BaseException as exc:  # reported when a suspend needs it
            self._error = exc
            log.error("host_copy_failed", error=repr(exc))
        finally:
            self._done.set()
        self.keep()  # with a keeper, hand the new copy over (nothing if none was made)

    def _give_way(self, stop: threading.Event | None = None) -> None:
        """Wait while the runtime serves; raise _Cancelled once `stop` (default: the copy's
        cancel) is set."""
        stop = self._cancel if stop is None else stop
        while self._busy() and not stop.is_set():
            time.sleep(GIVE_WAY_POLL_S)
        if stop.is_set():
            raise _Cancelled

    def wait(self) -> HostBuffer | None:
        """The copy, once made (None when none was asked for since the last `release`);
        FailedPrecondition HOST_COPY_FAILED if it could not be made."""
        if not self._asked:
            return None
        self._done.wait()
        if self._error is not None:
            raise FailedPrecondition(
                f"the host copy of the weights could not be made: {self._error!r}",
                reason="HOST_COPY_FAILED",
            )
        return self.buffer

    def settle(self, timeout: float | None = None) -> None:
        """Wait until no copy is under way (made, failed or cancelled): it reads the weights
        arena, which must not be unmapped under it."""
        self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop a copy still being made at its next piece (a disk suspend will not use it)."""
        self._cancel.set()

    # -- the keeper ---------------------------------------------------------------------------

    @property
    def kept(self) -> bool:
        """Whether the keeper holds the current copy, locked, and can `fill` from it."""
        kept = self._kept
        return (
            self.keeper is not None
            and kept is not None
            and kept[0] is self.buffer
            and self.keeper.held(kept[1])
        )

    def keep(self) -> None:
        """Hand the copy to the keeper in the background, unless it holds it already or a
        hand-over is under way (no-op without a keeper)."""
        buffer = self.buffer
        if self.keeper is None or buffer is None or not buffer.whole or self.kept:
            return
        if self._keeping is not None and self._keeping.is_alive():
            return
        self._keeping = threading.Thread(
            target=self._keep, args=(buffer,), name="host-keep", daemon=True
        )
        self._keeping.start()

    def _keep(self, buffer: HostBuffer) -> None:
        assert self.keeper is not None
        name = f"{os.getpid()}-{next(self._names)}"
        try:
            reply = self.keeper.hold(name, buffer)
        except TorporError as exc:  # deep resumes go through staging buffers meanwhile
            log.warning("host_copy_not_kept", error=str(exc), reason=exc.reason)
            return
        with self._keep_lock:
            current = self.buffer is buffer
            if current:
                self._kept = (buffer, name)
        if current:
            log.info("host_copy_kept", name=name, seconds=round(reply.get("seconds", 0.0), 3))
        else:  # released while the keeper was locking it
            self._drop(name)

    def fill(self, arena: Arena, nbytes: int) -> dict[str, Any]:
        """Have the keeper copy the first `nbytes` into the mapped `arena` (TorporError if it
        cannot: the caller copies another way)."""
        kept = self._kept
        if self.keeper is None or kept is None or not self.kept:
            raise FailedPrecondition("the keeper holds no copy", reason="NOT_KEPT")
        return self.keeper.fill(kept[1], arena, nbytes)

    def _drop(self, name: str) -> None:
        try:
            if self.keeper is not None:
                self.keeper.drop(name)
        except TorporError as exc:  # a lost keeper dropped it anyway
            log.warning("host_copy_drop_failed", error=str(exc))

    # -- page locks ---------------------------------------------------------------------------

    def unpin(self) -> None:
        """Unlock the copy's pages (deep suspend, before the driver's checkpoint); the bytes
        stay, and resuming copies them through staging buffers."""
        self.stop_repin()
        if self.buffer is not None:
            self.buffer.unpin()

    def repin(self) -> None:
        """Lock the copy's pages again in the background, piece by piece, giving way while
        the runtime serves (after a deep resume). `stop_repin` ends it early."""
        buffer = self.buffer
        if buffer is None or not buffer.lockable or buffer.pinned or self._repin_thread:
            return
        self._repin_stop.clear()
        self._repin_thread = threading.Thread(
            target=self._repin, args=(buffer,), name="host-repin", daemon=True
        )
        self._repin_thread.start()

    def _repin(self, buffer: HostBuffer) -> None:
        start = time.perf_counter()
        try:
            buffer.pin(lambda: self._give_way(self._repin_stop))
            log.info("host_copy_repinned", seconds=round(time.perf_counter() - start, 3))
        except _Cancelled:  # a suspend came first; the pieces locked so far stay locked
            pass
        except BaseException as exc:  # it still works unlocked, through staging buffers
            log.error("host_copy_repin_failed", error=repr(exc))

    def stop_repin(self) -> None:
        """Stop re-locking at its next piece and wait for it (at most one piece: ms)."""
        thread, self._repin_thread = self._repin_thread, None
        if thread is not None:
            self._repin_stop.set()
            thread.join()

    def release(self) -> None:
        """Free the copy, if there is one (it is made again by the next `start`); the
        keeper lets go of it in the background."""
        self.stop_repin()
        with self._keep_lock:
            kept, self._kept = self._kept, None
            buffer, self.buffer = self.buffer, None
        self._asked = False
        self._error = None
        if kept is not None:
            threading.Thread(target=self._drop, args=(kept[1],), name="host-drop").start()
        if buffer is not None:
            buffer.close()
