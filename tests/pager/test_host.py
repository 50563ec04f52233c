"""Host buffers: the retained host copy of an arena, restored bit for bit after a remap."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.pager import procfs
from torpor.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from torpor.worker.pager import Arena, CpuBackend, HostBuffer

MiB = 1024 * 1024


@pytest.fixture
def arena() -> Iterator[Arena]:
    with Arena("weights", 24 * MiB, CpuBackend(), handle_bytes=8 * MiB) as a:
        a.map()
        yield a


def test_a_suspend_and_resume_through_the_host_buffer_is_bit_identical(arena: Arena) -> None:
    weights = arena.tensor(0, (arena.nbytes // 2,), torch.bfloat16)
    weights.copy_(torch.randn(weights.shape, generator=torch.Generator().manual_seed(0)))
    expected = weights.clone()

    with HostBuffer.for_arena(arena) as host:
        assert not host.pinned  # nothing to pin on the CPU backend
        host.copy_from(arena)  # once, ahead of time
        for _ in range(3):  # every later suspend is an unmap only
            arena.unmap()
            arena.map()
            assert int(weights.view(torch.uint8).count_nonzero()) == 0
            host.copy_to(arena)
            assert torch.equal(weights.view(torch.int16), expected.view(torch.int16))


def test_a_prefix_can_be_copied(arena: Arena) -> None:
    arena.tensor(0, (arena.nbytes,), torch.uint8).fill_(0x11)
    with HostBuffer(MiB) as host:
        host.copy_from(arena)
        assert int(host.tensor.sum()) == 0x11 * MiB
        arena.zero_()
        host.copy_to(arena, nbytes=4096)
        everything = arena.tensor(0, (arena.nbytes,), torch.uint8)
        assert int(everything[:4096].sum()) == 0x11 * 4096
        assert int(everything[4096:].count_nonzero()) == 0


@pytest.mark.parametrize("nbytes", [0, 2 * MiB])
def test_copies_must_fit_both_sides(arena: Arena, nbytes: int) -> None:
    with HostBuffer(MiB) as host, pytest.raises(InvalidArgument) as raised:
        host.copy_to(arena, nbytes=nbytes)
    assert raised.value.reason == "BAD_COPY_SIZE"


def test_close_frees_the_memory_and_is_idempotent() -> None:
    host = HostBuffer(64 * MiB)
    host.tensor.fill_(1)
    touched = procfs.rss_anon()
    host.close()
    assert touched - procfs.rss_anon() >= 0.9 * 64 * MiB
    assert procfs.mappings(host.address, host.address + host.nbytes) == []
    host.close()
    with pytest.raises(FailedPrecondition):
        _ = host.tensor


class RecordingPinner:
    """Stands in for the CUDA backend's page-locking, recording what it was asked."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.pinned, self.unpinned = fail, [], []

    def pin_host(self, address: int, nbytes: int) -> None:
        if self.fail:
            raise ResourceExhausted("cannot pin", reason="CUDA_ERROR_OUT_OF_MEMORY")
        self.pinned.append((address, nbytes))

    def unpin_host(self, address: int) -> None:
        self.unpinned.append(address)


def test_a_pinned_buffer_is_pinned_once_and_unpinned_before_it_is_freed() -> None:
    pinner = RecordingPinner()
    host = HostBuffer(MiB + 1, pinner=pinner)
    assert host.pinned
    assert pinner.pinned == [(host.address, MiB + 4096)]  # whole pages
    host.close()
    assert pinner.unpinned == [host.address]


@pytest.mark.parametrize("populate_call", ["madvise", "memset"])
def test_a_buffer_to_be_pinned_is_faulted_in_first_by_several_threads(
    populate_call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinning would fault the pages in one at a time; they are all resident, and zero,
    before the first registration (`memset`: kernels without MADV_POPULATE_WRITE)."""
    from torpor.errors import TorporError
    from torpor.worker.pager import host as host_module

    if populate_call == "memset":

        def no_populate(address: int, nbytes: int, advice: int) -> None:
            if advice == host_module.MADV_POPULATE_WRITE:
                raise TorporError("EINVAL", reason="EINVAL")

        monkeypatch.setattr(host_module, "sys_madvise", no_populate)
    monkeypatch.setattr(host_module, "POPULATE_SLICE", 4 * MiB)  # 8 slices on the threads
    resident: list[int] = []

    class Observing(RecordingPinner):
        def pin_host(self, address: int, nbytes: int) -> None:
            if not resident:
                resident.append(procfs.rss_anon())
            super().pin_host(address, nbytes)

    before = procfs.rss_anon()
    host = HostBuffer(32 * MiB, pinner=Observing())
    assert resident[0] - before >= 0.9 * 32 * MiB  # all in before pinning began
    assert not host.tensor.any()
    host.close()


def test_a_large_buffer_is_pinned_in_pieces_that_tile_it() -> None:
    """Each registration holds a driver lock: pieces let other CUDA calls in between."""
    pinner = RecordingPinner()
    calls: list[int] = []
    host = HostBuffer(
        5 * MiB + 1,
        pinner=pinner,
        pin_piece=2 * MiB,
        before_piece=lambda: calls.append(len(pinner.pinned)),
    )
    assert calls == [0, 1, 2]  # called before each piece is pinned
    a = host.address
    assert pinner.pinned == [(a, 2 * MiB), (a + 2 * MiB, 2 * MiB), (a + 4 * MiB, MiB + 4096)]
    host.close()
    assert sorted(pinner.unpinned) == [a, a + 2 * MiB, a + 4 * MiB]
    host.close()
    assert len(pinner.unpinned) == 3


def test_a_failed_pin_frees_the_memory() -> None:
    before = procfs.mapping_count()
    with pytest.raises(ResourceExhausted):
        HostBuffer(16 * MiB, pinner=RecordingPinner(fail=True))
    assert procfs.mapping_count() <= before


def test_a_pin_failing_half_way_unpins_the_pieces_already_pinned() -> None:
    class FailsThird(RecordingPinner):
        def pin_host(self, address: int, nbytes: int) -> None:
            if len(self.pinned) == 2:
                raise ResourceExhausted("cannot pin", reason="CUDA_ERROR_OUT_OF_MEMORY")
            super().pin_host(address, nbytes)

    pinner = FailsThird()
    with pytest.raises(ResourceExhausted):
        HostBuffer(8 * MiB, pinner=pinner, pin_piece=2 * MiB)
    assert sorted(pinner.unpinned) == sorted(address for address, _ in pinner.pinned)


def test_unpin_unlocks_every_piece_and_pin_locks_them_again() -> None:
    """Deep suspend unlocks the host copy (the driver's checkpoint costs ~25 ms per locked
    GB each way); a background pin locks it again, and may be stopped between pieces."""
    pinner = RecordingPinner()
    host = HostBuffer(5 * MiB, pinner=pinner, pin_piece=2 * MiB)
    a = host.address
    host.unpin()
    assert not host.pinned and host.pinned_bytes == 0
    assert sorted(pinner.unpinned) == [a, a + 2 * MiB, a + 4 * MiB]
    calls: list[int] = []

    def one_piece_only() -> None:
        if calls:
            raise InterruptedError
        calls.append(1)

    pinner.pinned.clear()
    with pytest.raises(InterruptedError):
        host.pin(one_piece_only)
    assert pinner.pinned == [(a, 2 * MiB)] and host.pinned_bytes == 2 * MiB and not host.pinned
    host.pin()
    assert host.pinned and host.pinned_bytes == 5 * MiB
    host.close()
    assert len(pinner.unpinned) == 6  # three at unpin, three at close


def _half_locked(arena: Arena) -> tuple[HostBuffer, torch.Tensor, torch.Tensor]:
    """A host copy of `arena`, filled with random bytes first, in three 8 MiB pieces: the
    first locked, the others not. Returns it, the arena's bytes (zeroed now) and what they
    were."""
    data = arena.tensor(0, (arena.nbytes,), torch.uint8)
    data.copy_(torch.randint(0, 256, data.shape, dtype=torch.uint8))
    expected = data.clone()
    host = HostBuffer(arena.nbytes, pinner=RecordingPinner(), pin_piece=8 * MiB)
    host.copy_from(arena)
    data.zero_()
    host.unpin()
    locked: list[int] = []

    def first_only() -> None:
        if locked:
            raise InterruptedError
        locked.append(1)

    with pytest.raises(InterruptedError):
        host.pin(first_only)
    return host, data, expected


def test_unlocked_pieces_come_back_through_the_stage(arena: Arena) -> None:
    host, data, expected = _half_locked(arena)
    staged: list[tuple[int, int]] = []

    def stage(src: torch.Tensor, dst: torch.Tensor, spans: list[tuple[int, int]]) -> None:
        for offset, size in spans:
            staged.append((offset, size))
            dst[offset : offset + size].copy_(src[offset : offset + size])

    host.copy_to(arena, stage=stage)
    assert staged == [(8 * MiB, 8 * MiB), (16 * MiB, 8 * MiB)]  # the locked piece went direct
    assert torch.equal(data, expected)
    with pytest.raises(FailedPrecondition) as err:
        host.copy_to(arena)  # unlocked pieces and nothing to stage them through
    assert err.value.reason == "HOST_COPY_NOT_PINNED"
    host.close()


def test_the_host_stager_copies_spans_through_a_small_ring(arena: Arena) -> None:
    from torpor.worker.pager.stream import HostStager, StagingRing

    host, data, expected = _half_locked(arena)
    stager = HostStager(3, StagingRing(5, 3 * MiB + 4096, RecordingPinner()))
    try:
        host.copy_to(arena, stage=stager)  # 8 MiB spans in 3 MiB steps: uneven tails
        assert torch.equal(data, expected)
        data.zero_()
        stager(host.tensor, data, [(5, MiB), (20 * MiB + 1, 7)])
        assert torch.equal(data[5 : 5 + MiB], expected[5 : 5 + MiB])
        assert torch.equal(data[20 * MiB + 1 : 20 * MiB + 8], expected[20 * MiB + 1 : 20 * MiB + 8])
        assert int(data.count_nonzero()) == int(
            expected[5 : 5 + MiB].count_nonzero()
            + expected[20 * MiB + 1 : 20 * MiB + 8].count_nonzero()
        )
    finally:
        stager.close()
        host.close()


def test_the_device_drainer_copies_spans_out_through_a_small_ring(arena: Arena) -> None:
    """The exchange's outgoing side: arena -> staging ring -> host memory, in uneven steps."""
    from torpor.worker.pager.stream import DeviceDrainer, StagingRing

    src = arena.tensor(0, (arena.nbytes,), torch.uint8)
    src.copy_(torch.randint(0, 256, (arena.nbytes,), dtype=torch.uint8))
    host = HostBuffer(arena.nbytes)
    host.tensor.zero_()
    drainer = DeviceDrainer(3, StagingRing(2, 3 * MiB + 4096, RecordingPinner()))
    try:
        spans = [(5, 7 * MiB), (20 * MiB + 1, 7)]
        drainer(src, host.tensor, spans)
        for offset, n in spans:
            assert torch.equal(host.tensor[offset : offset + n], src[offset : offset + n])
        copied = sum(int(src[o : o + n].count_nonzero()) for o, n in spans)
        assert int(host.tensor.count_nonzero()) == copied  # nothing outside the spans
    finally:
        drainer.close()
        host.close()


def locked(pinner: RecordingPinner) -> set[int]:
    """The addresses locked now: pinned more often than unpinned."""
    count: dict[int, int] = {}
    for address, _ in pinner.pinned:
        count[address] = count.get(address, 0) + 1
    for address in pinner.unpinned:
        count[address] -= 1
    return {a for a, n in count.items() if n > 0}


def test_a_lazy_buffer_holds_and_frees_spans_and_locks_only_whole_pieces() -> None:
    """An exchange swap's buffer: nothing faulted in or locked until a span is held; a piece
    is locked once every byte of it is held, and unlocked as soon as any of it is freed."""
    page = 4096
    pinner = RecordingPinner()
    anon = procfs.rss_anon()
    buf = HostBuffer(8 * MiB, pinner=pinner, pin_piece=2 * MiB, lazy=True)
    try:
        assert buf.held_bytes == 0 and not buf.whole and locked(pinner) == set()
        assert procfs.rss_anon() - anon < MiB  # mapped, not faulted in
        buf.hold(0, MiB)
        assert buf.holds(0, MiB) and not buf.holds(0, MiB + page)
        assert locked(pinner) == set()  # half of the first piece: not locked yet
        buf.hold(MiB, MiB)
        assert locked(pinner) == {buf.address}  # the first piece is whole now
        buf.hold(2 * MiB, 6 * MiB)
        assert buf.whole and buf.pinned and buf.held_bytes == 8 * MiB
        buf.tensor.fill_(7)
        buf.free(3 * MiB, MiB)  # inside the second piece: it is unlocked, the bytes gone
        assert buf.address + 2 * MiB not in locked(pinner) and not buf.pinned
        assert buf.held_bytes == 7 * MiB and not buf.holds(2 * MiB, 2 * MiB)
        assert int(buf.tensor[2 * MiB]) == 7 and int(buf.tensor[4 * MiB]) == 7
        buf.pin()  # a repin skips pieces with bytes given back
        assert buf.address + 2 * MiB not in locked(pinner)
        with pytest.raises(FailedPrecondition) as held:
            buf.hold(0, MiB)
        assert held.value.reason == "HOST_SPAN_HELD"
        with pytest.raises(InvalidArgument) as bad:
            buf.hold(3 * MiB + 1, page)
        assert bad.value.reason == "BAD_COPY_SIZE"
        buf.hold(3 * MiB, MiB)
        assert int(buf.tensor[3 * MiB]) == 0  # given back and taken again: fresh zeros
    finally:
        buf.close()
    assert locked(pinner) == set()
