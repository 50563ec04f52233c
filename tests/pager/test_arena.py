"""Arena invariants on the CPU backend: stable addresses, real release, zeros, rollback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.pager import procfs
from torpor.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from torpor.worker.pager import Arena, ArenaState, CpuBackend

MiB = 1024 * 1024


@pytest.fixture
def backend() -> CpuBackend:
    return CpuBackend()


@pytest.fixture
def arena(backend: CpuBackend) -> Iterator[Arena]:
    with Arena("test", 32 * MiB, backend, handle_bytes=8 * MiB) as a:
        a.map()
        yield a


def views(arena: Arena) -> dict[str, torch.Tensor]:
    """A few tensors of several dtypes at fixed offsets, the way an engine lays them out."""
    return {
        "w": arena.tensor(0, (1024, 1024), torch.float32),  # 4 MiB
        "b": arena.tensor(4 * MiB, (4096,), torch.bfloat16),
        "kv": arena.tensor(12 * MiB, (2, 8, 1024, 64), torch.float16),  # spans a handle edge
        "ids": arena.tensor(31 * MiB, (1024,), torch.int64),
    }


def test_views_keep_their_addresses_and_work_again_after_unmap_and_map(arena: Arena) -> None:
    before = views(arena)
    pointers = {name: t.data_ptr() for name, t in before.items()}
    assert pointers["kv"] == arena.address + 12 * MiB

    arena.unmap()
    arena.map()

    assert {name: t.data_ptr() for name, t in views(arena).items()} == pointers
    # The old view objects are valid again too: write through one, read through a new one.
    before["w"].fill_(3.0)
    assert float(arena.tensor(0, (1024, 1024), torch.float32).sum()) == 3.0 * 1024 * 1024


def test_unmap_really_releases_the_memory(backend: CpuBackend) -> None:
    nbytes = 128 * MiB
    with Arena("big", nbytes, backend, handle_bytes=32 * MiB) as arena:
        baseline = procfs.rss_shmem()
        arena.map()
        arena.tensor(0, (nbytes,), torch.uint8).fill_(0x5A)  # touch every page
        touched = procfs.rss_shmem()
        assert touched - baseline >= 0.9 * nbytes

        arena.unmap()

        assert touched - procfs.rss_shmem() >= 0.9 * nbytes
        assert procfs.is_reserved(arena.address, arena.nbytes)


def test_a_fresh_map_reads_zeros_and_zeroing_is_guaranteed(arena: Arena) -> None:
    everything = arena.tensor(0, (arena.nbytes,), torch.uint8)
    assert int(everything.count_nonzero()) == 0  # a new memfd reads as zeros

    everything.fill_(0xAB)
    arena.unmap()
    arena.map()
    assert int(arena.tensor(0, (arena.nbytes,), torch.uint8).count_nonzero()) == 0

    everything.fill_(0xAB)
    arena.zero_()
    assert int(everything.count_nonzero()) == 0

    everything.fill_(0xAB)
    arena.unmap()
    arena.map(zero=True)
    assert int(everything.count_nonzero()) == 0


def test_a_hundred_cycles_leak_nothing(backend: CpuBackend) -> None:
    with Arena("cycles", 16 * MiB, backend, handle_bytes=4 * MiB) as arena:
        arena.map()
        page_bytes = arena.tensor(0, (arena.nbytes,), torch.uint8)
        page_bytes.fill_(1)
        fds, shmem, vmas = procfs.open_fds(), procfs.rss_shmem(), procfs.mapping_count()
        for _ in range(100):
            arena.unmap()
            arena.map()
            page_bytes.fill_(1)
        assert procfs.open_fds() == fds
        assert abs(procfs.rss_shmem() - shmem) < 2 * MiB
        assert procfs.mapping_count() <= vmas + 2  # only the kernel's own merging may vary
        assert arena.address == page_bytes.data_ptr()


class FailOnCall:
    """Wraps a backend verb so that its k-th call raises, like a device out of memory."""

    def __init__(self, verb: object, k: int) -> None:
        self.verb, self.k, self.calls = verb, k, 0

    def __call__(self, *args: object) -> object:
        self.calls += 1
        if self.calls == self.k:
            raise ResourceExhausted("injected failure", reason="INJECTED")
        return self.verb(*args)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("verb", "k"), [("map", 1), ("map", 3), ("map", 4), ("create", 2), ("set_access", 1)]
)
def test_a_failure_half_way_through_map_rolls_back(
    backend: CpuBackend, monkeypatch: pytest.MonkeyPatch, verb: str, k: int
) -> None:
    with Arena("rollback", 32 * MiB, backend, handle_bytes=8 * MiB) as arena:
        fds = procfs.open_fds()
        failing = FailOnCall(getattr(backend, verb), k)
        monkeypatch.setattr(backend, verb, failing)

        with pytest.raises(ResourceExhausted, match="injected"):
            arena.map()

        assert failing.calls == k
        assert arena.state is ArenaState.UNMAPPED
        assert procfs.open_fds() == fds  # every memfd created on the way was closed
        assert procfs.is_reserved(arena.address, arena.nbytes)
        with pytest.raises(FailedPrecondition):
            arena.tensor(0, (16,), torch.uint8)

        monkeypatch.undo()
        arena.map()
        assert arena.tensor(0, (arena.nbytes,), torch.uint8).count_nonzero() == 0


def test_a_failed_rollback_is_reported_and_close_retries_it(
    backend: CpuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    arena = Arena("stuck", 16 * MiB, backend, handle_bytes=8 * MiB)
    fds = procfs.open_fds()
    monkeypatch.setattr(backend, "set_access", FailOnCall(backend.set_access, 1))
    monkeypatch.setattr(backend, "unmap", FailOnCall(backend.unmap, 1))

    with pytest.raises(Internal, match="could not be released") as raised:
        arena.map()
    assert isinstance(raised.value.__cause__, ResourceExhausted)

    monkeypatch.undo()
    arena.close()
    assert procfs.open_fds() == fds
    assert procfs.mappings(arena.address, arena.address + arena.nbytes) == []


def test_a_requested_address_is_honored_when_free_and_reported_when_taken(
    backend: CpuBackend,
) -> None:
    with Arena("first", 8 * MiB, backend) as first:
        with Arena("second", 8 * MiB, backend, address=first.address) as second:
            assert second.requested_address == first.address
            assert not second.address_honored
            assert second.address != first.address
        recorded = first.address
    with Arena("again", 8 * MiB, backend, address=recorded) as again:
        assert again.address_honored
        assert again.address == recorded


def test_verbs_check_the_state(backend: CpuBackend) -> None:
    arena = Arena("states", 4 * MiB, backend)
    with pytest.raises(FailedPrecondition, match="needs it mapped"):
        arena.tensor(0, (4,), torch.float32)
    with pytest.raises(FailedPrecondition):
        arena.unmap()
    arena.map()
    with pytest.raises(FailedPrecondition):
        arena.map()
    arena.unmap()
    with pytest.raises(FailedPrecondition) as raised:
        arena.tensor(0, (4,), torch.float32)
    assert raised.value.reason == "ARENA_UNMAPPED"
    arena.close()
    arena.close()  # idempotent
    assert arena.state is ArenaState.CLOSED
    for verb in (arena.map, arena.unmap, arena.zero_):
        with pytest.raises(FailedPrecondition):
            verb()


def test_close_gives_back_the_range(backend: CpuBackend) -> None:
    arena = Arena("closing", 8 * MiB, backend)
    arena.map()
    arena.tensor(0, (arena.nbytes,), torch.uint8).fill_(7)
    arena.close()
    assert procfs.mappings(arena.address, arena.address + arena.nbytes) == []


@pytest.mark.parametrize(
    ("offset", "shape", "dtype"),
    [
        (2, (4,), torch.float32),  # misaligned for its dtype
        (-4, (4,), torch.float32),
        (4 * MiB - 8, (4,), torch.float32),  # runs past the end
        (0, (-1, 4), torch.float32),
    ],
)
def test_views_must_fit_and_be_aligned(
    backend: CpuBackend, offset: int, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    with Arena("bounds", 4 * MiB, backend) as arena:
        arena.map()
        with pytest.raises(InvalidArgument) as raised:
            arena.tensor(offset, shape, dtype)
        assert raised.value.reason == "BAD_VIEW"


def test_empty_views_and_int_shapes(arena: Arena) -> None:
    assert arena.tensor(64, (0, 8), torch.float16).shape == (0, 8)
    flat = arena.tensor(0, arena.nbytes, torch.uint8)
    assert flat.shape == (arena.nbytes,)
    assert flat.data_ptr() == arena.address


def test_sizes_are_rounded_to_the_granularity_and_split_in_handles() -> None:
    backend = CpuBackend(granularity=2 * MiB)
    with Arena("sizes", 9 * MiB + 1, backend, handle_bytes=3 * MiB) as arena:
        assert arena.nbytes == 10 * MiB
        assert arena.address % (2 * MiB) == 0
        assert arena.handle_bytes == 4 * MiB
        assert arena.handle_extents() == [(0, 4 * MiB), (4 * MiB, 4 * MiB), (8 * MiB, 2 * MiB)]
        arena.map()
        assert procfs.mappings(arena.address, arena.address + arena.nbytes)[0][2] == "rw-s"


@pytest.mark.parametrize("nbytes", [0, -1, 1.5])
def test_sizes_must_be_positive(backend: CpuBackend, nbytes: object) -> None:
    with pytest.raises(InvalidArgument):
        Arena("bad", nbytes, backend)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Arena("bad", 4 * MiB, backend, handle_bytes=nbytes)  # type: ignore[arg-type]
