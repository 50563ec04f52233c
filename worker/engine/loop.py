"""A thread that drives an `Engine`, and a thread-safe front for submitting requests.

The engine is single-threaded; this loop owns it. Other threads (gRPC handlers in the
worker, the pager) talk to it only through `submit`, `abort` and `paused`:
- `submit` returns a `RequestStream` that yields the request's deltas as steps produce them;
- `paused` parks the loop between steps, so the pager can unmap memory safely.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from torpor.errors import TorporError, Unavailable
from torpor.log import get_logger
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.requests import FinishReason, GenerationRequest, RequestDelta

log = get_logger("engine.loop")

_END = object()


class RequestStream:
    """The deltas of one request, in order; iteration blocks until each is produced and ends
    after the finishing delta. Errors (a rejected request, a dead loop) are raised."""

    def __init__(self, request_id: str, loop: EngineLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: queue.SimpleQueue[RequestDelta | BaseException | object] = queue.SimpleQueue()

    def put(self, item: RequestDelta | BaseException) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[RequestDelta]:
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                return
            assert isinstance(item, RequestDelta)
            yield item
            if item.finish is not None:
                return

    def cancel(self) -> None:
        """Abort the request; its stream ends with a FinishReason.ABORT delta."""
        self._loop.abort(self.request_id)


@dataclass
class _Inbox:
    requests: list[tuple[GenerationRequest, RequestStream]]
    aborts: list[str]


class EngineLoop:
    """Owns an engine and steps it on a dedicated thread while there is work."""

    def __init__(self, engine: Engine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox = _Inbox([], [])
        self._streams: dict[str, RequestStream] = {}
        self._pause_requests = 0
        self._parked = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    def start(self) -> EngineLoop:
        if self._started:
            raise RuntimeError("EngineLoop.start() called twice")
        self._started = True
        self._thread.start()
        return self

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def submit(self, request: GenerationRequest) -> RequestStream:
        stream = RequestStream(request.request_id, self)
        with self._cond:
            if self._stopping:
                raise Unavailable("the engine is shutting down", reason="ENGINE_STOPPING")
            self._inbox.requests.append((request, stream))
            self._cond.notify_all()
        return stream

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._inbox.aborts.append(request_id)
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[Engine]:
        """Park the loop between steps, with no device work in flight, for the duration of the
        block (nested pauses stack). Requests keep their slots and resume afterwards."""
        with self._cond:
            self._pause_requests += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._parked or not self._thread.is_alive())
        try:
            yield self.engine
        finally:
            with self._cond:
                self._pause_requests -= 1
                self._cond.notify_all()

    def abort_parked(self) -> int:
        """While paused: end every request with FinishReason.ABORT now; return how many.
        (Requests submitted after the pause began stay queued for after it.)"""
        if not self._parked:
            raise RuntimeError("abort_parked() needs the loop paused")
        ids = self.engine.request_ids()
        for request_id in ids:
            self.engine.abort(request_id)
        self._dispatch(self.engine.step())
        return len(ids)

    def busy(self) -> bool:
        """Whether the engine is serving: requests open or waiting to be taken in, and the
        loop not paused (a paused loop serves nothing, whatever waits). A cheap, lock-free
        read for background work that should give way to serving."""
        return not self._pause_requests and bool(self._streams or self._inbox.requests)

    def shutdown(self) -> None:
        """Stop the thread; requests still open end with Unavailable. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._next_batch_of_work():
                self._dispatch(self.engine.step())
        except BaseException as exc:  # a bug or a device failure: fail every open request
            log.error("engine_loop_failed", error=repr(exc))
            self._fail_all(
                exc if isinstance(exc, TorporError) else Unavailable(f"engine failed: {exc!r}")
            )
            raise
        self._fail_all(Unavailable("the engine shut down", reason="ENGINE_STOPPED"))

    def _next_batch_of_work(self) -> bool:
        """Wait for work or a pause; move the inbox into the engine. False when stopping."""
        while True:
            with self._cond:
                if self._stopping:
                    return False
                pause = self._pause_requests > 0
                if not pause:
                    inbox, self._inbox = self._inbox, _Inbox([], [])
                    if inbox.requests or inbox.aborts or self.engine.has_work():
                        break
                    self._cond.wait()
                    continue
            # Park with nothing in flight on the device: read back what earlier steps sampled.
            self._dispatch(self.engine.flush())
            with self._cond:
                self._parked = True
                self._cond.notify_all()
                self._cond.wait_for(lambda: not self._pause_requests or self._stopping)
                self._parked = False
        self._accept(inbox)
        return True

    def _accept(self, inbox: _Inbox) -> None:
        for request, stream in inbox.requests:
            try:
                self.engine.add_request(request)
            except TorporError as exc:
                stream.put(exc)
                continue
            self._streams[request.request_id] = stream
        for request_id in inbox.aborts:
            self.engine.abort(request_id)

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is None:
                continue
            stream.put(delta)
            if delta.finish is not None:
                del self._streams[delta.request_id]

    def _fail_all(self, error: TorporError) -> None:
        with self._cond:
            streams, self._streams = self._streams, {}
            pending, self._inbox = self._inbox, _Inbox([], [])
            self._parked = True
            self._cond.notify_all()
        for stream in streams.values():
            stream.put(error)
        for _, stream in pending.requests:
            stream.put(error)


__all__ = ["EngineLoop", "FinishReason", "RequestStream"]
