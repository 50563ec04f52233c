"""TorporError ⇄ gRPC status, through a real `grpc.aio` server on a Unix socket.

A tiny Scheduler servicer aborts with the error its request names (the model name is the
error's class name); clients, async and sync, unary and streaming, get the matching status
code, and `from_rpc_error` rebuilds the same class, message, reason and metadata.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from torpor import errors, rpc_status
from torpor.v1 import scheduler_pb2, scheduler_pb2_grpc

ERROR_CLASSES = sorted(errors.BY_CODE.values(), key=lambda cls: cls.__name__)
LONG_TEXTS = {
    "ascii": "m" * 20_000,
    "multibyte": "模型" * 10_000,  # 3 UTF-8 bytes each; percent-encoded in grpc-message
}


def error_named(name: str) -> errors.TorporError:
    """The error a request for model `name` is answered with."""
    if name.startswith("long-"):
        text = LONG_TEXTS[name.removeprefix("long-")]
        metadata = {f"key{i}": text for i in range(20)}
        return errors.InvalidArgument(text, reason="TOO_LONG", metadata=metadata)
    cls = getattr(errors, name)
    return cls(
        f"{name}: «{name}» went wrong",
        reason=f"TEST_{cls.code.value}",
        metadata={"model": name, "bytes": 123},
    )


class FailingScheduler(scheduler_pb2_grpc.SchedulerServicer):
    """Answers GetModel and Acquire with the error that the model name names."""

    def __init__(self) -> None:
        self.never = asyncio.Event()

    async def GetModel(self, request, context):
        if request.name == "RuntimeError":
            raise RuntimeError("a bug in a handler")
        if request.name == "OUT_OF_RANGE":
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "not torpor's code")
        if request.name == "hang":
            await self.never.wait()
        await context.abort_with_status(rpc_status.to_status(error_named(request.name)))

    async def Acquire(self, request, context):
        yield scheduler_pb2.AcquireEvent(
            queued=scheduler_pb2.AcquireEvent.Queued(position=0, queue_depth=1)
        )
        await context.abort_with_status(rpc_status.to_status(error_named(request.model)))


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short temporary directory: a Unix socket path must fit in 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="torpor-") as tmp:
        yield Path(tmp)


@pytest.fixture
async def address(socket_dir: Path) -> AsyncIterator[str]:
    """The target of a running grpc.aio server with a FailingScheduler."""
    target = f"unix:{socket_dir / 'torpord.sock'}"
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(FailingScheduler(), server)
    server.add_insecure_port(target)
    await server.start()
    try:
        yield target
    finally:
        await server.stop(grace=None)


def assert_same_error(got: errors.TorporError, sent: errors.TorporError) -> None:
    assert type(got) is type(sent)
    assert (got.message, got.reason, got.metadata) == (sent.message, sent.reason, sent.metadata)
    assert got.retryable is sent.retryable


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
async def test_unary_error_round_trips(address: str, cls: type[errors.TorporError]) -> None:
    sent = error_named(cls.__name__)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(scheduler_pb2.GetModelRequest(name=cls.__name__), timeout=10)
    assert caught.value.code() == grpc.StatusCode[cls.code.value]
    assert caught.value.code() == rpc_status.grpc_code(sent)
    assert caught.value.details() == sent.message
    assert_same_error(rpc_status.from_rpc_error(caught.value), sent)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
async def test_stream_error_after_a_message_round_trips(
    address: str, cls: type[errors.TorporError]
) -> None:
    received = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in stub.Acquire(scheduler_pb2.AcquireRequest(model=cls.__name__)):
                received.append(event.WhichOneof("event"))
    assert received == ["queued"]
    assert caught.value.code() == grpc.StatusCode[cls.code.value]
    assert_same_error(rpc_status.from_rpc_error(caught.value), error_named(cls.__name__))


def _sync_errors(address: str, name: str) -> tuple[grpc.RpcError, grpc.RpcError]:
    """The RpcErrors of a unary and a streaming call through a sync channel."""
    with grpc.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            stub.GetModel(scheduler_pb2.GetModelRequest(name=name), timeout=10)
        except grpc.RpcError as exc:
            unary = exc
        else:
            raise AssertionError("GetModel succeeded")
        try:
            list(stub.Acquire(scheduler_pb2.AcquireRequest(model=name), timeout=10))
        except grpc.RpcError as exc:
            return unary, exc
        raise AssertionError("Acquire succeeded")


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
async def test_sync_channel_round_trips(address: str, cls: type[errors.TorporError]) -> None:
    sent = error_named(cls.__name__)
    # A blocking client on the server's own event loop would deadlock it: use a thread.
    for exc in await asyncio.to_thread(_sync_errors, address, cls.__name__):
        assert exc.code() == grpc.StatusCode[cls.code.value]
        assert_same_error(rpc_status.from_rpc_error(exc), sent)


@pytest.mark.parametrize("text", sorted(LONG_TEXTS))
async def test_long_message_and_metadata_are_clipped_not_lost(address: str, text: str) -> None:
    # Unclipped, these overflow gRPC's 8 KiB trailer limit and the client sees a retryable
    # RESOURCE_EXHAUSTED instead of the error.
    sent = error_named(f"long-{text}")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(scheduler_pb2.GetModelRequest(name=f"long-{text}"), timeout=10)
    got = rpc_status.from_rpc_error(caught.value)
    assert type(got) is errors.InvalidArgument
    assert got.reason == "TOO_LONG"
    assert got.message.endswith("…")
    assert len(got.message.encode()) <= rpc_status.MAX_MESSAGE_BYTES
    assert sent.message.startswith(got.message.removesuffix("…"))
    assert got.metadata, "the first metadata entries survive"
    assert sum(len(k.encode()) + len(v.encode()) for k, v in got.metadata.items()) <= (
        rpc_status.MAX_METADATA_BYTES
    )
    assert all(sent.metadata[k].startswith(v.removesuffix("…")) for k, v in got.metadata.items())


def test_short_texts_are_sent_unchanged() -> None:
    sent = errors.NotFound("x" * rpc_status.MAX_MESSAGE_BYTES, metadata={"model": "m"})
    status = rpc_status.to_status(sent)
    assert status.details == sent.message
    assert status.code == grpc.StatusCode.NOT_FOUND


async def test_client_deadline_is_deadline_exceeded(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(scheduler_pb2.GetModelRequest(name="hang"), timeout=0.2)
    got = rpc_status.from_rpc_error(caught.value)
    assert type(got) is errors.DeadlineExceeded
    assert got.retryable


@pytest.mark.parametrize(
    ("name", "code"),
    [("RuntimeError", "UNKNOWN"), ("OUT_OF_RANGE", "OUT_OF_RANGE")],
)
async def test_status_without_torpor_detail_is_internal(address: str, name: str, code: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(scheduler_pb2.GetModelRequest(name=name), timeout=10)
    assert caught.value.code() == grpc.StatusCode[code]
    got = rpc_status.from_rpc_error(caught.value)
    assert type(got) is errors.Internal
    assert got.reason == code
    assert got.message.startswith(f"{code}: ")


@pytest.fixture(params=["missing", "not-listening"])
def dead_address(request: pytest.FixtureRequest, socket_dir: Path) -> Iterator[str]:
    """A Unix socket nobody serves: no file at all, or a bound socket nobody listens on."""
    path = socket_dir / "dead.sock"
    if request.param == "missing":
        yield f"unix:{path}"
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(path))
        yield f"unix:{path}"


async def test_dead_socket_is_unavailable_async(dead_address: str) -> None:
    async with grpc.aio.insecure_channel(dead_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetModel(scheduler_pb2.GetModelRequest(name="m"), timeout=10)
    got = rpc_status.from_rpc_error(caught.value)
    assert type(got) is errors.Unavailable
    assert got.retryable
    assert got.reason == "UNAVAILABLE"


def test_dead_socket_is_unavailable_sync(dead_address: str) -> None:
    with grpc.insecure_channel(dead_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetModel(scheduler_pb2.GetModelRequest(name="m"), timeout=10)
    got = rpc_status.from_rpc_error(caught.value)
    assert type(got) is errors.Unavailable
    assert got.retryable
