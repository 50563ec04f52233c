"""The API edge's checks (scheduler/validate.py), one rule at a time, and the quiet handling of
undecodable bodies and unexpected errors."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from torpor import rpc_status
from torpor.errors import FailedPrecondition, InvalidArgument, NotFound
from torpor.scheduler import validate
from torpor.scheduler.core import ModelSpec
from torpor.scheduler.core.scheduler_state import Model
from torpor.scheduler.decoding import DecodeGuard, Undecodable
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2


def reason_of(fn: Any, *args: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    return info.value


@given(st.integers(-(2**31), 2**31 - 1))
def test_priority_is_one_rule(value: int) -> None:
    if -100 <= value <= 100:
        assert validate.priority(value) == value
    else:
        err = reason_of(validate.priority, value)
        assert err.reason == "BAD_PRIORITY" and err.metadata["value"] == str(value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", math.nan),
        ("top_p", math.inf),
        ("temperature", math.nan),
        ("temperature", -math.inf),
        ("temperature", 100.5),
        ("max_tokens", validate.MAX_TOKENS + 1),
        ("stop_token_ids", [7] * 65),
        ("stop", ["x"] * 17),
        ("stop", [""]),
        ("stop", ["ü" * 129]),  # 258 bytes
        ("top_logprobs", 6),
        ("top_logprobs", 1),  # without logprobs
    ],
)
def test_sampling_out_of_range(field: str, value: Any) -> None:
    err = reason_of(validate.sampling, common_pb2.SamplingParams(**{field: value}))
    assert err.reason == "INVALID_SAMPLING" and err.metadata["field"] == field


def test_sampling_at_the_bounds_is_fine() -> None:
    validate.sampling(common_pb2.SamplingParams())  # greedy, to the end of the context
    validate.sampling(
        common_pb2.SamplingParams(
            max_tokens=validate.MAX_TOKENS,
            temperature=100,
            top_p=1,
            top_k=2**32 - 1,  # against the vocabulary: the worker's check
            stop=["x" * 256] * 16,
            stop_token_ids=[1] * 64,
            logprobs=True,
            top_logprobs=validate.MAX_TOP_LOGPROBS,
        )
    )


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(253_402_300_800, 0), (-62_135_596_801, 0), (0, -1), (0, 10**9)]
)
def test_bad_timestamps(seconds: int, nanos: int) -> None:
    err = reason_of(validate.timestamp, Timestamp(seconds=seconds, nanos=nanos), "since")
    assert err.reason == "BAD_TIMESTAMP" and err.metadata["field"] == "since"


def test_good_timestamps() -> None:
    assert validate.timestamp(Timestamp(seconds=0, nanos=5000), "since") == datetime(
        1970, 1, 1, 0, 0, 0, 5, tzinfo=UTC
    )
    assert validate.timestamp(Timestamp(seconds=253_402_300_799), "since").year == 9999
    assert validate.timestamp(Timestamp(seconds=-62_135_596_800), "since").year == 1
    assert validate.timestamp_s(Timestamp(seconds=3, nanos=500_000_000), "deadline") == 3.5


@pytest.mark.parametrize(
    ("seconds", "nanos"), [(-5, 0), (0, -1), (3601, 0), (1, -5), (-1, 5), (2**40, 0), (0, 2**30)]
)
def test_bad_durations(seconds: int, nanos: int) -> None:
    msg = Duration(seconds=seconds, nanos=nanos)
    err = reason_of(validate.duration, msg, "drain_timeout", validate.DRAIN_TIMEOUT_S)
    assert err.reason == "BAD_DURATION" and err.metadata["field"] == "drain_timeout"


def test_good_durations() -> None:
    bounds = validate.DRAIN_TIMEOUT_S
    assert validate.duration(Duration(), "drain_timeout", bounds) == 0
    assert validate.duration(Duration(seconds=3600), "drain_timeout", bounds) == 3600
    assert validate.duration(Duration(seconds=1), "ttl", validate.LEASE_TTL_S) == 1


def test_lease_ttl_below_one_second() -> None:
    err = reason_of(validate.duration, Duration(nanos=500_000_000), "ttl", validate.LEASE_TTL_S)
    assert err.metadata["field"] == "ttl"


def test_enums_are_known_numbers() -> None:
    kinds = admin_pb2.EventKind.DESCRIPTOR
    assert validate.enum(admin_pb2.EVENT_KIND_EVICTION, kinds, "kinds") == 4
    for value in (99, -1, 2**31 - 1):
        err = reason_of(validate.enum, value, kinds, "kinds")
        assert err.reason == "BAD_ENUM" and err.metadata == {"field": "kinds", "value": str(value)}
    modes = admin_pb2.EvictMode.DESCRIPTOR
    reason_of(validate.enum, 0, modes, "mode", (1, 2))  # allowed narrows the choice


def test_event_ids() -> None:
    assert validate.event_id(2**63 - 1) == 2**63 - 1
    assert reason_of(validate.event_id, 2**63).reason == "BAD_EVENT_ID"


def test_names_are_required_and_known() -> None:
    err = reason_of(validate.required, "", "model")
    assert err.reason == "MODEL_REQUIRED" and err.metadata["field"] == "model"
    spec = ModelSpec("alpha", None)  # type: ignore[arg-type]
    models = {"alpha": Model(spec, "alpha#1"), "going": Model(spec, "going#2", unregistering=True)}
    assert validate.known_model(models, "alpha").runtime_id == "alpha#1"
    reason_of(validate.known_model, models, "")
    for name in ("nope", "going"):
        with pytest.raises(NotFound):
            validate.known_model(models, name)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"name": "../x"}, "INVALID_MODEL_NAME"),
        ({"source": ""}, "NO_SOURCE"),
        ({"source": "/m/" + "a" * 256}, "SOURCE_PATH_TOO_LONG"),
        ({"source": "/m" * 2049}, "SOURCE_PATH_TOO_LONG"),
        ({"dtype": 42}, "BAD_ENUM"),
        ({"load_format": 42}, "BAD_ENUM"),
        ({"max_batch": 1025}, "BAD_MAX_BATCH"),
        ({"priority": 2**31 - 1}, "BAD_PRIORITY"),
        ({"keep_alive_s": 2**32 - 1}, "BAD_KEEP_ALIVE"),
    ],
)
def test_model_specs(changes: dict[str, Any], reason: str) -> None:
    fields: dict[str, Any] = {"name": "ok", "source": "/m/ok", **changes}
    assert reason_of(validate.model_spec, common_pb2.ModelSpec(**fields)).reason == reason


def test_prompt_token_ids() -> None:
    assert reason_of(validate.prompt_token_ids, common_pb2.TokenIds()).reason == "EMPTY_PROMPT"
    validate.prompt_token_ids(common_pb2.TokenIds(ids=[1]))


# -- undecodable bodies (a stand-in context: the guard alone, without a server) -------------


class _AbortingContext:
    """Stands in for grpc.aio.ServicerContext: records the status the guard aborts with."""

    def __init__(self) -> None:
        self.status: grpc.Status | None = None

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise RuntimeError("aborted")

    def time_remaining(self) -> float | None:
        return None  # no deadline: the call is never over before its answer


def test_decode_guard_with_a_stand_in_context() -> None:
    async def servicer(request: Any, context: Any) -> Any:
        return scheduler_pb2.GetModelResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        servicer, request_deserializer=scheduler_pb2.GetModelRequest.FromString
    )

    async def continuation(details: Any) -> Any:
        return handler

    class Details:
        method = "/torpor.v1.Scheduler/GetModel"

    async def run() -> _AbortingContext:
        guarded = await DecodeGuard().intercept_service(continuation, Details())  # type: ignore[arg-type]
        request = guarded.request_deserializer(b"\xff\xff")
        assert isinstance(request, Undecodable) and request.method == "GetModel"
        good = guarded.request_deserializer(
            scheduler_pb2.GetModelRequest(name="a").SerializeToString()
        )
        assert good.name == "a"
        context = _AbortingContext()
        with pytest.raises(RuntimeError, match="aborted"):
            await guarded.unary_unary(request, context)
        return context

    context = asyncio.run(run())
    assert context.status is not None and context.status.code == grpc.StatusCode.INVALID_ARGUMENT


# -- unexpected errors are logged on one line, rate-limited ---------------------------------


def test_unexpected_errors_log_one_line_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc_status, "_last_logged", {})

    @rpc_status.aio_servicer_errors
    async def Broken(self: Any, request: Any, context: Any) -> Any:
        raise KeyError("boom")

    async def run() -> None:
        for _ in range(50):
            context = _AbortingContext()
            with pytest.raises(RuntimeError):
                await Broken(None, None, context)
            assert context.status is not None
            assert context.status.code == grpc.StatusCode.INTERNAL

    with capture_logs() as logs:
        asyncio.run(run())
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1 and errors[0]["event"] == "unexpected_error"
    assert "KeyError" in errors[0]["error"] and "exc_info" not in errors[0]
    traces = [entry for entry in logs if "exc_info" in entry]
    assert len(traces) == 1 and traces[0]["log_level"] == "debug"  # the traceback, at debug


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"prompt_text": "hi"}, "NO_TARGET"),
        ({"model": "", "prompt_text": "hi"}, "MODEL_REQUIRED"),
        ({"lease_id": "", "prompt_text": "hi"}, "LEASE_REQUIRED"),
        ({"model": "a"}, "EMPTY_PROMPT"),
        ({"model": "a", "prompt_text": ""}, "EMPTY_PROMPT"),
        ({"model": "a", "prompt_text": "hi", "priority": 101}, "BAD_PRIORITY"),
        ({"lease_id": "l", "prompt_text": "hi", "priority": -101}, "BAD_PRIORITY"),
    ],
)
def test_generate_requests(request_fields: dict[str, Any], reason: str) -> None:
    msg = scheduler_pb2.GenerateRequest(**request_fields)
    assert reason_of(validate.generate_request, msg).reason == reason


def test_a_good_generate_request_names_its_target() -> None:
    msg = scheduler_pb2.GenerateRequest(lease_id="l", prompt_token_ids=common_pb2.TokenIds(ids=[1]))
    assert validate.generate_request(msg) == "lease_id"


@pytest.mark.parametrize(
    ("prompt", "sampling", "reason"),
    [
        ([1, 100], {}, "TOKEN_OUT_OF_VOCAB"),
        ([1], {"top_k": 101}, "INVALID_SAMPLING"),
        ([1], {"stop_token_ids": [100]}, "INVALID_SAMPLING"),
        ([1] * 64, {}, "PROMPT_TOO_LONG"),
        ([1] * 60, {"max_tokens": 5}, "MAX_TOKENS_TOO_LARGE"),
        (None, {"max_tokens": 64}, "MAX_TOKENS_TOO_LARGE"),  # text: at least one token
    ],
)
def test_model_bounds(prompt: list[int] | None, sampling: dict[str, Any], reason: str) -> None:
    msg = scheduler_pb2.GenerateRequest(
        model="m", sampling=common_pb2.SamplingParams(**sampling), prompt_text="hi"
    )
    if prompt is not None:
        msg.prompt_token_ids.ids[:] = prompt
    limits = validate.ModelLimits(vocab_size=100, max_seq_len=64)
    assert reason_of(validate.for_model, msg, limits).reason == reason


def test_model_bounds_at_the_edges() -> None:
    msg = scheduler_pb2.GenerateRequest(
        model="m",
        prompt_token_ids=common_pb2.TokenIds(ids=[99] * 60),
        sampling=common_pb2.SamplingParams(max_tokens=4, top_k=100, stop_token_ids=[99]),
    )
    validate.for_model(msg, validate.ModelLimits(vocab_size=100, max_seq_len=64))
    msg.prompt_token_ids.ids.append(12345)  # an unknown vocabulary: the worker checks ids
    msg.sampling.max_tokens = 3
    validate.for_model(msg, validate.ModelLimits(vocab_size=0, max_seq_len=64))


def test_every_evict_mode_converts_and_no_other_number() -> None:
    from torpor.scheduler import convert
    from torpor.scheduler.core import EvictMode

    assert convert.evict_mode(admin_pb2.EVICT_MODE_UNSPECIFIED) is EvictMode.DRAIN
    assert convert.evict_mode(admin_pb2.EVICT_MODE_DRAIN) is EvictMode.DRAIN
    assert convert.evict_mode(admin_pb2.EVICT_MODE_ABORT) is EvictMode.ABORT
    assert reason_of(convert.evict_mode, 99).reason == "BAD_ENUM"


def chat_request(*roles: str) -> scheduler_pb2.GenerateRequest:
    messages = [common_pb2.ChatMessage(role=r, content="hi") for r in roles]
    return scheduler_pb2.GenerateRequest(
        model="m", prompt_chat=common_pb2.ChatPrompt(messages=messages)
    )


def test_a_chat_prompt_is_checked_before_it_queues() -> None:
    assert validate.generate_request(chat_request("system", "user", "assistant")) == "model"
    err = reason_of(validate.generate_request, chat_request("user", "tool"))
    assert err.reason == "INVALID_CHAT_ROLE"
    assert err.metadata["field"] == "prompt_chat.messages[1].role"
    assert reason_of(validate.generate_request, chat_request()).reason == "EMPTY_PROMPT"
    too_many = chat_request(*["user"] * 4097)
    assert reason_of(validate.generate_request, too_many).reason == "TOO_MANY_MESSAGES"


def test_a_chat_prompt_needs_a_model_with_a_template() -> None:
    msg = chat_request("user")
    validate.for_model(msg, validate.ModelLimits(vocab_size=100, max_seq_len=64, chat=True))
    with pytest.raises(FailedPrecondition) as err:
        validate.for_model(msg, validate.ModelLimits(vocab_size=100, max_seq_len=64))
    assert err.value.reason == "NO_CHAT_TEMPLATE"
