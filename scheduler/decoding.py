"""Request bodies that are not a valid protobuf of their method: INVALID_ARGUMENT, quietly.

grpc.aio decodes a request before any servicer code runs; when that fails it answers UNKNOWN
and logs the DecodeError with a multi-line traceback, so any client of the socket could
flood torpord's log (issue 12). This interceptor wraps each unary-request method's
deserializer: bytes that do not decode become an `Undecodable` marker, and the wrapped
method answers it with INVALID_ARGUMENT (reason UNDECODABLE_REQUEST) without logging.
Streaming-request methods (only reflection's) are left as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from torpor.errors import InvalidArgument
from torpor.rpc_status import to_status


@dataclass(frozen=True)
class Undecodable:
    """What a request body that failed to decode becomes."""

    method: str
    error: str

    def refusal(self) -> grpc.Status:
        err = InvalidArgument(
            f"the request body is not a valid {self.method} request: {self.error}",
            reason="UNDECODABLE_REQUEST",
            metadata={"method": self.method},
        )
        return to_status(err)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers undecodable request bodies with INVALID_ARGUMENT (see the module's doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        wrapped = _guard(behavior)
        if wrapped is None:  # a sync behavior: not ours, left alone
            return handler
        decode = _decoder(handler.request_deserializer, method)
        return handler._replace(request_deserializer=decode, **{kind: wrapped})  # type: ignore[attr-defined]


def _decoder(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or any other refusal of the bytes
            return Undecodable(method.rsplit("/", 1)[-1], f"{type(exc).__name__}: {exc}")

    return decode


def _guard(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort_with_status(request.refusal())
            async for item in behavior(request, context):
                yield item

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort_with_status(request.refusal())
            return await behavior(request, context)

        return unary
    return None
