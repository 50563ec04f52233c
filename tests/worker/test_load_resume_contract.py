"""The typed Load and Resume contract between torpord and a worker (issue 13): the source,
the target and the host copy cross the wire as fields, and the worker does what they say. A
real `torpor-worker` subprocess on its Unix socket, driven through the generated stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import assert_eventually
from tests.worker.test_worker_service import Worker, generate, load, tokens
from torpor.errors import FailedPrecondition, InvalidArgument
from torpor.v1 import common_pb2, worker_pb2
from torpor.worker.engine.demo import DemoSpec, make_demo

RESIDENT = common_pb2.RUNTIME_STATE_RESIDENT
SUSPENDED_HOST = common_pb2.RUNTIME_STATE_SUSPENDED_HOST


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("w") / "m", DemoSpec(layers=2, hidden=128, vocab=512))


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path, tmp_path / "store")
    yield w
    w.close()


def status(worker: Worker) -> worker_pb2.WorkerStatusResponse:
    return worker.call("Status", worker_pb2.WorkerStatusRequest())


def suspend(worker: Worker, tier: int) -> worker_pb2.WorkerSuspendResponse:
    return worker.call("Suspend", worker_pb2.WorkerSuspendRequest(level=tier))


def resume(
    worker: Worker, source: int, target: int = RESIDENT, keep_host_copy: bool = True
) -> list[worker_pb2.WorkerResumeResponse]:
    request = worker_pb2.WorkerResumeRequest(
        source=source, target=target, keep_host_copy=keep_host_copy
    )
    return worker.call("Resume", request)


def expected_tokens(worker: Worker) -> list[int]:
    return tokens(generate(worker, [1, 2, 3, 4], temperature=0, ignore_eos=True))


def test_a_disk_resume_keeps_a_host_copy_only_when_asked(worker: Worker, model_dir: Path) -> None:
    """Resume.keep_host_copy reaches the worker: False pins nothing (the host budget counted
    nothing), and a later suspend to HOST then makes the copy on the eviction path."""
    load(worker, model_dir)
    expected = expected_tokens(worker)
    suspend(worker, common_pb2.TIER_DISK)
    copy = status(worker).disk_bytes  # the weights' bytes, as a host copy holds them
    assert status(worker).host_bytes == 0 and copy > 0

    resume(worker, common_pb2.TIER_DISK, keep_host_copy=False)
    assert status(worker).host_bytes == 0
    assert expected_tokens(worker) == expected
    assert status(worker).host_bytes == 0  # nothing was made in the background meanwhile

    # No copy: the suspend to HOST pins and copies now, as POLICY.md prices it.
    reply = suspend(worker, common_pb2.TIER_HOST)
    assert reply.state == SUSPENDED_HOST
    assert status(worker).host_bytes == copy
    resume(worker, common_pb2.TIER_HOST)
    assert expected_tokens(worker) == expected

    suspend(worker, common_pb2.TIER_DISK)
    resume(worker, common_pb2.TIER_DISK, keep_host_copy=True)
    assert_eventually(lambda: status(worker), lambda s: s.host_bytes == copy)
    assert expected_tokens(worker) == expected


def test_a_disk_resume_to_host_maps_no_arena(worker: Worker, model_dir: Path) -> None:
    """Prefetch(HOST) of a disk-suspended runtime: the snapshot's chunks go straight into the
    host copy in one call; no arena is mapped at any moment of it, and a later host resume
    serves the same tokens."""
    load(worker, model_dir)
    expected = expected_tokens(worker)
    suspend(worker, common_pb2.TIER_DISK)
    copy = status(worker).disk_bytes

    events = resume(worker, common_pb2.TIER_DISK, target=SUSPENDED_HOST)
    assert events[-1].done.tier == common_pb2.TIER_DISK
    assert events[-1].done.bytes == copy
    now = status(worker)
    assert now.state == SUSPENDED_HOST
    assert now.host_bytes == copy
    assert all(a.mapped_bytes == 0 for a in now.arenas)
    assert now.peak_mapped_bytes == 0  # nothing was mapped during the resume either

    resume(worker, common_pb2.TIER_HOST)
    assert status(worker).peak_mapped_bytes == sum(a.reserved_bytes for a in now.arenas)
    assert expected_tokens(worker) == expected


def test_a_load_to_host_ends_suspended_in_one_call(worker: Worker, model_dir: Path) -> None:
    """Prefetch(HOST) from the checkpoint: built on the device (graphs are captured there),
    then suspended to HOST with its host copy, inside the one Load call."""
    request = worker_pb2.WorkerLoadRequest(
        model="demo",
        source=common_pb2.TIER_SOURCE,
        model_dir=str(model_dir),
        model_roots=[str(model_dir)],
        max_batch=4,
        max_seq_len=256,
        target=SUSPENDED_HOST,
        keep_host_copy=True,
    )
    events = worker.call("Load", request)
    done = events[-1].done.status
    assert done.state == SUSPENDED_HOST
    assert all(a.mapped_bytes == 0 for a in done.arenas)
    assert done.peak_mapped_bytes == sum(a.reserved_bytes for a in done.arenas)
    weights = next(a.reserved_bytes for a in done.arenas if a.name == "weights")
    assert 0 < done.host_bytes <= weights
    resume(worker, common_pb2.TIER_HOST)
    assert status(worker).state == RESIDENT
    assert len(expected_tokens(worker)) == 12


def test_a_resume_from_the_wrong_tier_is_refused(worker: Worker, model_dir: Path) -> None:
    load(worker, model_dir)
    suspend(worker, common_pb2.TIER_HOST)
    with pytest.raises(FailedPrecondition) as info:
        resume(worker, common_pb2.TIER_DISK)
    assert info.value.metadata["state"] == "suspended_host"
    with pytest.raises(InvalidArgument):  # no tier given
        worker.call("Resume", worker_pb2.WorkerResumeRequest(target=RESIDENT))
    with pytest.raises(InvalidArgument):  # to host only from disk
        resume(worker, common_pb2.TIER_HOST, target=SUSPENDED_HOST)
    with pytest.raises(InvalidArgument):
        resume(worker, common_pb2.TIER_HOST, target=common_pb2.RUNTIME_STATE_SUSPENDED_DEEP)
    assert status(worker).state == SUSPENDED_HOST  # nothing changed
    resume(worker, common_pb2.TIER_HOST)
    assert status(worker).state == RESIDENT


BAD_LOADS: list[tuple[dict[str, object], str]] = [
    ({"target": common_pb2.RUNTIME_STATE_SUSPENDED_DEEP}, "SUSPENDED_DEEP"),
    ({"target": common_pb2.RUNTIME_STATE_UNSPECIFIED}, "target is required"),
    ({"source": common_pb2.TIER_HOST}, "not TIER_HOST"),
    ({"source": common_pb2.TIER_UNSPECIFIED}, "not TIER_UNSPECIFIED"),
    ({"source": common_pb2.TIER_DISK}, "needs snapshot_id"),
    ({"model_dir": ""}, "needs model_dir"),
    ({"target": SUSPENDED_HOST, "keep_host_copy": False}, "keeps its host copy"),
]


def test_a_bad_load_request_is_an_invalid_argument(worker: Worker, model_dir: Path) -> None:
    """Each refused request leaves the worker empty: it still loads afterwards."""
    for change, match in BAD_LOADS:
        fields: dict[str, object] = {
            "model": "demo",
            "source": common_pb2.TIER_SOURCE,
            "model_dir": str(model_dir),
            "model_roots": [str(model_dir)],
            "target": RESIDENT,
            "keep_host_copy": True,
            **change,
        }
        with pytest.raises(InvalidArgument, match=match):
            worker.call("Load", worker_pb2.WorkerLoadRequest(**fields))
        assert status(worker).state == common_pb2.RUNTIME_STATE_COLD, change
    load(worker, model_dir)
    assert status(worker).state == RESIDENT


def test_the_staging_limit_bounds_a_restore_from_disk(tmp_path: Path, model_dir: Path) -> None:
    """WorkerLoadRequest.staging_bytes, the host bytes torpord counted for this runtime's
    staging buffers: a limit smaller than one piece is refused before the read starts, and
    one that holds a piece is enough (the ring has fewer buffers, never larger ones)."""
    store = tmp_path / "store"
    first = Worker(tmp_path / "a", store)
    try:
        load(first, model_dir)
        expected = expected_tokens(first)
        done = first.call("Snapshot", worker_pb2.WorkerSnapshotRequest())[-1].done
        weights = status(first).disk_bytes
    finally:
        first.close()
    enough = -(-weights // 4096) * 4096  # no piece is larger than the weights

    def load_disk(worker: Worker, limit: int) -> None:
        request = worker_pb2.WorkerLoadRequest(
            model="demo",
            source=common_pb2.TIER_DISK,
            snapshot_id=done.snapshot_id,
            target=RESIDENT,
            keep_host_copy=False,
            staging_bytes=limit,
        )
        worker.call("Load", request)

    second = Worker(tmp_path / "b", store)
    try:
        with pytest.raises(InvalidArgument) as info:
            load_disk(second, 4096)  # smaller than its largest piece
        assert info.value.reason == "STAGING_TOO_SMALL"
        assert status(second).state == common_pb2.RUNTIME_STATE_COLD
        load_disk(second, enough)
        assert expected_tokens(second) == expected
        suspend(second, common_pb2.TIER_DISK)  # a resume from disk stages within it too
        resume(second, common_pb2.TIER_DISK, keep_host_copy=False)
        assert expected_tokens(second) == expected
        assert status(second).staging_bytes == 0  # the ring is gone once the read ends
    finally:
        second.close()
