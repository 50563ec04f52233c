"""The worker process as torpord sees it: a real `torpor-worker` subprocess on a Unix socket,
driven through the generated gRPC stubs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers import assert_eventually
from torpor.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from torpor.rpc_status import from_rpc_error
from torpor.store.chunks import ChunkRef, ChunkStore
from torpor.store.snapshot_manifest import SnapshotManifest
from torpor.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from torpor.worker.engine.demo import DemoSpec, make_demo
from torpor.worker.engine.engine import Engine
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest
from torpor.worker.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo(tmp_path_factory.mktemp("w") / "m", DemoSpec(layers=2, hidden=128, vocab=512))


class Worker:
    """A torpor-worker subprocess and a stub connected to it."""

    def __init__(self, root: Path, store: Path) -> None:
        self.socket = root / "w.sock"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.worker.main",
                "--socket",
                str(self.socket),
                "--store",
                str(store),
                "--device",
                "cpu",
                "--handle-size",
                "2MiB",
                "--log-level",
                "warning",
            ],
        )
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        grpc.channel_ready_future(self.channel).result(timeout=60)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    def call(self, method: str, request: object) -> object:
        try:
            result = getattr(self.stub, method)(request, timeout=120)
            return (
                list(result)
                if isinstance(result, Iterator) or hasattr(result, "__next__")
                else result
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(grpc.RpcError):  # it may be on its way out already
                self.stub.Shutdown(worker_pb2.WorkerShutdownRequest(), timeout=30)
            self.proc.wait(timeout=30)
        self.channel.close()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path, tmp_path / "store")
    yield w
    w.close()


def load(worker: Worker, model_dir: Path) -> list[worker_pb2.WorkerLoadResponse]:
    return worker.call(
        "Load",
        worker_pb2.WorkerLoadRequest(
            model="demo",
            source=common_pb2.TIER_SOURCE,
            model_dir=str(model_dir),
            model_roots=[str(model_dir)],
            max_batch=4,
            max_seq_len=256,
            target=common_pb2.RUNTIME_STATE_RESIDENT,
            keep_host_copy=True,
        ),
    )


def resume_request(tier: int) -> worker_pb2.WorkerResumeRequest:
    """Resume from `tier` to the GPU, keeping the host copy (what torpord asks by default)."""
    return worker_pb2.WorkerResumeRequest(
        source=tier, target=common_pb2.RUNTIME_STATE_RESIDENT, keep_host_copy=True
    )


def generate(worker: Worker, ids: list[int], **sampling: object) -> list[common_pb2.GenerateChunk]:
    params = common_pb2.SamplingParams(max_tokens=12, **sampling)
    return worker.call(
        "Generate",
        worker_pb2.WorkerGenerateRequest(
            request_id="r", prompt_token_ids=common_pb2.TokenIds(ids=ids), sampling=params
        ),
    )


def tokens(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def test_load_generate_suspend_resume(worker: Worker, model_dir: Path) -> None:
    events = load(worker, model_dir)
    assert events[-1].HasField("done")
    assert any(e.HasField("progress") for e in events)
    assert events[-1].done.status.state == common_pb2.RUNTIME_STATE_RESIDENT
    chunks = generate(worker, [1, 2, 3, 4], temperature=0, ignore_eos=True)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12 and usage.finish_reason == common_pb2.FINISH_REASON_LENGTH
    expected = Engine.load(model_dir, EngineOptions(max_batch=4, max_seq_len=256)).generate_all(
        [
            GenerationRequest(
                "x", (1, 2, 3, 4), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
            )
        ]
    )[0]
    assert tokens(chunks) == list(expected.token_ids)
    assert "".join(c.text for c in chunks) == expected.text

    for tier in (common_pb2.TIER_HOST, common_pb2.TIER_DISK):
        reply = worker.call("Suspend", worker_pb2.WorkerSuspendRequest(level=tier))
        assert reply.state in (
            common_pb2.RUNTIME_STATE_SUSPENDED_HOST,
            common_pb2.RUNTIME_STATE_SUSPENDED_DISK,
        )
        status = worker.call("Status", worker_pb2.WorkerStatusRequest())
        assert all(a.mapped_bytes == 0 for a in status.arenas)
        with pytest.raises(FailedPrecondition, match="resume it first"):
            generate(worker, [1, 2, 3])
        resumed = worker.call("Resume", resume_request(tier))
        done = resumed[-1].done
        assert done.tier == tier and done.bytes > 0
        assert not done.streamed  # streamed resumes need a locked host copy on a GPU
        assert done.copy.ToTimedelta() > done.checkpoint_restore.ToTimedelta()  # none: not deep
        assert done.total.ToTimedelta() >= done.copy.ToTimedelta() + done.map.ToTimedelta()
        assert tokens(generate(worker, [1, 2, 3, 4], temperature=0, ignore_eos=True)) == tokens(
            chunks
        )


def test_errors_have_their_codes(worker: Worker, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="Load first"):
        generate(worker, [1])
    with pytest.raises(InvalidArgument, match=r"no config\.json"):
        worker.call(
            "Load",
            worker_pb2.WorkerLoadRequest(
                model="x",
                source=common_pb2.TIER_SOURCE,
                model_dir=str(tmp_path),
                model_roots=[str(tmp_path)],
                target=common_pb2.RUNTIME_STATE_RESIDENT,
            ),
        )
    load(worker, model_dir)
    with pytest.raises(FailedPrecondition, match="already holds a runtime"):
        load(worker, model_dir)
    with pytest.raises(InvalidArgument, match="temperature"):
        generate(worker, [1, 2], temperature=-1)
    with pytest.raises(InvalidArgument, match="out of the vocabulary"):
        generate(worker, [1, 10_000])
    with pytest.raises(InvalidArgument, match="not TIER_DROP"):
        worker.call("Suspend", worker_pb2.WorkerSuspendRequest(level=common_pb2.TIER_DROP))


def test_snapshot_then_restore_in_a_new_worker(tmp_path: Path, model_dir: Path) -> None:
    store = tmp_path / "store"
    first = Worker(tmp_path / "a", store)
    try:
        load(first, model_dir)
        expected = tokens(generate(first, [5, 6, 7], temperature=0.9, seed=4, ignore_eos=True))
        done = first.call("Snapshot", worker_pb2.WorkerSnapshotRequest())[-1].done
        assert done.bytes > 0 and done.bytes_written == done.bytes
        again = first.call("Snapshot", worker_pb2.WorkerSnapshotRequest())[-1].done
        assert again.bytes_written == 0 and again.snapshot_id == done.snapshot_id
    finally:
        first.close()
    second = Worker(tmp_path / "b", store)
    try:
        events = second.call(
            "Load",
            worker_pb2.WorkerLoadRequest(
                model="demo",
                source=common_pb2.TIER_DISK,
                snapshot_id=done.snapshot_id,
                target=common_pb2.RUNTIME_STATE_RESIDENT,
                keep_host_copy=True,
            ),
        )
        assert events[-1].done.status.snapshot_id == done.snapshot_id
        assert (
            tokens(generate(second, [5, 6, 7], temperature=0.9, seed=4, ignore_eos=True))
            == expected
        )
    finally:
        second.close()


def test_snapshot_reply_carries_what_torpord_records(tmp_path: Path, model_dir: Path) -> None:
    """Done names the fingerprint and every chunk (manifest first) with its size, exactly as
    the manifest (parsed with the one shared schema) references them: torpord records the
    snapshot from the reply, never reading the manifest back (issue 13)."""
    worker = Worker(tmp_path / "a", tmp_path / "store")
    try:
        load(worker, model_dir)
        done = worker.call("Snapshot", worker_pb2.WorkerSnapshotRequest())[-1].done
    finally:
        worker.close()
    chunks = ChunkStore(tmp_path / "store")
    refs = [ChunkRef(c.hash, c.size) for c in done.chunk_refs]
    assert refs[0].hash == done.manifest_hash
    manifest = SnapshotManifest.loads(chunks.read(refs[0]).decode())
    assert done.fingerprint == manifest.fingerprint
    assert refs[1:] == manifest.chunks
    assert all(chunks.has(ref) for ref in refs)


def test_snapshot_stays_within_the_reservation(tmp_path: Path, model_dir: Path) -> None:
    """A reservation smaller than the snapshot's new bytes: RESOURCE_EXHAUSTED before the
    chunk that would pass it, at most the reserved bytes on disk, the runtime still
    serving; with enough reserved, the same snapshot completes."""
    store = tmp_path / "store"
    worker = Worker(tmp_path / "a", store)
    try:
        load(worker, model_dir)
        limit = 4096
        with pytest.raises(ResourceExhausted) as err:
            worker.call("Snapshot", worker_pb2.WorkerSnapshotRequest(reserved_bytes=limit))
        assert err.value.reason == "SNAPSHOT_OVER_RESERVATION"
        written = sum(p.stat().st_size for p in (store / "chunks").rglob("*") if p.is_file())
        assert written <= limit
        status = worker.call("Status", worker_pb2.WorkerStatusRequest())
        assert status.state == common_pb2.RUNTIME_STATE_RESIDENT and not status.snapshot_id
        assert tokens(generate(worker, [5, 6, 7]))
        enough = worker_pb2.WorkerSnapshotRequest(reserved_bytes=1 << 30)
        assert worker.call("Snapshot", enough)[-1].done.chunk_refs
    finally:
        worker.close()


def test_client_disconnect_aborts_the_request(worker: Worker, model_dir: Path) -> None:
    load(worker, model_dir)
    params = common_pb2.SamplingParams(max_tokens=240, temperature=0, ignore_eos=True)
    call = worker.stub.Generate(
        worker_pb2.WorkerGenerateRequest(
            request_id="gone", prompt_token_ids=common_pb2.TokenIds(ids=[1, 2]), sampling=params
        )
    )
    next(call)
    call.cancel()
    assert_eventually(
        lambda: worker.call("Status", worker_pb2.WorkerStatusRequest()),
        lambda status: status.active_requests == 0,
    )


def test_a_suspend_with_abort_fails_the_running_generate(worker: Worker, model_dir: Path) -> None:
    """An eviction's abort is an error for the caller, not a request that finished short."""
    load(worker, model_dir)
    params = common_pb2.SamplingParams(max_tokens=240, temperature=0, ignore_eos=True)
    call = worker.stub.Generate(
        worker_pb2.WorkerGenerateRequest(
            request_id="evicted", prompt_token_ids=common_pb2.TokenIds(ids=[1, 2]), sampling=params
        )
    )
    streamed = [next(call)]
    worker.call("Suspend", worker_pb2.WorkerSuspendRequest(level=common_pb2.TIER_HOST, abort=True))
    with pytest.raises(grpc.RpcError) as info:
        streamed += list(call)
    assert info.value.code() == grpc.StatusCode.ABORTED
    error = from_rpc_error(info.value)
    assert error.reason == "REQUEST_ABORTED"
    assert all(not c.HasField("usage") for c in streamed)  # no chunk said it had finished
    worker.call("Resume", resume_request(common_pb2.TIER_HOST))


def test_sigterm_stops_the_worker(worker: Worker) -> None:
    import signal

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0
    assert not worker.socket.exists()


def test_generate_returns_token_logprobs_only_when_asked(worker: Worker, model_dir: Path) -> None:
    load(worker, model_dir)
    plain = generate(worker, [1, 2, 3, 4], temperature=0, ignore_eos=True)
    assert all(not c.logprobs and not c.token_logprobs for c in plain)

    chunks = generate(
        worker, [1, 2, 3, 4], temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3
    )
    assert tokens(chunks) == tokens(plain)
    tokenizer = Engine.load(model_dir, EngineOptions(max_batch=1, max_seq_len=64)).tokenizer
    assert tokenizer is not None
    for chunk in chunks:
        assert len(chunk.token_logprobs) == len(chunk.token_ids) == len(chunk.logprobs)
        for token, logprob, entry in zip(
            chunk.token_ids, chunk.logprobs, chunk.token_logprobs, strict=True
        ):
            assert entry.chosen.token_id == token and entry.chosen.logprob == logprob
            assert entry.chosen.token_bytes == tokenizer.token_bytes(token)
            assert len(entry.top) == 3
            assert entry.top[0].token_id == token and entry.top[0].logprob == logprob  # greedy
            assert [t.logprob for t in entry.top] == sorted(
                (t.logprob for t in entry.top), reverse=True
            )
            assert all(t.token_bytes == tokenizer.token_bytes(t.token_id) for t in entry.top)
    generated = b"".join(e.chosen.token_bytes for c in chunks for e in c.token_logprobs)
    assert generated.decode(errors="replace") == "".join(c.text for c in chunks)

    only_chosen = generate(worker, [1, 2, 3], temperature=0, ignore_eos=True, logprobs=True)
    assert all(not e.top for c in only_chosen for e in c.token_logprobs)
    assert sum(len(c.token_logprobs) for c in only_chosen) == 12

    with pytest.raises(InvalidArgument, match="top_logprobs") as info:
        generate(worker, [1, 2], top_logprobs=2)  # without logprobs
    assert info.value.metadata["field"] == "top_logprobs"
    with pytest.raises(InvalidArgument, match="top_logprobs"):
        generate(worker, [1, 2], logprobs=True, top_logprobs=6)
