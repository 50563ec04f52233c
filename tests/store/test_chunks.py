"""The chunk store on its own: content addressing, dedup, verification, crash-safe writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.store.helpers import blob
from torpor.errors import DataLoss, InvalidArgument, ResourceExhausted
from torpor.store import chunks
from torpor.store.chunks import ChunkRef, ChunkStore, hash_bytes, verify


@pytest.fixture
def cs(tmp_path: Path) -> ChunkStore:
    return ChunkStore(tmp_path / "chunks-root")


def chunk_files(cs: ChunkStore) -> list[Path]:
    return sorted(p for p in cs.chunk_dir.rglob("*") if p.is_file())


def test_put_names_a_chunk_by_its_xxh3_128(cs: ChunkStore) -> None:
    data = blob("a", 10_000)
    ref = cs.put(data)
    assert ref == ChunkRef(hash_bytes(data), 10_000)
    assert len(ref.hash) == 32
    path = cs.path(ref.hash)
    assert path == cs.chunk_dir / ref.hash[:2] / ref.hash[2:4] / ref.hash
    assert path.read_bytes() == data
    assert cs.read(ref) == data


def test_put_is_idempotent_and_never_rewrites(cs: ChunkStore) -> None:
    data = blob("b", 5000)
    ref = cs.put(data)
    inode = cs.path(ref.hash).stat().st_ino
    assert cs.put(memoryview(bytearray(data))) == ref
    assert cs.path(ref.hash).stat().st_ino == inode
    assert chunk_files(cs) == [cs.path(ref.hash)]


def test_wrong_sized_existing_file_is_replaced(cs: ChunkStore) -> None:
    data = blob("c", 4000)
    ref = cs.put(data)
    cs.path(ref.hash).write_bytes(data[:100])  # a damaged copy
    cs.put(data)
    assert cs.read(ref) == data


def test_read_into_fills_the_buffer(cs: ChunkStore) -> None:
    data = blob("d", 70_000)
    ref = cs.put(data)
    buf = bytearray(ref.size)
    cs.read_into(ref, memoryview(buf))
    assert bytes(buf) == data


def test_read_into_rejects_a_wrong_buffer(cs: ChunkStore) -> None:
    ref = cs.put(b"xyz")
    with pytest.raises(InvalidArgument):
        cs.read_into(ref, memoryview(bytearray(4)))
    with pytest.raises(InvalidArgument):
        cs.read_into(ref, memoryview(b"abc"))


@pytest.mark.parametrize("reader", ["read", "read_into"])
def test_flipped_byte_is_data_loss_never_data(cs: ChunkStore, reader: str) -> None:
    data = blob("e", 3000)
    ref = cs.put(data)
    path = cs.path(ref.hash)
    damaged = bytearray(data)
    damaged[1234] ^= 0x01
    path.write_bytes(damaged)
    with pytest.raises(DataLoss) as err:
        if reader == "read":
            cs.read(ref)
        else:
            cs.read_into(ref, memoryview(bytearray(ref.size)))
    assert err.value.reason == "CHUNK_CORRUPT"
    assert err.value.metadata["hash"] == ref.hash
    assert err.value.metadata["path"] == str(path)
    assert "hash mismatch" in err.value.metadata["problem"]


@pytest.mark.parametrize("reader", ["read", "read_into"])
@pytest.mark.parametrize("damage", ["missing", "truncated", "extended"])
def test_missing_or_resized_file_is_data_loss(cs: ChunkStore, reader: str, damage: str) -> None:
    data = blob("f", 3000)
    ref = cs.put(data)
    path = cs.path(ref.hash)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:-1])
    else:
        path.write_bytes(data + b"\0")
    with pytest.raises(DataLoss) as err:
        if reader == "read":
            cs.read(ref)
        else:
            cs.read_into(ref, memoryview(bytearray(ref.size)))
    assert err.value.reason == "CHUNK_CORRUPT"
    assert err.value.metadata["hash"] == ref.hash


def test_verify_checks_size_and_hash() -> None:
    data = blob("g", 100)
    ref = ChunkRef(hash_bytes(data), len(data))
    verify(ref, data)
    verify(ref, memoryview(data))
    with pytest.raises(DataLoss):
        verify(ref, data[:-1])
    with pytest.raises(DataLoss):
        verify(ref, bytes([data[0] ^ 0xFF]) + data[1:])


@pytest.mark.parametrize("bad", ["", "../../etc/passwd", "A" * 32, "g" * 32, "ab" * 17])
def test_hashes_that_are_not_hex_never_become_paths(cs: ChunkStore, bad: str) -> None:
    with pytest.raises(InvalidArgument):
        cs.path(bad)
    with pytest.raises(InvalidArgument):
        ChunkRef(bad, 1)


def test_store_id_is_stable_across_opens(tmp_path: Path) -> None:
    first = ChunkStore(tmp_path / "s").store_id
    assert ChunkStore(tmp_path / "s").store_id == first
    assert ChunkStore(tmp_path / "other").store_id != first


def test_empty_chunk(cs: ChunkStore) -> None:
    ref = cs.put(b"")
    assert ref.size == 0
    assert cs.read(ref) == b""


class DiskFull:
    """Makes writes under one directory fail with ENOSPC after `allow` bytes."""

    def __init__(self, under: Path, allow: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.under = str(under)
        self.allow = allow
        self.real_write = os.write
        monkeypatch.setattr(chunks.os, "write", self.write)

    def write(self, fd: int, data: object) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(self.under):
            return self.real_write(fd, data)  # type: ignore[arg-type]
        if self.allow <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = memoryview(data)[: self.allow]  # type: ignore[arg-type]
        written = self.real_write(fd, view)
        self.allow -= written
        return written


@pytest.mark.parametrize("allow", [0, 1000])
def test_disk_full_is_store_full_with_nothing_left_behind(
    cs: ChunkStore, monkeypatch: pytest.MonkeyPatch, allow: int
) -> None:
    kept = blob("kept", 2000)
    kept_ref = cs.put(kept)
    DiskFull(cs.root, allow, monkeypatch)
    with pytest.raises(ResourceExhausted) as err:
        cs.put(blob("new", 50_000))
    assert err.value.reason == "STORE_FULL"
    assert err.value.retryable
    assert chunk_files(cs) == [cs.path(kept_ref.hash)]  # no temp file, no partial chunk
    assert cs.read(kept_ref) == kept
    scan = cs.scan()
    assert scan.temps == () and scan.strays == ()


def test_scan_classifies_files(cs: ChunkStore) -> None:
    ref = cs.put(b"hello")
    d = cs.path(ref.hash).parent
    (d / ".tmp-deadbeef-1-ab").write_bytes(b"partial")
    (cs.chunk_dir / "README").write_text("not ours")
    scan = cs.scan()
    assert scan.chunks == (ref,)
    assert scan.temps == (d / ".tmp-deadbeef-1-ab",)
    assert scan.strays == (cs.chunk_dir / "README",)


def test_chunk_module_needs_no_database() -> None:
    import subprocess
    import sys

    code = "import sys, torpor.store.chunks; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
