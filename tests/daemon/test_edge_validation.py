"""Every bad input gets a clear error (issue 12): each finding of the fuzz, sent to one real
torpord over its socket. Bad values are INVALID_ARGUMENT (or NOT_FOUND) with a stable reason,
never INTERNAL or UNKNOWN, and they are refused before anything moves."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest

from tests.daemon.conftest import MODELS, Torpord, call, footprint_bytes, start_torpord
from torpor.errors import InvalidArgument, NotFound, TorporError
from torpor.v1 import admin_pb2, common_pb2, scheduler_pb2

TIMEOUT = 60


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IO[bytes]]:
    with (tmp_path_factory.mktemp("edge-log") / "torpord.stderr").open("w+b") as f:
        yield f


@pytest.fixture(scope="module")
def tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, model_root: Path, log_file: IO[bytes], tcp_port: int
) -> Iterator[Torpord]:
    """One torpord for the module (one device that holds two of the three models), also on
    loopback TCP without tokens; its stderr goes to `log_file`."""
    state = tmp_path_factory.mktemp("edge") / "state"
    d = start_torpord(
        state,
        model_root,
        memory=int(2.5 * footprint_bytes(model_root)),
        stderr=log_file,
        TORPOR_DAEMON_LISTEN=f"127.0.0.1:{tcp_port}",
        TORPOR_DAEMON_TCP_AUTH="false",
    )
    for name in MODELS:
        d.register(name, model_root / name)
    yield d
    assert d.stop() == 0


def refused(method: Any, request: Any, reason: str | None = None) -> TorporError:
    """The error a call ends with; it must be INVALID_ARGUMENT (with `reason` if given)."""
    with pytest.raises(TorporError) as info:
        call(method, request, timeout=TIMEOUT)
    err = info.value
    assert isinstance(err, InvalidArgument), repr(err)
    if reason is not None:
        assert err.reason == reason, repr(err)
    return err


def generate(model: str = "alpha", **sampling: Any) -> scheduler_pb2.GenerateRequest:
    return scheduler_pb2.GenerateRequest(
        model=model,
        prompt_token_ids=common_pb2.TokenIds(ids=[1, 2, 3]),
        sampling=common_pb2.SamplingParams(**{"max_tokens": 2, **sampling}),
    )


# -- INTERNAL with the exception text -----------------------------------------------------


def test_source_path_too_long_is_invalid_argument(daemon: Torpord, model_root: Path) -> None:
    for source in (model_root / ("a" * 300), Path("/" + "a/" * 3000)):
        spec = common_pb2.ModelSpec(name="long", source=str(source))
        err = refused(daemon.scheduler.RegisterModel, scheduler_pb2.RegisterModelRequest(spec=spec))
        assert err.reason in {"INVALID_SOURCE_PATH", "SOURCE_PATH_TOO_LONG"}, repr(err)


def test_prefetch_of_an_unknown_model_is_not_found(daemon: Torpord) -> None:
    for wait in (False, True):
        request = scheduler_pb2.PrefetchRequest(model="nope", tier=common_pb2.TIER_HOST, wait=wait)
        with pytest.raises(NotFound):
            call(daemon.scheduler.Prefetch, request, timeout=TIMEOUT)


def test_unknown_event_kind_is_invalid_argument(daemon: Torpord) -> None:
    err = refused(daemon.admin.WatchEvents, admin_pb2.WatchEventsRequest(kinds=[99]), "BAD_ENUM")
    assert err.metadata["field"] == "kinds" and err.metadata["value"] == "99"


def test_after_id_beyond_any_event_id(daemon: Torpord) -> None:
    request = admin_pb2.WatchEventsRequest(after_id=2**64 - 1)
    err = refused(daemon.admin.WatchEvents, request, "BAD_EVENT_ID")
    assert err.metadata["value"] == str(2**64 - 1)
    # The largest id that can exist is fine: nothing to replay.
    assert call(daemon.admin.WatchEvents, admin_pb2.WatchEventsRequest(after_id=2**63 - 1)) == []


@pytest.mark.parametrize(("seconds", "nanos"), [(2**62, 0), (-(2**62), 0), (0, -5), (0, 10**9)])
def test_invalid_timestamps_are_invalid_argument(daemon: Torpord, seconds: int, nanos: int) -> None:
    watch = admin_pb2.WatchEventsRequest()
    watch.since.seconds, watch.since.nanos = seconds, nanos
    err = refused(daemon.admin.WatchEvents, watch, "BAD_TIMESTAMP")
    assert err.metadata["field"] == "since"
    acquire = scheduler_pb2.AcquireRequest(model="alpha")
    acquire.deadline.seconds, acquire.deadline.nanos = seconds, nanos
    err = refused(daemon.scheduler.Acquire, acquire, "BAD_TIMESTAMP")
    assert err.metadata["field"] == "deadline"


# -- UNKNOWN for undecodable request bodies -----------------------------------------------


@pytest.mark.parametrize(
    "method",
    ["/torpor.v1.Scheduler/GetModel", "/torpor.v1.Scheduler/Generate", "/torpor.v1.Admin/Evict"],
)
def test_undecodable_body_is_invalid_argument(daemon: Torpord, tcp_port: int, method: str) -> None:
    stream = method.endswith(("Generate", "Evict"))
    tcp = grpc.insecure_channel(f"127.0.0.1:{tcp_port}")
    with tcp:
        for channel in (daemon.channel, tcp):  # the Unix socket and the TCP endpoint
            raw = (channel.unary_stream if stream else channel.unary_unary)(method)
            with pytest.raises(TorporError) as info:
                call(raw, b"\xff\xff\xff\xff", timeout=TIMEOUT)
            assert isinstance(info.value, InvalidArgument), repr(info.value)
            assert info.value.reason == "UNDECODABLE_REQUEST"


# -- silently accepted ----------------------------------------------------------------------


@pytest.mark.parametrize("top_p", [1.5, -0.1, math.nan, math.inf])
def test_top_p_out_of_range(daemon: Torpord, top_p: float) -> None:
    err = refused(daemon.scheduler.Generate, generate(top_p=top_p), "INVALID_SAMPLING")
    assert err.metadata["field"] == "top_p"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", math.nan),
        ("temperature", -1.0),
        ("temperature", 101.0),
        ("temperature", math.inf),
        ("max_tokens", 2**32 - 1),
        ("top_logprobs", 6),
        ("top_logprobs", 2),  # without logprobs
    ],
)
def test_other_sampling_fields_out_of_range(daemon: Torpord, field: str, value: Any) -> None:
    err = refused(daemon.scheduler.Generate, generate(**{field: value}), "INVALID_SAMPLING")
    assert err.metadata["field"] == field


def test_too_many_stop_token_ids_and_strings(daemon: Torpord) -> None:
    err = refused(daemon.scheduler.Generate, generate(stop_token_ids=[1] * 10_000))
    assert err.metadata["field"] == "stop_token_ids" and err.metadata["value"] == "10000"
    err = refused(daemon.scheduler.Generate, generate(stop=["x"] * 17))
    assert err.metadata["field"] == "stop"
    err = refused(daemon.scheduler.Generate, generate(stop=["é" * 129]))  # 258 bytes
    assert err.metadata["field"] == "stop"
    err = refused(daemon.scheduler.Generate, generate(stop=[""]))
    assert err.metadata["field"] == "stop"


def test_priority_has_one_rule_everywhere(daemon: Torpord, model_root: Path) -> None:
    for priority in (2**31 - 1, -(2**31), 101, -101):
        request = generate()
        request.priority = priority
        refused(daemon.scheduler.Generate, request, "BAD_PRIORITY")
        explain = admin_pb2.ExplainRequest(model="alpha", priority=priority)
        refused(daemon.admin.Explain, explain, "BAD_PRIORITY")
        spec = common_pb2.ModelSpec(
            name="prio", source=str(model_root / "alpha"), priority=priority
        )
        refused(
            daemon.scheduler.RegisterModel,
            scheduler_pb2.RegisterModelRequest(spec=spec),
            "BAD_PRIORITY",
        )
        refused(
            daemon.scheduler.Acquire,
            scheduler_pb2.AcquireRequest(model="alpha", priority=priority),
            "BAD_PRIORITY",
        )
    with pytest.raises(NotFound):  # nothing was registered
        call(daemon.scheduler.GetModel, scheduler_pb2.GetModelRequest(name="prio"))


def test_evict_with_a_bad_mode_or_timeout(daemon: Torpord) -> None:
    daemon.generate("alpha", [1, 2], max_tokens=1)
    bad_mode = admin_pb2.EvictRequest(model="alpha", to_tier=common_pb2.TIER_HOST, mode=99)
    err = refused(daemon.admin.Evict, bad_mode, "BAD_ENUM")
    assert err.metadata["field"] == "mode"
    negative = admin_pb2.EvictRequest(model="alpha", to_tier=common_pb2.TIER_HOST)
    negative.drain_timeout.seconds = -5
    err = refused(daemon.admin.Evict, negative, "BAD_DURATION")
    assert err.metadata["field"] == "drain_timeout"
    drain = admin_pb2.DrainRequest(gpu=0, mode=99)
    refused(daemon.admin.Drain, drain, "BAD_ENUM")
    assert daemon.runtime("alpha").state == common_pb2.RUNTIME_STATE_RESIDENT  # nothing moved


def test_evict_naming_nothing(daemon: Torpord) -> None:
    request = admin_pb2.EvictRequest(to_tier=common_pb2.TIER_HOST)
    err = refused(daemon.admin.Evict, request, "MODEL_REQUIRED")
    assert err.metadata["field"] == "model"


def test_register_right_after_unregister(daemon: Torpord, model_root: Path) -> None:
    """Unregister answers once the model is forgotten, worker stopped included, so the name
    is free at once."""
    for _ in range(2):
        daemon.register("delta", model_root / "alpha")
        daemon.generate("delta", [1, 2], max_tokens=1)  # it has a worker now
        call(
            daemon.scheduler.UnregisterModel,
            scheduler_pb2.UnregisterModelRequest(name="delta", delete_snapshots=True),
        )
    daemon.register("delta", model_root / "alpha")
    call(
        daemon.scheduler.UnregisterModel,
        scheduler_pb2.UnregisterModelRequest(name="delta", delete_snapshots=True),
    )


# -- validated too late ---------------------------------------------------------------------


def test_sampling_is_checked_before_anything_moves(daemon: Torpord) -> None:
    daemon.generate("alpha", [1, 2], max_tokens=1)
    daemon.generate("beta", [1, 2], max_tokens=1)  # the device now holds alpha and beta
    before = {r.model: r.state for r in daemon.residency().runtimes}
    assert before["gamma"] != common_pb2.RUNTIME_STATE_RESIDENT
    err = refused(daemon.scheduler.Generate, generate("gamma", temperature=math.nan))
    after = {r.model: r.state for r in daemon.residency().runtimes}
    assert after == before  # nothing was evicted, nothing loaded
    assert err.reason == "INVALID_SAMPLING" and err.metadata["field"] == "temperature"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"top_k": 5000}, "INVALID_SAMPLING"),  # the demo models' vocabulary is 1024
        ({"stop_token_ids": [1024]}, "INVALID_SAMPLING"),
        ({"prompt": [7, 1024]}, "TOKEN_OUT_OF_VOCAB"),
        ({"prompt": [1] * 256}, "PROMPT_TOO_LONG"),  # max_seq_len is 256
        ({"max_tokens": 254}, "MAX_TOKENS_TOO_LARGE"),  # 3 prompt tokens + 254 > 256
    ],
)
def test_model_bounds_are_checked_before_anything_moves(
    daemon: Torpord, changes: dict[str, Any], reason: str
) -> None:
    """What only the model bounds (its vocabulary, its max_seq_len) is checked at the edge
    too, from what torpord read at registration: nothing is evicted or loaded first."""
    daemon.generate("alpha", [1, 2], max_tokens=1)
    daemon.generate("beta", [1, 2], max_tokens=1)
    before = {r.model: r.state for r in daemon.residency().runtimes}
    request = generate("gamma", **{k: v for k, v in changes.items() if k != "prompt"})
    if "prompt" in changes:
        request.prompt_token_ids.ids[:] = changes["prompt"]
    refused(daemon.scheduler.Generate, request, reason)
    assert {r.model: r.state for r in daemon.residency().runtimes} == before


# -- the log -------------------------------------------------------------------------------


def test_malformed_requests_do_not_flood_the_log(daemon: Torpord, log_file: IO[bytes]) -> None:
    start = log_file.seek(0, 2)
    raw_unary = daemon.channel.unary_unary("/torpor.v1.Scheduler/GetModel")
    raw_stream = daemon.channel.unary_stream("/torpor.v1.Admin/WatchEvents")
    bad_since = admin_pb2.WatchEventsRequest()
    bad_since.since.nanos = -1
    for i in range(60):
        for method, request in (
            (raw_unary, bytes([0xFF, i % 256, 0xFF])),
            (raw_stream, b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
            (daemon.admin.WatchEvents, admin_pb2.WatchEventsRequest(kinds=[1000 + i])),
            (daemon.admin.WatchEvents, bad_since),
            (daemon.scheduler.Generate, generate(top_p=math.nan)),
            (daemon.scheduler.Prefetch, scheduler_pb2.PrefetchRequest(model=f"nope{i}")),
        ):
            with pytest.raises(TorporError):
                call(method, request, timeout=TIMEOUT)
    log_file.seek(start)
    added = log_file.read().decode(errors="replace")
    assert "Traceback" not in added
    assert len(added.splitlines()) <= 10, added[:4000]
    log_file.seek(0)
    assert "Traceback" not in log_file.read().decode(errors="replace")
    health = call(daemon.admin.GetStatus, admin_pb2.GetStatusRequest())
    assert health.models >= len(MODELS)
