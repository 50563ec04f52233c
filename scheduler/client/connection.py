"""A synchronous gRPC connection to torpord, with typed errors.

Every call goes through `Connection.unary` or `Connection.stream`, which turn a
`grpc.RpcError` into the `TorporError` the daemon raised (`torpor.rpc_status.from_rpc_error`).
A transport failure (no socket, connection refused) is not torpor's status, so it becomes an
`Unavailable` that says torpord is not running and how to start it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from torpor.errors import DeadlineExceeded, TorporError, Unavailable
from torpor.rpc_status import from_rpc_error
from torpor.scheduler.client.credentials import TcpCredentials, open_channel
from torpor.scheduler.client.target import Target
from torpor.v1 import admin_pb2_grpc, scheduler_pb2_grpc

DEFAULT_TIMEOUT_S = 60.0
"""Deadline of a quick unary call when --timeout is not given."""
WAIT_TIMEOUT_S = 600.0
"""Without --timeout, how long a call that waits (generate, evict, prefetch, acquire until
its lease is ready) may go without a word from torpord before it fails DEADLINE_EXCEEDED
(exit 7): a wedged model or daemon must not hang a script forever (issue 12). A stream that
keeps sending (a long generation, a restore's progress) is never cut by it."""
START_HINT = "start it with `torpord` (or `make run` in a torpor checkout)"
_DETAILS_KEY = "grpc-status-details-bin"  # the trailer where torpor's ErrorInfo travels

T = TypeVar("T")


class Stream(Generic[T]):
    """A server stream: iterate it for its messages (errors arrive typed); cancel it to end
    the call early. With `idle_s`, a call that sends nothing for that long is cancelled and
    ends in `idle_error`, until `settle` (a held lease is silent by design)."""

    def __init__(
        self,
        call: Any,
        translate: Callable[[grpc.RpcError], TorporError],
        idle_s: float | None = None,
        idle_error: Callable[[float], TorporError] | None = None,
    ) -> None:
        self._call = call
        self._translate = translate
        self._watchdog = _Watchdog(call, idle_s) if idle_s is not None else None
        self._idle_error = idle_error

    def __iter__(self) -> Iterator[T]:
        dog = self._watchdog
        try:
            for message in self._call:
                if dog is not None:
                    dog.kick()
                yield message
        except grpc.RpcError as exc:
            if dog is not None and dog.fired and self._idle_error is not None:
                raise self._idle_error(dog.idle_s) from None
            raise self._translate(exc) from None
        finally:
            self.settle()

    def settle(self) -> None:
        """Stop bounding the silence: what follows may wait as long as it likes."""
        if self._watchdog is not None:
            self._watchdog.stop()

    def cancel(self) -> None:
        """End the call; a server that holds state for it (a lease) lets it go."""
        self.settle()
        self._call.cancel()


class _Watchdog:
    """Cancels a call that has gone `idle_s` without a message. One thread that waits on an
    event, not a timer per message (a generation sends hundreds a second)."""

    def __init__(self, call: Any, idle_s: float) -> None:
        self.idle_s = idle_s
        self.fired = False
        self._call = call
        self._last = time.monotonic()
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="stream-watchdog", daemon=True).start()

    def kick(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(max(0.0, self._last + self.idle_s - time.monotonic())):
            if time.monotonic() >= self._last + self.idle_s:
                self.fired = True
                self._call.cancel()
                return


class Connection:
    """One channel to torpord and its Scheduler, Admin and Health stubs.

    `timeout` (--timeout) is the deadline, in seconds, of every call, streams included.
    Without it, quick calls get DEFAULT_TIMEOUT_S, and calls that wait get WAIT_TIMEOUT_S
    of silence from torpord at most; only a stream that follows on purpose (`events
    --follow`, a held lease) waits for as long as it is left to.
    """

    def __init__(
        self, target: Target, timeout: float | None = None, creds: TcpCredentials | None = None
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.creds = creds
        self._channel = open_channel(target, creds)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self.admin = admin_pb2_grpc.AdminStub(self._channel)
        self.health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def unary(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        waits: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Call a unary method; `waits` marks a call that may legitimately take long, and
        `timeout` caps this call's deadline (for calls made while exiting)."""
        deadline: float
        if self.timeout is not None:
            deadline = self.timeout if timeout is None else min(self.timeout, timeout)
        else:
            deadline = (
                timeout if timeout is not None else WAIT_TIMEOUT_S if waits else DEFAULT_TIMEOUT_S
            )
        try:
            return method(request, timeout=deadline)
        except grpc.RpcError as exc:
            raise self.error(exc, waited=deadline) from None

    def stream(
        self, method: Callable[..., Any], request: Any, *, follow: bool = False
    ) -> Stream[Any]:
        """Start a server-streaming call: --timeout is its deadline; without it, it fails
        after WAIT_TIMEOUT_S without a message, unless it `follow`s (events --follow)."""
        if self.timeout is not None or follow:
            return Stream(method(request, timeout=self.timeout), self.error)
        return Stream(method(request), self.error, WAIT_TIMEOUT_S, self._silent)

    def _silent(self, idle_s: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"no word from torpord at {self.target} for {idle_s:g} s while waiting (a model "
            "stuck in a transition?); see `torpor ps`, or wait longer with --timeout",
            reason="CLIENT_DEADLINE",
            metadata={"target": str(self.target), "waited_s": f"{idle_s:g}"},
        )

    def health_status(self, service: str = "") -> str:
        """The standard health service's status of `service` ("" is the whole server), as its
        lowercase name: "serving", "not_serving", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self.unary(self.health.Check, request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status).lower()

    def error(self, exc: grpc.RpcError, waited: float | None = None) -> TorporError:
        """The typed error of a failed call, with the transport's failures made readable."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code is not None and not _from_torpor(exc):
            if code is grpc.StatusCode.UNAVAILABLE:
                return self._not_running(exc)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                within = "in time" if waited is None else f"within {waited:g} s"
                return DeadlineExceeded(
                    f"no answer from torpord at {self.target} {within} (see --timeout)",
                    reason="CLIENT_DEADLINE",
                    metadata={"target": str(self.target)},
                )
        return from_rpc_error(exc)

    def _not_running(self, exc: grpc.RpcError) -> Unavailable:
        sock = self.target.socket
        if sock is None and (tls := self._tls_failure(exc)) is not None:
            return tls
        if sock is None:
            what = f"nothing answers at {self.target}"
        elif not os.path.exists(sock):
            what = f"no socket at {sock}"
        elif not os.access(sock, os.R_OK | os.W_OK):
            return Unavailable(
                f"cannot connect to torpord at {sock}: permission denied; join the socket's "
                "group (see `ls -l` of it) or run as its owner",
                reason="DAEMON_PERMISSION_DENIED",
                metadata={"target": str(self.target)},
            )
        else:
            what = f"nothing answers on {sock}"
        return Unavailable(
            f"torpord is not running ({what}); {START_HINT}, or point --socket, "
            "$TORPOR_SOCKET or --address at a running one",
            reason="DAEMON_NOT_RUNNING",
            metadata={"target": str(self.target)},
        )

    def _tls_failure(self, exc: grpc.RpcError) -> Unavailable | None:
        """A TCP connection that failed in the TLS handshake, or that spoke plaintext to a
        TLS port (the server drops it), said as such rather than as a daemon that is down."""
        details = exc.details() if callable(getattr(exc, "details", None)) else ""
        tls = self.creds is not None and self.creds.tls
        if tls and any(word in (details or "").lower() for word in ("ssl", "handshake", "tls")):
            hint = "check --tls-ca and the name in the daemon's certificate (--tls-server-name)"
        elif not tls and "socket closed" in (details or "").lower():
            hint = "if it serves TLS, give --tls-ca (or --tls)"
        else:
            return None
        return Unavailable(
            f"cannot connect to torpord at {self.target}: {details}; {hint}",
            reason="TLS_FAILED",
            metadata={"target": str(self.target)},
        )


def _from_torpor(exc: grpc.RpcError) -> bool:
    """Whether the status came from torpord (it carries torpor's ErrorInfo trailer), rather
    than from the transport or a server that is not torpord."""
    trailers = (
        exc.trailing_metadata() if callable(getattr(exc, "trailing_metadata", None)) else None
    )
    return any(key == _DETAILS_KEY for key, _ in trailers or ())
