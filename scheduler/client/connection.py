"""A synchronous gRPC connection to torpord, with typed errors.

Every call goes through `Connection.unary` or `Connection.stream`, which turn a
`grpc.RpcError` into the `TorporError` the daemon raised (`torpor.rpc_status.from_rpc_error`).
A transport failure (no socket, connection refused) is not torpor's status, so it becomes an
`Unavailable` that says torpord is not running and how to start it.
"""

from __future__ import annotations

import os
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
START_HINT = "start it with `torpord` (or `make run` in a torpor checkout)"
_DETAILS_KEY = "grpc-status-details-bin"  # the trailer where torpor's ErrorInfo travels

T = TypeVar("T")


class Stream(Generic[T]):
    """A server stream: iterate it for its messages (errors arrive typed); cancel it to end
    the call early."""

    def __init__(self, call: Any, translate: Callable[[grpc.RpcError], TorporError]) -> None:
        self._call = call
        self._translate = translate

    def __iter__(self) -> Iterator[T]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def cancel(self) -> None:
        """End the call; a server that holds state for it (a lease) lets it go."""
        self._call.cancel()


class Connection:
    """One channel to torpord and its Scheduler, Admin and Health stubs.

    `timeout` is the deadline, in seconds, of every unary call; None means DEFAULT_TIMEOUT_S
    for quick calls and no deadline for calls that wait (`Prefetch --wait`) and streams.
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
        deadline: float | None
        if self.timeout is not None:
            deadline = self.timeout if timeout is None else min(self.timeout, timeout)
        else:
            deadline = timeout if timeout is not None else None if waits else DEFAULT_TIMEOUT_S
        try:
            return method(request, timeout=deadline)
        except grpc.RpcError as exc:
            raise self.error(exc) from None

    def stream(self, method: Callable[..., Any], request: Any) -> Stream[Any]:
        """Start a server-streaming call; it has no deadline unless --timeout gave one."""
        return Stream(method(request, timeout=self.timeout), self.error)

    def health_status(self, service: str = "") -> str:
        """The standard health service's status of `service` ("" is the whole server), as its
        lowercase name: "serving", "not_serving", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self.unary(self.health.Check, request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status).lower()

    def error(self, exc: grpc.RpcError) -> TorporError:
        """The typed error of a failed call, with the transport's failures made readable."""
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code is not None and not _from_torpor(exc):
            if code is grpc.StatusCode.UNAVAILABLE:
                return self._not_running(exc)
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return DeadlineExceeded(
                    f"no answer from torpord at {self.target} in time (see --timeout)",
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
