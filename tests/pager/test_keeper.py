"""The keeper (worker/pager/keeper.py), run as its own process on the CPU backend: its wire,
its requests and errors, what it frees, and a runtime's deep resume filled by it."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.pager.test_runtime import GREEDY, OPTIONS, PAGER, _wait_until, generate, model_dir
from torpor import fdwire as wire
from torpor.errors import InvalidArgument, NotFound, Unavailable
from torpor.keeper import KeeperProcess, hello
from torpor.worker.pager.arena import Arena
from torpor.worker.pager.cpu import CpuBackend
from torpor.worker.pager.host import HostBuffer
from torpor.worker.pager.keeper_client import KeeperClient
from torpor.worker.pager.paged_state import SuspendLevel
from torpor.worker.pager.runtime import PagedRuntime

__all__ = ["model_dir"]  # a fixture, used by the runtime tests below

MiB = 1 << 20


@pytest.fixture(scope="module")
def keeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeeperProcess]:
    process = KeeperProcess(tmp_path_factory.mktemp("keeper") / "k.sock", "cpu").start()
    yield process
    process.stop()


@pytest.fixture
def client(keeper: KeeperProcess) -> Iterator[KeeperClient]:
    c = KeeperClient(keeper.path)
    yield c
    c.close()


def _arena_with_random_bytes(nbytes: int = 10 * MiB) -> Arena:
    arena = Arena("w", nbytes, CpuBackend(), handle_bytes=MiB)
    arena.map()
    flat = arena.tensor(0, (nbytes,), torch.uint8)
    flat.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    return arena


def _held_bytes(path: Path) -> int:
    return int(hello(path)["held_bytes"])  # on a connection of its own


def test_the_wire_carries_more_descriptors_than_one_message_can() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = []
    for i in range(wire.MAX_FDS * 2 + 7):
        fd = os.memfd_create("t")
        os.ftruncate(fd, i + 1)
        fds.append(fd)
    try:
        wire.send(a, {"op": "fill", "n": len(fds)}, fds)
        message, got = wire.Receiver(b).recv()
        assert message == {"op": "fill", "n": len(fds)}
        assert [os.fstat(fd).st_size for fd in got] == [i + 1 for i in range(len(fds))]
        for fd in got:
            os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_the_keeper_fills_an_arena_from_the_copy_it_holds(client: KeeperClient) -> None:
    arena = _arena_with_random_bytes()
    n = 9 * MiB + 5  # not a whole number of handles: only those bytes are copied
    host = HostBuffer.for_arena(arena, n, shared=True)
    host.copy_from(arena)
    expected = arena.tensor(0, (n,), torch.uint8).clone()
    assert client.hold("copy", host)["ok"] and client.held("copy")
    arena.unmap()
    arena.map(zero=True)
    reply = client.fill("copy", arena, n)
    assert reply["bytes"] == n
    assert torch.equal(arena.tensor(0, (n,), torch.uint8), expected)
    assert not arena.tensor(n, (arena.nbytes - n,), torch.uint8).any()
    client.drop("copy")
    assert not client.held("copy")
    arena.close()
    host.close()


def test_bad_requests_are_answered_with_their_codes(client: KeeperClient) -> None:
    arena = _arena_with_random_bytes(2 * MiB)
    with pytest.raises(NotFound) as not_held:
        client.fill("nothing", arena, MiB)
    assert not_held.value.reason == "NOT_HELD"
    with pytest.raises(InvalidArgument):  # hold without its descriptor
        client._request({"op": "hold", "name": "x", "nbytes": 10}, [], 10)
    with pytest.raises(InvalidArgument):
        client._request({"op": "sing", "name": "x"}, [], 10)
    host = HostBuffer(2 * MiB, shared=True)
    client.hold("two", host)
    exported = arena.export()
    try:  # a size per descriptor, or it is refused; the descriptors are closed either way
        with pytest.raises(InvalidArgument):
            client._request(
                {"op": "fill", "name": "two", "nbytes": MiB, "sizes": [MiB]},
                [fd for fd, _ in exported],
                10,
            )
        with pytest.raises(InvalidArgument):  # more bytes than the copy holds
            client._request(
                {"op": "fill", "name": "two", "nbytes": 3 * MiB, "sizes": [MiB, MiB]},
                [fd for fd, _ in exported],
                10,
            )
    finally:
        for fd, _ in exported:
            os.close(fd)
    assert client.hello()["ok"]  # and it still serves
    client.drop("two")
    arena.close()
    host.close()


def test_a_fill_with_a_bad_descriptor_keeps_none_of_them(
    client: KeeperClient, keeper: KeeperProcess
) -> None:
    """The first descriptor is adopted before the second is found short: it is let go too."""
    host = HostBuffer(2 * MiB, shared=True)
    client.hold("short", host)
    good, short = os.memfd_create("good"), os.memfd_create("short")
    os.ftruncate(good, MiB)  # the second holds no bytes at all
    fds_dir = Path(f"/proc/{keeper.pid}/fd")
    before = len(list(fds_dir.iterdir()))
    try:
        with pytest.raises(InvalidArgument) as bad:
            client._request(
                {"op": "fill", "name": "short", "nbytes": MiB, "sizes": [MiB, MiB]},
                [good, short],
                10,
            )
        assert bad.value.reason == "BAD_HANDLE_SIZE"
        assert len(list(fds_dir.iterdir())) == before
    finally:
        os.close(good)
        os.close(short)
        client.drop("short")
        host.close()


def test_a_garbled_connection_is_closed_and_the_keeper_serves_on(keeper: KeeperProcess) -> None:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.connect(str(keeper.path))
    raw.sendall((5).to_bytes(4, "little") + b"nope!")
    raw.settimeout(10)
    assert raw.recv(100) == b""  # closed: the stream cannot be trusted after a bad frame
    raw.close()
    assert _held_bytes(keeper.path) >= 0 and keeper.alive()


def test_a_closed_connection_frees_what_it_held(keeper: KeeperProcess) -> None:
    host = HostBuffer(4 * MiB, shared=True)
    first = KeeperClient(keeper.path)
    first.hold("a", host)
    assert _held_bytes(keeper.path) == 4 * MiB
    first.close()  # as when a worker dies
    assert _wait_until(lambda: _held_bytes(keeper.path) == 0)
    host.close()


def test_a_lost_keeper_is_unavailable_and_a_new_one_is_reached(tmp_path: Path) -> None:
    process = KeeperProcess(tmp_path / "k.sock", "cpu").start()
    c = KeeperClient(process.path)
    host = HostBuffer(MiB, shared=True)
    arena = _arena_with_random_bytes(MiB)
    try:
        c.hold("a", host)
        process.stop()
        with pytest.raises(Unavailable) as gone:
            c.fill("a", arena, MiB)
        assert gone.value.reason == "KEEPER_GONE" and not c.held("a")
        process.start()
        assert c.hello()["pid"] == process.pid  # the next request connects again
    finally:
        c.close()
        process.stop()
        arena.close()
        host.close()


def test_a_keeper_that_cannot_start_says_so(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as failed:
        KeeperProcess(tmp_path / "k.sock", "tpu:3").start()
    assert failed.value.reason == "KEEPER_FAILED"


# -- a runtime with a keeper --------------------------------------------------------------


@pytest.fixture
def kept_runtime(
    model_dir: Path, keeper: KeeperProcess, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PagedRuntime]:
    """A CPU runtime whose backend page-locks host memory the way the CUDA one does (here it
    only records it), with the keeper of its "GPU"."""
    locked: set[int] = set()
    monkeypatch.setattr(CpuBackend, "pin_host", lambda _, a, n: locked.add(a), raising=False)
    monkeypatch.setattr(CpuBackend, "unpin_host", lambda _, a: locked.discard(a), raising=False)
    options = dataclasses.replace(PAGER, keeper_socket=str(keeper.path))
    rt = PagedRuntime.load(model_dir, OPTIONS, options)
    yield rt
    rt.close()


def test_a_deep_resume_is_filled_by_the_keeper(
    kept_runtime: PagedRuntime, keeper: KeeperProcess
) -> None:
    rt = kept_runtime
    host = rt.wait_host_copy()
    assert host is not None and host.shared
    assert _wait_until(lambda: rt.host_copy.kept)
    assert _held_bytes(keeper.path) == host.nbytes
    before = generate(rt, GREEDY)
    for _ in range(3):
        rt.suspend(SuspendLevel.DEEP)
        assert host.pinned_bytes == 0  # nothing locked here at the checkpoint
        report = rt.resume()
        assert report.via == "keeper" and report.bytes == rt.engine.memory.weights.nbytes
        assert generate(rt, GREEDY).token_ids == before.token_ids
    assert _wait_until(lambda: host.pinned)  # locked here again: host resumes copy locally
    rt.suspend(SuspendLevel.HOST)
    assert rt.resume().via == "copy"
    assert generate(rt, GREEDY).token_ids == before.token_ids


def test_a_failed_fill_falls_back_to_staging(
    kept_runtime: PagedRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = kept_runtime
    assert _wait_until(lambda: rt.host_copy.kept)
    before = generate(rt, GREEDY)
    rt.suspend(SuspendLevel.DEEP)
    keeper = rt.host_copy.keeper
    assert keeper is not None

    def broken(*_: object) -> None:
        raise Unavailable("gone", reason="KEEPER_GONE")

    monkeypatch.setattr(keeper, "fill", broken)
    assert rt.resume().via == "staging"  # every byte copied again, through staging buffers
    assert generate(rt, GREEDY).token_ids == before.token_ids


def test_a_disk_suspend_and_close_make_the_keeper_let_go(
    kept_runtime: PagedRuntime, keeper: KeeperProcess, tmp_path: Path
) -> None:
    from torpor.store.chunks import ChunkStore

    rt = kept_runtime
    assert _wait_until(lambda: rt.host_copy.kept)
    rt.suspend(SuspendLevel.DISK, store=ChunkStore(tmp_path / "store"))
    assert _wait_until(lambda: _held_bytes(keeper.path) == 0)
    rt.resume()
    assert _wait_until(lambda: rt.host_copy.kept)  # made again after the disk resume, and kept
    rt.close()
    assert _wait_until(lambda: _held_bytes(keeper.path) == 0)


def test_a_disk_resume_to_host_hands_its_new_copy_to_the_keeper(
    kept_runtime: PagedRuntime, keeper: KeeperProcess, tmp_path: Path
) -> None:
    """A prefetch to host from disk reads the snapshot into a shared, locked copy that the
    keeper then holds, so the deep resume after it is filled by the keeper (issue 13)."""
    from torpor.store.chunks import ChunkStore
    from torpor.worker.pager.paged_state import PagedState

    rt = kept_runtime
    before = generate(rt, GREEDY)
    rt.suspend(SuspendLevel.DISK, store=ChunkStore(tmp_path / "store"))
    assert _wait_until(lambda: _held_bytes(keeper.path) == 0)
    rt.resume(target=PagedState.SUSPENDED_HOST)
    host = rt.wait_host_copy()
    assert host is not None and host.shared and host.pinned
    assert _wait_until(lambda: rt.host_copy.kept)
    assert _held_bytes(keeper.path) == host.nbytes
    rt.suspend(SuspendLevel.DEEP)
    assert rt.resume().via == "keeper"
    assert generate(rt, GREEDY).token_ids == before.token_ids


def test_without_a_reachable_keeper_a_deep_resume_stages(model_dir: Path, tmp_path: Path) -> None:
    options = dataclasses.replace(PAGER, keeper_socket=str(tmp_path / "nobody.sock"))
    rt = PagedRuntime.load(model_dir, OPTIONS, options)
    try:
        before = generate(rt, GREEDY)
        rt.wait_host_copy()
        rt.suspend(SuspendLevel.DEEP)
        assert rt.resume().via == "copy"  # CPU: nothing is locked, so a plain copy
        assert not rt.host_copy.kept
        assert generate(rt, GREEDY).token_ids == before.token_ids
    finally:
        rt.close()
