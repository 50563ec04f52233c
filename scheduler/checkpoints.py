"""Reading registered checkpoints off the event loop, on threads of their own.

A checkpoint is user-supplied input on a filesystem torpord does not control: a file may be
a FIFO, sit on a hung network mount, or be huge. Inspecting one (config.json, safetensors
headers) therefore never runs on the default executor that the catalog, the event log and
`snapshots ls` need (issue 12: eight registrations of a model whose config.json was a FIFO
blocked every default thread). Here each read runs on a daemon thread, at most `limit` at
once, and the caller stops waiting after `timeout_s` (a wait for a free slot included). A
read that overruns keeps its slot until it really ends, so a stuck filesystem can fill these
slots but nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from torpor.errors import DeadlineExceeded, Unavailable

T = TypeVar("T")


class CheckpointReader:
    """Runs checkpoint reads on at most `limit` threads, each waited for `timeout_s`."""

    def __init__(self, limit: int = 4, timeout_s: float = 30.0) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(limit)

    async def run(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a thread of its own; Unavailable when no slot frees up in time,
        DeadlineExceeded when the read takes longer (`what` names the model in messages)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"{self.limit} checkpoint reads are still running after {self.timeout_s:g} s "
                f"(a checkpoint file may be on a stuck filesystem); try {what} again later",
                reason="CHECKPOINT_READS_BUSY",
            ) from None
        future: asyncio.Future[T] = loop.create_future()

        def done(result: T | None, error: BaseException | None) -> None:
            self._slots.release()  # only now: a stuck read keeps its slot
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        def work() -> None:
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the waiting coroutine
                result, error = None, exc
            # RuntimeError: the loop closed while the read ran, and nobody waits for it.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(done, result, error)

        # A daemon thread: one stuck in the kernel must not hold up torpord's exit.
        threading.Thread(target=work, name="checkpoint-read", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(future), deadline - loop.time())
        except TimeoutError:
            raise DeadlineExceeded(
                f"reading the checkpoint of {what} took longer than {self.timeout_s:g} s "
                "(is a file of it on a stuck filesystem?)",
                reason="CHECKPOINT_READ_TIMEOUT",
            ) from None
