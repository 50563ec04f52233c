"""Exchange swap between two real `torpor-worker` processes on the CPU backend, through
Worker.Exchange and a board file both map (the way torpord drives it): the runtimes trade
places, serve the same tokens, and an exchange that cannot finish ends in a deadline, from
which the exchange the other way brings both back."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from tests.worker.test_worker_service import Worker, generate, tokens
from torpor.errors import DeadlineExceeded, InvalidArgument, TorporError
from torpor.exchange_board import Board
from torpor.v1 import common_pb2, worker_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

MiB = 1 << 20
PROMPT = [5, 9, 17, 33, 65]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("xrpc")
    return (
        make_demo(root / "a", DemoSpec(layers=3, hidden=256, vocab=512, seed=1)),
        make_demo(root / "b", DemoSpec(layers=2, hidden=192, heads=3, kv_heads=1, seed=2)),
    )


@pytest.fixture
def workers(tmp_path: Path, models: tuple[Path, Path]) -> Iterator[tuple[Worker, Worker]]:
    a = Worker(tmp_path / "a", tmp_path / "store")
    b = Worker(tmp_path / "b", tmp_path / "store")
    try:
        for worker, model_dir in ((a, models[0]), (b, models[1])):
            worker.call(
                "Load",
                worker_pb2.WorkerLoadRequest(
                    model=model_dir.name,
                    source=common_pb2.TIER_SOURCE,
                    model_dir=str(model_dir),
                    model_roots=[str(model_dir)],
                    max_batch=2,
                    max_seq_len=128,
                    target=common_pb2.RUNTIME_STATE_RESIDENT,
                    keep_host_copy=False,  # host RAM holds one copy: the other's
                ),
            )
        yield a, b
    finally:
        a.close()
        b.close()


def exchange(
    out: Worker, into: Worker, board: Path, host_slack: int, gpu_slack: int, timeout_s: float = 30
) -> dict[str, object]:
    """Both sides at once; each side's reply or the error it raised."""
    Board.create(board, host_slack, gpu_slack).close()
    results: dict[str, object] = {}

    def side(name: str, worker: Worker, value: int) -> None:
        try:
            results[name] = worker.call(
                "Exchange",
                worker_pb2.WorkerExchangeRequest(
                    side=value,
                    board_path=str(board),
                    timeout=Duration(seconds=int(timeout_s), nanos=int(timeout_s % 1 * 1e9)),
                ),
            )
        except TorporError as exc:
            results[name] = exc

    threads = [
        threading.Thread(target=side, args=("out", out, worker_pb2.EXCHANGE_SIDE_OUT)),
        threading.Thread(target=side, args=("in", into, worker_pb2.EXCHANGE_SIDE_IN)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    board.unlink()
    return results


def state(worker: Worker) -> int:
    return worker.call("Status", worker_pb2.WorkerStatusRequest()).state


def test_two_workers_trade_places_and_keep_their_tokens(workers, tmp_path: Path) -> None:
    a, b = workers
    want_a = tokens(generate(a, PROMPT))
    want_b = tokens(generate(b, PROMPT))
    # b goes to host first, the ordinary way (it then holds the one host copy).
    b.call("Suspend", worker_pb2.WorkerSuspendRequest(level=common_pb2.TIER_HOST))
    resident, waiting = a, b
    for n in range(4):
        results = exchange(resident, waiting, tmp_path / f"board{n}", 32 * MiB, 64 * MiB)
        out, into = results["out"], results["in"]
        assert isinstance(out, worker_pb2.WorkerExchangeResponse), out
        assert isinstance(into, worker_pb2.WorkerExchangeResponse), into
        assert out.state == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
        assert into.state == common_pb2.RUNTIME_STATE_RESIDENT
        assert out.bytes > 0 and into.bytes > 0 and out.steps > 0
        resident, waiting = waiting, resident
        status = waiting.call("Status", worker_pb2.WorkerStatusRequest())
        assert status.gpu_bytes == 0 and status.host_bytes > 0
        assert resident.call("Status", worker_pb2.WorkerStatusRequest()).host_bytes == 0
        want = want_a if resident is a else want_b
        assert tokens(generate(resident, PROMPT)) == want, n


def test_an_exchange_without_room_ends_in_a_deadline_and_is_rolled_back(
    workers, tmp_path: Path
) -> None:
    a, b = workers
    want_a = tokens(generate(a, PROMPT))
    b.call("Suspend", worker_pb2.WorkerSuspendRequest(level=common_pb2.TIER_HOST))
    # No host slack: a can copy nothing out, so b never gets the room it needs.
    results = exchange(a, b, tmp_path / "stuck", 0, 0, timeout_s=1.5)
    assert any(isinstance(r, DeadlineExceeded) for r in results.values()), results
    assert state(a) == common_pb2.RUNTIME_STATE_SUSPENDING  # part way: torpord finishes it
    # The exchange the other way: b back out to host, a back in.
    results = exchange(b, a, tmp_path / "back", 32 * MiB, 64 * MiB)
    assert all(isinstance(r, worker_pb2.WorkerExchangeResponse) for r in results.values())
    assert state(a) == common_pb2.RUNTIME_STATE_RESIDENT
    assert state(b) == common_pb2.RUNTIME_STATE_SUSPENDED_HOST
    assert tokens(generate(a, PROMPT)) == want_a


@pytest.mark.parametrize(
    ("request_fields", "needle"),
    [
        ({"side": 0, "board_path": "/tmp/x", "timeout": Duration(seconds=1)}, "side"),
        ({"side": 1, "board_path": "relative", "timeout": Duration(seconds=1)}, "absolute"),
        ({"side": 1, "board_path": "/tmp/x"}, "timeout"),
        ({"side": 1, "board_path": "/nonexistent/board", "timeout": Duration(seconds=1)}, "no "),
    ],
)
def test_bad_exchange_requests_are_invalid_arguments(
    workers, request_fields: dict[str, object], needle: str
) -> None:
    a, _ = workers
    with pytest.raises(InvalidArgument) as info:
        a.call("Exchange", worker_pb2.WorkerExchangeRequest(**request_fields))
    assert info.value.reason == "BAD_EXCHANGE"
    assert needle in str(info.value)
    assert state(a) == common_pb2.RUNTIME_STATE_RESIDENT
