"""Fuzz the API edge (issue 12): hypothesis-generated requests for every RPC of Scheduler and
Admin, built from the message descriptors (extreme integers, NaN and inf, long and odd
strings, unknown enum numbers, out-of-range Timestamps and Durations), and raw random bytes,
all sent to ONE real torpord. Every reply is OK or a documented code, never INTERNAL or
UNKNOWN; torpord logs no traceback and stays healthy.

CI runs a few examples per RPC; `TORPOR_RELIABILITY_FULL=1` (make test-reliability) runs many
more.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon.conftest import MODELS, Torpord, call, footprint_bytes, start_torpord
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

FULL = os.environ.get("TORPOR_RELIABILITY_FULL") == "1"
EXAMPLES = 300 if FULL else 8
RAW_EXAMPLES = 100 if FULL else 4
UNARY_TIMEOUT = 10.0
STREAM_TIMEOUT = 1.5  # a follow stream or a held lease ends at its deadline, as allowed

# What an edge may answer: the codes the API documents for bad or unlucky requests.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}

METHODS: list[MethodDescriptor] = [
    *scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].methods,
    *admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods,
]
SEEN: Counter[str] = Counter()  # replies by code, printed after a full run (pytest -s)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IO[bytes]]:
    with (tmp_path_factory.mktemp("fuzz-log") / "torpord.stderr").open("w+b") as f:
        yield f


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, model_root: Path, log_file: IO[bytes]
) -> Iterator[Torpord]:
    state = tmp_path_factory.mktemp("fuzz") / "state"
    d = start_torpord(
        state, model_root, memory=int(2.5 * footprint_bytes(model_root)), stderr=log_file
    )
    for name in MODELS:
        d.register(name, model_root / name)
    yield d
    assert d.stop() == 0


# -- strategies from descriptors ------------------------------------------------------------

_I32, _I64 = 2**31, 2**63


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 63, 64, 65, 100, 101, -100, -101) if lo <= v <= hi]
    return st.one_of(st.sampled_from([lo, hi, *edges]), st.integers(lo, hi))


_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _ints(-_I32, _I32 - 1),
    FieldDescriptor.TYPE_SINT32: _ints(-_I32, _I32 - 1),
    FieldDescriptor.TYPE_SFIXED32: _ints(-_I32, _I32 - 1),
    FieldDescriptor.TYPE_INT64: _ints(-_I64, _I64 - 1),
    FieldDescriptor.TYPE_SINT64: _ints(-_I64, _I64 - 1),
    FieldDescriptor.TYPE_SFIXED64: _ints(-_I64, _I64 - 1),
    FieldDescriptor.TYPE_UINT32: _ints(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: _ints(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _ints(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _ints(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def _strings(model_root: Path) -> st.SearchStrategy[str]:
    known = ["", "alpha", "beta", "nope", "../etc", "a" * 300, "/" + "a/" * 2100]
    known += [str(model_root / "alpha"), str(model_root / ("a" * 300)), str(model_root)]
    return st.one_of(st.sampled_from(known), st.text(max_size=40))


def _field(f: FieldDescriptor, model_root: Path, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        one = message(f.message_type, model_root, depth + 1)
    elif f.type == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        one = st.one_of(st.sampled_from(numbers), _ints(-_I32, _I32 - 1))
    elif f.type == FieldDescriptor.TYPE_STRING:
        one = _strings(model_root)
    else:
        one = _SCALARS[f.type]
    if not f.is_repeated:
        return one
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        return st.lists(one, max_size=3)
    return st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=60, max_size=200))


def message(descriptor: Descriptor, model_root: Path, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of `descriptor` with any subset of their fields set to any value."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {
        f.name: _field(f, model_root, depth)
        for f in descriptor.fields
        if not (f.message_type is not None and f.message_type.GetOptions().map_entry)
    }
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        target = getattr(msg, name, None)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, Message):
                    target.add().CopyFrom(item)
                else:
                    target.append(item)
        elif isinstance(value, Message):
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


# -- calls ----------------------------------------------------------------------------------


def _send(daemon: Torpord, method: MethodDescriptor, body: bytes) -> None:
    code = _status(daemon, method, body)
    SEEN[code.name] += 1


def _status(daemon: Torpord, method: MethodDescriptor, body: bytes) -> grpc.StatusCode:
    """Send raw request bytes to `method`; the call's status (a stream is read to its end,
    or until a lease is READY)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            stream = daemon.channel.unary_stream(path)(body, timeout=STREAM_TIMEOUT)
            for reply in stream:
                if method.name == "Acquire" and reply[:1] == b"\x2a":  # field 5: ready
                    stream.cancel()
                    return grpc.StatusCode.OK
            return grpc.StatusCode.OK
        daemon.channel.unary_unary(path)(body, timeout=UNARY_TIMEOUT)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        if exc.code() not in ALLOWED:
            raise AssertionError(f"{method.name}: {exc.code().name}: {exc.details()}") from exc
        return exc.code()


def _healthy(daemon: Torpord, log_file: IO[bytes]) -> None:
    health = health_pb2_grpc.HealthStub(daemon.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    call(daemon.admin.GetStatus, admin_pb2.GetStatusRequest(), timeout=10)
    log_file.seek(0)
    assert b"Traceback" not in log_file.read()


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_generated_requests(
    daemon: Torpord, log_file: IO[bytes], model_root: Path, method: MethodDescriptor
) -> None:
    @FUZZ
    @given(request=message(method.input_type, model_root))
    def fuzz(request: Message) -> None:
        _send(daemon, method, request.SerializeToString())

    fuzz()
    _healthy(daemon, log_file)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_random_bytes(daemon: Torpord, log_file: IO[bytes], method: MethodDescriptor) -> None:
    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(body=st.binary(min_size=1, max_size=256))
    def fuzz(body: bytes) -> None:
        _send(daemon, method, body)

    fuzz()
    _healthy(daemon, log_file)


def test_daemon_serves_after_the_fuzz(
    daemon: Torpord, log_file: IO[bytes], model_root: Path
) -> None:
    """Whatever the fuzz registered, pinned or drained: undo the drain, and a fresh model
    serves tokens."""
    call(daemon.admin.Drain, admin_pb2.DrainRequest(gpu=0, undrain=True))
    for model in call(daemon.scheduler.ListModels, scheduler_pb2.ListModelsRequest()).models:
        call(daemon.admin.SetPinned, admin_pb2.SetPinnedRequest(model=model.spec.name))
    daemon.register("after-fuzz", model_root / "gamma")
    chunks = daemon.generate("after-fuzz", [1, 2, 3], max_tokens=4)
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
    _healthy(daemon, log_file)
    if FULL:
        print(f"\nedge fuzz: {sum(SEEN.values())} requests, replies {dict(SEEN.most_common())}")
