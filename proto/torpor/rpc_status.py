"""The one place where torpor errors become gRPC statuses, and back.

A status carries a `google.rpc.ErrorInfo` detail (domain `torpor`, the error's `reason` and
`metadata`), so a client reconstructs the same typed error the server raised; whether it is
retryable follows from its class. Servicers abort with it, sync or `grpc.aio` alike:

    await context.abort_with_status(to_status(err))
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from torpor.errors import WIRE, Code, DeadlineExceeded, Internal, TorporError, error_for
from torpor.log import get_logger

DOMAIN = "torpor"

# A status travels in trailers, which gRPC caps at 8 KiB by default (the message goes twice:
# in grpc-message, percent-encoded, and in the detail). Past the cap the client gets a
# retryable RESOURCE_EXHAUSTED instead of the error, so long texts are clipped first.
MAX_MESSAGE_BYTES = 1024
"""Longest message sent, in UTF-8 bytes; longer ones end in '…'."""
MAX_METADATA_BYTES = 1024
"""Most bytes of metadata keys and values sent; values past it are clipped or left out."""

_TO_GRPC: dict[Code, grpc.StatusCode] = {code: grpc.StatusCode[WIRE[code].grpc] for code in Code}
_FROM_GRPC: dict[grpc.StatusCode, Code] = {v: k for k, v in _TO_GRPC.items()}


def grpc_code(err: TorporError) -> grpc.StatusCode:
    """The gRPC status code for an error."""
    return _TO_GRPC[err.code]


def to_status(err: TorporError) -> grpc.Status:
    """A gRPC status with an ErrorInfo detail, for `context.abort_with_status`."""
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=DOMAIN, metadata=_clip_metadata(err.metadata)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _clip(err.message, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=_TO_GRPC[err.code].value[0], message=message, details=[detail])
    return rpc_status.to_status(status)


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary, marked with '…'."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: max(limit - 3, 0)].decode(errors="ignore") + "…"


def _clip_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """The first entries of `metadata` that fit MAX_METADATA_BYTES, the last one clipped."""
    clipped: dict[str, str] = {}
    budget = MAX_METADATA_BYTES
    for key, value in metadata.items():
        budget -= len(key.encode())
        if budget <= 3:
            break
        clipped[key] = _clip(value, budget)
        budget -= len(clipped[key].encode())
    return clipped


def from_rpc_error(exc: grpc.RpcError) -> TorporError:
    """Turn a client-side `RpcError` back into the typed error the server raised.

    Errors from something that is not torpor (a dead socket, a proxy) keep their gRPC code
    and message; connection failures arrive as `Unavailable`.
    """
    code_fn = getattr(exc, "code", None)
    grpc_code_ = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(exc, "details", None)
    message = (details_fn() if callable(details_fn) else None) or str(exc)
    code = _FROM_GRPC.get(grpc_code_, Code.INTERNAL)
    reason: str | None = None
    metadata: dict[str, str] = {}
    status = _rich_status(exc)
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
    if code is Code.INTERNAL and grpc_code_ is not grpc.StatusCode.INTERNAL:
        return Internal(f"{grpc_code_.name}: {message}", reason=grpc_code_.name)
    return error_for(code, message, reason=reason, metadata=metadata)


def _rich_status(exc: grpc.RpcError) -> status_pb2.Status | None:
    try:
        return rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError, TypeError):
        return None


UNEXPECTED_LOG_INTERVAL_S = 60.0
"""An unexpected exception is logged at most once a minute per method and exception type."""
_log = get_logger("rpc")
_last_logged: dict[tuple[str, str], float] = {}


def _log_unexpected(method: Callable[..., Any], exc: BaseException) -> None:
    """A bug reached a servicer's edge (it ends the call as INTERNAL): one line, rate-limited,
    since any client can repeat the request that triggers it (issue 12); the traceback only
    at debug. Errors of bad input are TorporErrors and never logged here."""
    key = (method.__qualname__, type(exc).__name__)
    now = time.monotonic()
    last = _last_logged.get(key)
    if last is not None and now - last < UNEXPECTED_LOG_INTERVAL_S:
        return
    _last_logged[key] = now
    _log.error("unexpected_error", method=key[0], error=_clip(f"{key[1]}: {exc}", 500))
    _log.debug("unexpected_error_traceback", method=key[0], exc_info=exc)


def servicer_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a sync gRPC servicer method (unary or streaming): a TorporError ends the
    call with its status; any other exception is a bug and ends it as INTERNAL."""
    import functools
    import inspect

    def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
        if not isinstance(exc, TorporError):
            _log_unexpected(method, exc)
        err = exc if isinstance(exc, TorporError) else Internal(f"{type(exc).__name__}: {exc}")
        context.abort_with_status(to_status(err))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                fail(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            fail(context, exc)

    return unary


def aio_servicer_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """The asyncio twin of `servicer_errors`, for grpc.aio servicer methods (coroutines and
    async generators)."""
    import functools
    import inspect

    async def fail(context: Any, exc: BaseException) -> None:
        if not isinstance(exc, TorporError):
            _log_unexpected(method, exc)
        err = exc if isinstance(exc, TorporError) else Internal(f"{type(exc).__name__}: {exc}")
        if _call_over(context, err):
            _end_quietly(method, err.code.value)
        try:
            await context.abort_with_status(to_status(err))
        except Exception as sent:
            if _is_failed_send(sent):  # the call ended while the status was on its way
                _end_quietly(method, err.code.value)
            raise

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> Any:
            try:
                # Closed here, not by the garbage collector, when the call ends early.
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        if _call_over(context):  # grpc would write it to a call that has ended
                            _end_quietly(method, "DEADLINE_EXCEEDED")
                        yield item
            except Exception as exc:
                if _is_abort(exc):
                    raise
                await fail(context, exc)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await fail(context, exc)

    return unary


DEADLINE_SLACK_S = 0.05
"""How close to the call's deadline torpord's own DeadlineExceeded counts as that deadline:
torpord times a queued request on its own clock, and both fire at about the same moment."""


def _call_over(context: Any, err: TorporError | None = None) -> bool:
    """Whether the call's deadline has passed, so that grpc's core ends it (the client gets
    DEADLINE_EXCEEDED) whatever the servicer sends. A message or status sent then races that
    end, and a send that loses makes grpc log a multi-line `ExecuteBatchError` traceback
    (issue 12, found by the load suite): such a call is not written to."""
    remaining = context.time_remaining()
    if remaining is None:
        return False
    return bool(remaining <= (DEADLINE_SLACK_S if isinstance(err, DeadlineExceeded) else 0.0))


def _end_quietly(method: Callable[..., Any], code: str) -> None:
    """End a call that is over without sending anything: grpc takes a CancelledError out of
    a servicer for a cancelled call (one debug line), and its core has the deadline's status
    sent already."""
    _log.debug("call_over_unanswered", method=method.__qualname__, code=code)
    raise asyncio.CancelledError


def _is_failed_send(exc: BaseException) -> bool:
    # grpc.aio's failed batch in its core (a private class: told by name, like AbortError).
    return type(exc).__name__ == "ExecuteBatchError"


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises an internal exception that must propagate untouched.
    return type(exc).__name__ == "AbortError"
