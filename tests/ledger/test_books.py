"""The ledger test's own parts, without a daemon (stand-ins: hand-made books, a memfd of
this process, a made-up store directory and nvidia-smi output)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from tests.ledger.books import Books, Ledger, Reality, memfds, parse_compute_apps, store_files


def _books(gpu: int, host: int, disk: int) -> Books:
    ledger = Ledger({0: 100}, 100, 100, {0: 100}, (), ())
    return Books(ledger, Reality({0: gpu}, host, disk, ()))


def test_stand_in_books_name_each_budget_that_reality_exceeds() -> None:
    assert _books(100, 100, 100).excess() == {}
    over = _books(101, 50, 250)
    assert set(over.excess()) == {"gpu 0", "disk"}
    assert over.over("gpu 0") == 1 and over.over("host") == -50 and over.over("disk") == 150
    report = over.report("a step", "after the step", "disk")
    assert "really 250 B > ledger 100 B (+150)" in report and "'a step'" in report


def test_stand_in_ledger_max_takes_each_part_from_either_read() -> None:
    a = Ledger({0: 5, 1: 9}, 3, 8, {}, (), ())
    b = Ledger({0: 7}, 4, 2, {}, (), ())
    m = a.max(b)
    assert (m.gpu, m.host, m.disk) == ({0: 7, 1: 9}, 4, 8)


def test_memfds_of_this_process_by_name_and_inode() -> None:
    fd = os.memfd_create("torpor-host-copy")
    try:
        os.ftruncate(fd, 2 * mmap.PAGESIZE)
        with mmap.mmap(fd, 2 * mmap.PAGESIZE):
            found = memfds(os.getpid(), "torpor-host-copy")
            assert str(os.fstat(fd).st_ino) in found
            assert found[str(os.fstat(fd).st_ino)] == 2 * mmap.PAGESIZE
        assert str(os.fstat(fd).st_ino) not in memfds(os.getpid(), "torpor-host-copy")
    finally:
        os.close(fd)


def test_stand_in_store_counts_every_file_but_its_metadata(tmp_path: Path) -> None:
    (tmp_path / "chunks" / "ab" / "cd").mkdir(parents=True)
    (tmp_path / "chunks" / "ab" / "cd" / "abcd").write_bytes(b"x" * 10)
    (tmp_path / "chunks" / "ab" / "cd" / ".tmp-abcd-1-2").write_bytes(b"t" * 3)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "write.lock").write_bytes(b"l" * 7)
    (tmp_path / "store-id").write_text("x" * 33)
    total, files = store_files(tmp_path)
    assert total == 13 and len(files) == 2


def test_stand_in_nvidia_smi_output_is_read_per_pid() -> None:
    out = "123, 500\n456, 20\n123, 10\nno, gpu\n"
    assert parse_compute_apps(out, {123}) == {123: 510 << 20}
