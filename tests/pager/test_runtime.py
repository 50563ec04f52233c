"""Suspend and resume of a whole runtime at every level, on the CPU backend (real arenas:
mmap + memfd), with the engine serving before and after."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.pager import procfs
from torpor.errors import DataLoss, FailedPrecondition
from torpor.store.chunks import ChunkStore
from torpor.worker.engine.demo import DemoSpec, RandomFiller, make_demo
from torpor.worker.engine.options import EngineOptions
from torpor.worker.engine.requests import GenerationRequest, GenerationResult
from torpor.worker.engine.sampling import SamplingParams
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.cpu import CpuBackend
from torpor.worker.pager.host import HostBuffer
from torpor.worker.pager.paged_state import PagedState, SuspendLevel
from torpor.worker.pager.placement import PagerOptions
from torpor.worker.pager.runtime import PagedRuntime

MiB = 1 << 20
OPTIONS = EngineOptions(max_batch=4, max_seq_len=512)
PAGER = PagerOptions(device="cpu", handle_bytes=2 * MiB)
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # About 20 MiB of float32 weights: large enough that released memory shows in RSS.
    spec = DemoSpec(layers=4, hidden=512, heads=8, kv_heads=2, vocab=2048, seed=3)
    return make_demo(tmp_path_factory.mktemp("runtime") / "demo", spec)


@pytest.fixture
def runtime(model_dir: Path):
    rt = PagedRuntime.load(model_dir, OPTIONS, PAGER)
    yield rt
    rt.close()


def generate(rt: PagedRuntime, params: SamplingParams, name: str = "g") -> GenerationResult:
    assert rt.engine.tokenizer is not None
    prompt = tuple(rt.engine.tokenizer.encode("The scheduler wakes the model and"))
    stream = rt.loop.submit(GenerationRequest(name, prompt, params))
    return GenerationResult.collect(name, list(stream))


def addresses(rt: PagedRuntime) -> dict[str, int]:
    out = {name: t.data_ptr() for name, t in rt.engine.memory.weight_tensors.items()}
    out["kv"] = rt.engine.memory.kv_tensor.data_ptr()
    return out


@pytest.mark.parametrize("level", list(SuspendLevel))
def test_every_level_keeps_addresses_and_output(
    runtime: PagedRuntime, level: SuspendLevel, tmp_path: Path
) -> None:
    store = ChunkStore(tmp_path / "store")
    before = (generate(runtime, GREEDY), generate(runtime, SAMPLED, "s"))
    where = addresses(runtime)
    arena_bytes = runtime.memory().arena_bytes
    shmem = procfs.rss_shmem()

    runtime.suspend(level, store=store)
    assert runtime.residency.value == f"suspended_{level.value}"
    assert runtime.memory().arena_bytes == 0
    assert shmem - procfs.rss_shmem() >= 0.9 * arena_bytes  # the kernel got it back
    if level is SuspendLevel.DISK:
        assert runtime.memory().host_bytes == 0  # the host copy is released too

    report = runtime.resume()
    assert report.tier == level.value and report.bytes == runtime.engine.memory.weights.nbytes
    assert addresses(runtime) == where
    assert not runtime.engine.memory.kv_tensor.any()  # KV comes back zeroed
    after = (generate(runtime, GREEDY), generate(runtime, SAMPLED, "s"))
    for a, b in zip(before, after, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == b.logprobs  # bit-identical


def test_hundred_cycles_leak_nothing(runtime: PagedRuntime) -> None:
    runtime.wait_host_copy()
    runtime.suspend(SuspendLevel.HOST)
    runtime.resume()
    base = (procfs.rss_shmem(), procfs.rss_anon(), procfs.open_fds())
    for _ in range(100):
        runtime.suspend(SuspendLevel.HOST)
        runtime.resume()
    shmem, anon, fds = procfs.rss_shmem(), procfs.rss_anon(), procfs.open_fds()
    assert fds == base[2]
    assert abs(shmem - base[0]) < 2 * MiB
    assert anon - base[1] < 8 * MiB
    assert generate(runtime, GREEDY).finish.value == "length"


def test_busy_runtime_is_not_suspended_unless_aborted(runtime: PagedRuntime) -> None:
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    prompt = tuple(runtime.engine.encode("hello"))
    stream = iter(runtime.loop.submit(GenerationRequest("busy", prompt, long)))
    next(stream)  # it is running
    with pytest.raises(FailedPrecondition, match="serving 1 requests") as info:
        runtime.suspend(SuspendLevel.HOST)
    assert info.value.reason == "RUNTIME_BUSY"
    assert runtime.residency is PagedState.RESIDENT
    report = runtime.suspend(SuspendLevel.HOST, abort=True)
    assert report.requests_aborted == 1
    rest = list(stream)
    assert rest[-1].finish is not None and rest[-1].finish.value == "abort"
    runtime.resume()
    assert generate(runtime, GREEDY).finish.value == "length"


def test_wrong_state_is_refused(runtime: PagedRuntime) -> None:
    with pytest.raises(FailedPrecondition, match="cannot resume a runtime that is resident"):
        runtime.resume()
    runtime.suspend(SuspendLevel.HOST)
    with pytest.raises(FailedPrecondition, match="cannot suspend"):
        runtime.suspend(SuspendLevel.HOST)  # not further down
    runtime.resume()


@pytest.mark.parametrize(
    "path",
    [
        (SuspendLevel.HOST, SuspendLevel.DISK),
        (SuspendLevel.HOST, SuspendLevel.DEEP, SuspendLevel.DISK),
    ],
)
def test_a_suspended_runtime_moves_further_down(
    runtime: PagedRuntime, tmp_path: Path, path: tuple[SuspendLevel, ...]
) -> None:
    store = ChunkStore(tmp_path / "store")
    before = generate(runtime, GREEDY)
    for level in path:
        runtime.suspend(level, store=store)
        assert runtime.residency.value == f"suspended_{level.value}"
    assert runtime.memory().host_bytes == 0 and runtime.manifest is not None
    assert runtime.resume().tier == "disk"
    assert generate(runtime, GREEDY).token_ids == before.token_ids


def test_a_suspend_waits_for_the_host_copy_it_would_unmap_under(
    runtime: PagedRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk resume restarts the background host copy; a disk suspend right after must not
    unmap the weights while that copy still reads them."""
    store = ChunkStore(tmp_path / "store")
    runtime.suspend(SuspendLevel.DISK, store=store)
    seen: list[bool] = []
    copying = threading.Event()
    original = HostBuffer.copy_from

    def slow_copy(self: HostBuffer, arena: Arena) -> None:
        copying.set()
        time.sleep(0.3)
        original(self, arena)
        seen.append(arena.is_mapped)

    monkeypatch.setattr(HostBuffer, "copy_from", slow_copy)
    runtime.resume()
    assert copying.wait(5)
    runtime.suspend(SuspendLevel.DISK, store=store)  # while the copy is under way
    assert seen == [True]  # the copy finished on a mapped arena
    assert runtime.memory().host_bytes == 0


def test_the_background_host_copy_gives_way_to_requests(
    runtime: PagedRuntime, tmp_path: Path
) -> None:
    """A disk resume starts the host copy again; it waits while a request is served (on a
    GPU its pinning would stall the request's kernel launches) and runs once it is done."""
    runtime.suspend(SuspendLevel.DISK, store=ChunkStore(tmp_path / "store"))
    assert not runtime.loop.busy()
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    prompt = tuple(range(1, 9))
    stream = iter(runtime.loop.submit(GenerationRequest("long", prompt, long)))
    assert not runtime.loop.busy()  # queued on a paused loop: nothing is being served
    runtime.resume()
    next(stream)
    assert runtime.loop.busy()
    time.sleep(0.2)
    assert runtime.host is None  # still giving way
    rest = list(stream)
    assert rest[-1].finish is not None
    assert runtime.wait_host_copy() is not None


def test_a_disk_suspend_cancels_a_host_copy_still_waiting(
    runtime: PagedRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk suspend throws the host copy away: one still being made is cancelled, not
    waited for (on a GPU, pinning 16 GB took 4 s that a disk suspend would have paid)."""
    store = ChunkStore(tmp_path / "store")
    runtime.suspend(SuspendLevel.DISK, store=store)
    monkeypatch.setattr(runtime.loop, "busy", lambda: True)  # the copy keeps giving way
    runtime.resume()
    time.sleep(0.1)
    assert runtime.host is None
    start = time.monotonic()
    runtime.suspend(SuspendLevel.DISK, store=store)
    assert time.monotonic() - start < 2
    assert runtime.host is None and runtime.memory().host_bytes == 0
    monkeypatch.undo()
    runtime.resume()
    assert runtime.wait_host_copy() is not None  # made again after the next resume


def test_snapshot_is_written_once(runtime: PagedRuntime, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    first = runtime.snapshot(store)
    assert first.new_bytes == runtime.engine.memory.weights.nbytes - _padding(runtime)
    second = runtime.snapshot(store)
    assert second.new_bytes == 0  # same weights: no new bytes
    assert second.manifest.pieces == first.manifest.pieces
    assert set(first.manifest.files) >= {"config.json", "tokenizer.json"}


def _padding(rt: PagedRuntime) -> int:
    layout = rt.engine.memory.weights
    return layout.nbytes - sum(e.spec.nbytes for e in layout.entries)


def test_flipped_byte_never_reaches_the_runtime(runtime: PagedRuntime, tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "store")
    runtime.snapshot(store)
    runtime.suspend(SuspendLevel.DISK, store=store)
    assert runtime.manifest is not None
    victim = max(runtime.manifest.pieces, key=lambda p: p.ref.size)
    path = store.path(victim.ref.hash)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss) as info:
        runtime.resume()
    assert info.value.reason == "CHUNK_CORRUPT"
    assert runtime.residency is PagedState.SUSPENDED_DISK  # not serving from bad bytes
    assert not runtime.placement.arenas["weights"].is_mapped


def test_stream_never_copies_an_unverified_chunk(runtime: PagedRuntime, tmp_path: Path) -> None:
    from torpor.worker.pager.stream import StagingRing, stream_pieces

    store = ChunkStore(tmp_path / "store")
    manifest = runtime.snapshot(store).manifest
    victim = manifest.pieces[len(manifest.pieces) // 2]
    path = store.path(victim.ref.hash)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    dst = torch.full((manifest.weights["nbytes"],), 0xAA, dtype=torch.uint8)
    ring = StagingRing(3, 64 * MiB, None)
    try:
        with pytest.raises(DataLoss):
            stream_pieces(manifest.pieces, store, dst, ring, threads=3, direct_io=True)
    finally:
        ring.close()
    window = dst[victim.offset : victim.offset + victim.ref.size]
    assert bool((window == 0xAA).all())


def _child(*args: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tests.pager.restore_child", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_new_worker_restores_from_snapshot_without_the_checkpoint(
    model_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    source = tmp_path / "source"
    shutil.copytree(model_dir, source)
    store = tmp_path / "store"
    _child("snapshot", str(source), str(store), str(tmp_path / "a.json"))
    original = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(original["manifest"]))
    shutil.rmtree(source)  # the restore must not need the source checkpoint
    _child(
        "restore",
        str(tmp_path / "manifest.json"),
        str(store),
        str(tmp_path / "w"),
        str(tmp_path / "b.json"),
    )
    restored = json.loads((tmp_path / "b.json").read_text())
    assert restored["tokens"] == original["tokens"]
    assert restored["logprobs"] == original["logprobs"]
    # A fresh process has the recorded ranges free: the arenas land where they were.
    assert restored["honored"] == {"weights": True, "kv": True}
    assert restored["addresses"] == original["manifest"]["addresses"]


def test_incompatible_snapshot_is_refused(runtime: PagedRuntime, tmp_path: Path) -> None:
    import dataclasses

    from torpor.worker.pager.manifest import SnapshotManifest

    store = ChunkStore(tmp_path / "store")
    manifest = runtime.snapshot(store).manifest
    other = dataclasses.replace(
        manifest, environment=dataclasses.replace(manifest.environment, torch="1.0")
    )
    with pytest.raises(FailedPrecondition, match=r"torch version: snapshot 1\.0") as info:
        PagedRuntime.restore(other, store, tmp_path / "w", PAGER)
    assert info.value.reason == "SNAPSHOT_INCOMPATIBLE"
    roundtrip = SnapshotManifest.loads(manifest.dumps())
    assert roundtrip == manifest


def test_random_weights_need_no_checkpoint_and_page_like_any(
    model_dir: Path, tmp_path: Path
) -> None:
    """The benchmarks' 70B-shaped runtime: weights generated in place (RandomFiller), from a
    directory holding only config.json."""
    shape = tmp_path / "shape"
    shape.mkdir()
    shape.joinpath("config.json").write_text(model_dir.joinpath("config.json").read_text())
    filler = RandomFiller(num_layers=4, seed=5)
    prompt = (1, 2, 3, 4, 5, 6, 7, 8)

    def tokens(rt: PagedRuntime) -> GenerationResult:
        stream = rt.loop.submit(GenerationRequest("r", prompt, GREEDY))
        return GenerationResult.collect("r", list(stream))

    rt = PagedRuntime.load(shape, OPTIONS, PAGER, filler=filler)
    try:
        weights = rt.engine.memory.weight_tensors
        assert all(t.abs().sum() > 0 for t in weights.values())
        assert torch.all(weights["layers.0.attn_norm"] == 1)
        first = tokens(rt)
        assert len(set(first.token_ids)) > 1  # not one token over and over
        rt.suspend(SuspendLevel.DISK, store=ChunkStore(tmp_path / "store"))
        rt.resume()
        assert tokens(rt) == first
    finally:
        rt.close()
    again = PagedRuntime.load(shape, OPTIONS, PAGER, filler=RandomFiller(num_layers=4, seed=5))
    try:
        assert tokens(again) == first  # deterministic for a seed
    finally:
        again.close()


@pytest.fixture
def locking_runtime(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """A CPU runtime whose backend page-locks host memory the way the CUDA one does (here,
    it only records which pieces are locked)."""
    locked: set[int] = set()
    monkeypatch.setattr(CpuBackend, "pin_host", lambda _, a, n: locked.add(a), raising=False)
    monkeypatch.setattr(CpuBackend, "unpin_host", lambda _, a: locked.discard(a), raising=False)
    rt = PagedRuntime.load(model_dir, OPTIONS, PAGER)
    yield rt, locked
    rt.close()


def _wait_until(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_deep_unlocks_the_host_copy_and_a_resume_locks_it_again(
    locking_runtime: tuple[PagedRuntime, set[int]],
) -> None:
    """The driver's checkpoint costs about 25 ms per page-locked GB each way, so a deep
    suspend unlocks the host copy; the resume brings it back through staging buffers and
    locks it again in the background."""
    rt, locked = locking_runtime
    host = rt.wait_host_copy()
    assert host is not None and host.pinned and host.address in locked
    before = generate(rt, GREEDY)
    rt.suspend(SuspendLevel.DEEP)
    assert host.pinned_bytes == 0 and host.address not in locked  # the staging ring stays
    report = rt.resume()
    assert report.tier == "deep" and report.bytes == rt.engine.memory.weights.nbytes
    assert generate(rt, GREEDY).token_ids == before.token_ids
    assert _wait_until(lambda: host.pinned) and host.address in locked
    rt.suspend(SuspendLevel.HOST)  # and the host tier still works, straight from the copy
    rt.resume()
    assert generate(rt, GREEDY).token_ids == before.token_ids


def test_the_relock_gives_way_and_a_suspend_stops_it(
    locking_runtime: tuple[PagedRuntime, set[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rt, locked = locking_runtime
    host = rt.wait_host_copy()
    assert host is not None
    before = generate(rt, GREEDY)
    rt.suspend(SuspendLevel.DEEP)
    serving = [True]
    monkeypatch.setattr(rt.loop, "busy", lambda: serving[0])  # serving: the relock waits
    rt.resume()
    time.sleep(0.1)
    assert host.address not in locked
    start = time.monotonic()
    rt.suspend(SuspendLevel.HOST)  # stops the waiting relock at once
    assert time.monotonic() - start < 2 and host.address not in locked
    rt.resume()  # from an unlocked copy: through the staging buffers
    serving[0] = False
    assert generate(rt, GREEDY).token_ids == before.token_ids
    assert _wait_until(lambda: host.pinned)


@pytest.mark.parametrize("level", [SuspendLevel.HOST, SuspendLevel.DEEP])
def test_a_resume_that_fails_half_way_leaves_nothing_mapped(
    runtime: PagedRuntime, level: SuspendLevel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A map that fails after the weights are back (say, no memory for the KV cache) must not
    leave a half-resumed runtime: every arena is released again and a later resume works. A
    deep runtime is no longer checkpointed by then, so it stays suspended at the host level."""
    before = generate(runtime, GREEDY)
    runtime.suspend(level)
    kv = runtime.placement.arenas["kv"]
    original = Arena.map

    def failing_map(self: Arena, *, zero: bool = False) -> None:
        if self is kv:
            raise FailedPrecondition("no memory for the KV cache", reason="TEST_INJECTED")
        original(self, zero=zero)

    monkeypatch.setattr(Arena, "map", failing_map)
    with pytest.raises(FailedPrecondition, match="KV cache"):
        runtime.resume()
    assert runtime.residency is PagedState.SUSPENDED_HOST
    assert not any(a.is_mapped for a in runtime.placement.arenas.values())
    monkeypatch.undo()
    assert runtime.resume().tier == "host"
    assert generate(runtime, GREEDY).token_ids == before.token_ids
