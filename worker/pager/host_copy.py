"""The weights' retained host copy, made in the background after a load or a disk resume so
that a host-level suspend only unmaps (never copies on the eviction path).

Making it pins as many bytes as the weights (16 GB for an 8B model; seconds of work), and
pinning takes a driver lock that a request's kernel launches would queue behind. So the copy
gives way: before each pinned piece, and before the copy itself, it waits while the runtime
serves (`busy`). A disk-level suspend does not need it and cancels it.

A deep suspend unlocks the copy's pages (`unpin`: the driver's checkpoint costs about 25 ms per
page-locked GB each way) and a deep resume locks them again in the background (`repin`),
giving way the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from torpor.errors import FailedPrecondition
from torpor.log import get_logger
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.host import HostBuffer

GIVE_WAY_POLL_S = 0.005

log = get_logger("pager.host_copy")


class _Cancelled(Exception):
    """Raised inside the background copy when a disk suspend no longer needs it."""


class HostCopy:
    """One runtime's host copy: start it, wait for it, cancel it, release it. Thread-safe
    for one owner (the runtime, under its lock) and the background thread it starts."""

    def __init__(self, enabled: bool, busy: Callable[[], bool]) -> None:
        self.enabled = enabled
        self.buffer: HostBuffer | None = None
        self._busy = busy
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._repin_thread: threading.Thread | None = None
        self._repin_stop = threading.Event()
        if not enabled:
            self._done.set()

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes if self.buffer is not None else 0

    def start(self, arena: Arena, nbytes: int) -> None:
        """Pin and fill the first `nbytes` of `arena` in the background (no-op if disabled)."""
        if not self.enabled:
            return
        self._done.clear()
        self._cancel.clear()
        self._error = None
        threading.Thread(
            target=self._make, args=(arena, nbytes), name="host-copy", daemon=True
        ).start()

    def _make(self, arena: Arena, nbytes: int) -> None:
        buffer: HostBuffer | None = None
        try:
            buffer = HostBuffer.for_arena(arena, nbytes, before_piece=self._give_way)
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

    def _give_way(self, stop: threading.Event | None = None) -> None:
        """Wait while the runtime serves; raise _Cancelled once `stop` (default: the copy's
        cancel) is set."""
        stop = self._cancel if stop is None else stop
        while self._busy() and not stop.is_set():
            time.sleep(GIVE_WAY_POLL_S)
        if stop.is_set():
            raise _Cancelled

    def wait(self) -> HostBuffer | None:
        """The copy, once made (None when host copies are disabled); FailedPrecondition
        HOST_COPY_FAILED if it could not be made."""
        if not self.enabled:
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
        """Free the copy, if there is one (it is made again by the next `start`)."""
        self.stop_repin()
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
