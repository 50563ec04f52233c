"""The CPU backend's verbs and its error reporting: every failed call is a typed TorporError."""

from __future__ import annotations

import errno
import mmap

import pytest

from tests.pager import procfs
from torpor.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TorporError,
)
from torpor.worker.pager import CpuBackend, MemoryBackend, backend_for
from torpor.worker.pager.backend import Allocation, Reservation
from torpor.worker.pager.cpu import os_error

MiB = 1024 * 1024


def test_it_is_a_memory_backend() -> None:
    assert isinstance(CpuBackend(), MemoryBackend)
    assert backend_for("cpu").kind == "cpu"


def test_backend_for_rejects_unknown_devices() -> None:
    for device in ("tpu", "cuda:x"):
        with pytest.raises(InvalidArgument) as raised:
            backend_for(device)
        assert raised.value.reason == "BAD_DEVICE"


def test_the_verbs_follow_the_vmm_life_cycle() -> None:
    backend = CpuBackend()
    reservation = backend.reserve(4 * MiB)
    assert reservation.honored and reservation.requested is None
    assert procfs.is_reserved(reservation.address, reservation.nbytes)

    allocation = backend.create(4 * MiB)
    backend.map(reservation.address, allocation)
    assert procfs.is_reserved(reservation.address, reservation.nbytes)  # mapped, no access yet
    backend.set_access(reservation.address, 4 * MiB)
    view = backend.view(reservation.address, 4 * MiB)
    view.fill_(1)
    assert view.data_ptr() == reservation.address

    backend.unmap(reservation.address, 4 * MiB)
    assert procfs.is_reserved(reservation.address, reservation.nbytes)
    backend.release(allocation)
    backend.free(reservation)
    assert procfs.mappings(reservation.address, reservation.address + 4 * MiB) == []


def test_a_coarse_granularity_aligns_reservations() -> None:
    backend = CpuBackend(granularity=2 * MiB)
    reservations = [backend.reserve(6 * MiB) for _ in range(4)]
    try:
        assert all(r.address % (2 * MiB) == 0 for r in reservations)
        assert all(procfs.is_reserved(r.address, r.nbytes) for r in reservations)
    finally:
        for r in reservations:
            backend.free(r)
    assert all(procfs.mappings(r.address, r.address + r.nbytes) == [] for r in reservations)


def test_the_granularity_must_be_a_multiple_of_the_page_size() -> None:
    with pytest.raises(InvalidArgument) as raised:
        CpuBackend(granularity=mmap.PAGESIZE + 1)
    assert raised.value.reason == "BAD_GRANULARITY"


def test_a_failed_call_names_the_errno_the_call_and_the_values() -> None:
    backend = CpuBackend()
    reservation = backend.reserve(MiB)
    try:
        with pytest.raises(Internal) as raised:
            backend.map(reservation.address, Allocation(handle=1 << 20, nbytes=MiB))  # no such fd
        error = raised.value
        assert error.reason == "EBADF"
        assert error.metadata["call"] == "mmap"
        assert error.metadata["nbytes"] == str(MiB)
        assert "mmap(" in str(error) and "EBADF" in str(error)
    finally:
        backend.free(reservation)


def test_a_failed_create_leaks_no_descriptor() -> None:
    fds = procfs.open_fds()
    with pytest.raises(TorporError) as raised:
        CpuBackend().create(-1)  # the memfd is made, then ftruncate refuses the size
    assert raised.value.metadata["call"] == "ftruncate"
    assert procfs.open_fds() == fds


def test_unaligned_unmaps_are_refused_by_the_kernel_and_reported() -> None:
    with pytest.raises(Internal) as raised:
        CpuBackend().free(Reservation(address=4097, nbytes=4096))
    assert raised.value.reason == "EINVAL"


@pytest.mark.parametrize(
    ("err", "cls"),
    [
        (errno.ENOMEM, ResourceExhausted),
        (errno.EMFILE, ResourceExhausted),
        (errno.EPERM, FailedPrecondition),
        (errno.EINVAL, Internal),
    ],
)
def test_errnos_map_onto_the_error_hierarchy(err: int, cls: type) -> None:
    error = os_error("mmap", err, nbytes=4096)
    assert type(error) is cls
    assert error.reason == errno.errorcode[err]
